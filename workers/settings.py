"""The settings the workers run on, validated by pydantic: one camera, its tracker, and the Redis it publishes to.

They live here, beside the code that reads them, because `workers/` must not import `pipeline/`;
`pipeline/config.py` composes them into the whole YAML config. The actors receive these validated models
(they pickle), never dicts with defaults re-applied by hand.
"""

from __future__ import annotations

import math
import re
from types import UnionType
from typing import Annotated, Any, Iterator, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from pydantic_core import InitErrorDetails, PydanticCustomError

from workers.analytics_settings import (LineConfig, MotionConfig, SnapshotConfig, ZoneConfig,
                                        camera_analytics_problems)
from workers.redact import BIDI_CONTROLS, redact_url

CAMERA_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")  # \Z: "$" let "lobby\n" through, a second lobby
URL_SCHEMES = ("rtsp", "rtsps", "file", "synthetic", "http", "https", "device")
LIVE_SCHEMES = ("rtsp", "rtsps", "http", "https", "device")  # sources that never end by themselves
# Plain paths that name a capture device: /dev/videoN and udev's stable names for it (/dev/v4l/by-id/..., by-path/...)
DEVICE_PATHS = ("/dev/video", "/dev/v4l/")


def _infinite_as_text(value: object) -> object:
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: _infinite_as_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_infinite_as_text(v) for v in value]
    return value


def is_device_path(url: str) -> bool:
    """A plain path to a capture device (a camera that never ends by itself), not a file."""
    return url.startswith(DEVICE_PATHS)
REDIS_MAX_COUNT = 2**63 - 1  # Redis reads a count (MAXLEN) as a signed 64-bit integer
MAX_TIMEOUT_S = 3600.0  # finite: FFmpeg takes the timeouts as integer microseconds
RAY_RESOURCE_STEP = 0.0001  # Ray refuses a finer fraction of a resource, with a ValueError when the actor is made


OPENVINO_PRECISIONS = ("auto", "fp32", "bf16", "int8")


def runs_on_cpu_only(backend: str, precision: str) -> bool:
    """OpenVINO and int8 (OpenVINO's) run the model on the CPU whatever the machine has: device 'auto' is the CPU
    for them, and their inference replicas reserve no GPU."""
    return backend == "openvino" or precision == "int8"


def backend_problem(backend: str, precision: str, device: str, compile: bool = False) -> str | None:
    """Why ``backend`` cannot run ``precision`` on ``device`` ('auto', 'cpu', 'cuda', ...), or None. The one rule
    behind the config's check, `hydravision eval --backend`'s and ModelRunner's: OpenVINO runs on the CPU here
    and not in fp16; int8 is OpenVINO's (the CPU's int8 kernels), which ``backend: auto`` then picks. Device
    'auto' is the CPU for both, also where a GPU is (ModelRunner resolves it so). ONNX Runtime runs fp32 only,
    and ``compile`` is torch.compile's: asked of another runtime, both were ignored without a word."""
    on_cpu = device in ("auto", "cpu")
    if compile and (backend in ("onnxruntime", "openvino") or precision == "int8"):
        runtime = "openvino (precision int8)" if precision == "int8" else backend
        return f"compile is torch.compile, for backend torch; backend {runtime} does not use it"
    if backend == "onnxruntime" and precision in ("fp16", "bf16"):
        return f"backend onnxruntime runs precision fp32, not {precision} (backend torch runs it)"
    if backend == "openvino" and not on_cpu:
        return f"backend openvino runs the model on the CPU here, not on device {device}"
    if backend == "openvino" and precision not in OPENVINO_PRECISIONS:
        return f"backend openvino runs precision {', '.join(OPENVINO_PRECISIONS)}, not {precision}"
    if precision == "int8" and (backend not in ("auto", "openvino") or not on_cpu):
        return f"precision int8 runs on backend openvino on the CPU, not on backend {backend} with device {device}"
    return None


def _options(annotation: Any) -> tuple:
    """The types a field takes: a union's members, each without its Annotated metadata."""
    options = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    return tuple(get_args(t)[0] if get_origin(t) is Annotated else t for t in options)


def _bools_for_numbers(annotation: Any, value: Any, loc: tuple = ()) -> Iterator[tuple[tuple, bool]]:
    """(where, value) for each true or false in ``value`` that stands for a number ``annotation`` takes, in lists,
    tuples, mappings and models whose base is not Strict (the analytics settings'); a Strict model checks its own."""
    options = _options(annotation)
    if isinstance(value, bool):
        if bool not in options and (int in options or float in options):
            yield loc, value
        return
    for option in options:
        origin, args = get_origin(option), get_args(option)
        if isinstance(value, dict) and origin is dict and len(args) == 2:
            for key, item in value.items():
                yield from _bools_for_numbers(args[1], item, (*loc, key))
        elif isinstance(value, (list, tuple)) and origin in (list, tuple) and args:
            for i, item in enumerate(value):
                each = args[0] if origin is list or args[-1] is Ellipsis else args[min(i, len(args) - 1)]
                yield from _bools_for_numbers(each, item, (*loc, i))
        elif isinstance(value, dict) and isinstance(option, type) and issubclass(option, BaseModel) \
                and not issubclass(option, Strict):
            for name, field in option.model_fields.items():
                if name in value:
                    yield from _bools_for_numbers(field.annotation, value[name], (*loc, name))
        else:
            continue
        return


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, v: Any, info: ValidationInfo) -> Any:
        """true or false where a number belongs is refused: pydantic's lax mode read them as 1 and 0, so a client's
        `"fps": true` (or YAML's unquoted yes, on, no, off) ran a camera at 1 fps without a word."""
        found = list(_bools_for_numbers(cls.model_fields[info.field_name].annotation, v))
        if found:  # where each one is, under this field (a ValidationError raised here keeps its locations)
            error = PydanticCustomError("bool_for_number", "must be a number, not true or false")
            raise ValidationError.from_exception_data(cls.__name__, [
                InitErrorDetails(type=error, loc=loc, input=given) for loc, given in found])
        return v


class RedisConfig(Strict):
    url: str | None = Field(None, description="redis:// or rediss:// URL; None: start an embedded server")
    prefix: str = Field("hv", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    maxlen: int = Field(10_000, ge=100, le=REDIS_MAX_COUNT,
                        description="approximate MAXLEN of each camera's detection stream and of the events "
                                    "stream (all cameras together)")
    buffer: int = Field(2_000, ge=10, description="messages kept per camera while Redis is unreachable")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        v = v.strip() if v else v  # " redis://..." (a quoted value, a ${VAR} from a file) was "must start with ..."
        if v in (None, ""):
            return None
        if problem := redis_url_error(v):
            raise ValueError(problem)
        return v


def redis_url_error(url: str) -> str | None:
    """Why ``url`` is no Redis URL, or None. Quotes the URL redacted only: redis-py's own error for a password
    holding '/' quotes what follows the ':' as a port, a piece of the password."""
    if not re.match(r"^(redis|rediss|unix)://", url):
        return "must start with redis://, rediss:// or unix://"
    try:
        urlsplit(url).port
    except ValueError as e:
        # a port of digits too many ("redis://localhost:263910/0") was told about passwords alone
        what = "the port is out of range (a port is a number 1-65535)" if "out of range" in str(e) else \
            "no readable host:port"
        return f"{what}; a password holding '/', '?', '#' or '@' must be percent-encoded (%2F, %3F, %23, %40)"
    from redis.connection import ConnectionPool, parse_url  # here: redis costs ~0.1 s to import; only a URL needs it

    try:  # redis-py's own reading: it refused a bad ?socket_timeout= only when the publisher started (a traceback)
        options = parse_url(url)
        ConnectionPool.from_url(url).make_connection()  # an option no connection takes: a TypeError (connects not)
    except ValueError as e:
        return str(e)  # names the option, not its value
    except TypeError as e:  # "... got an unexpected keyword argument 'foo'": every command ended in "a bug"
        name = str(e).rsplit(" ", 1)[-1].strip("'")
        return (f"unknown option ?{name}= (redis-py takes no such option"
                + ("; TLS options need rediss://)" if name.startswith("ssl") else ")"))
    db = urlsplit(url).path.strip("/")
    if not url.startswith("unix://") and "db" not in options and db and not db.isdigit():
        # redis-py ignores it and uses database 0: another program's data, without a word (the path is not
        # quoted: a password holding a raw '/' ends up there)
        return "the path after host:port must be a database number, e.g. /0 (a password holding '/' is written %2F)"
    return None


class AppearanceConfig(Strict):
    """Re-linking lost tracks by the model's re-ID embeddings (workers/appearance.py). It acts only on heads whose
    boxes carry an embedding, i.e. when the checkpoint has a re-ID head for them; otherwise tracking is ByteTrack's
    alone. Defaults chosen on benchmarks/bench_reid.py's tuning seeds."""

    enabled: bool = True
    weight: float = Field(0.5, ge=0, le=1, description="appearance's share of the similarity in ByteTrack's first "
                          "association, among the pairs its IoU gate lets through (0: motion alone)")
    relink: bool = Field(True, description="re-link a new track to a recently lost one that looks the same")
    min_similarity: float = Field(0.9, ge=-1, le=1, description="least cosine similarity for a re-link")
    max_lost_s: float = Field(2.0, gt=0, le=60, description="how long a lost track waits for a re-link")
    max_distance: float = Field(1.0, ge=0, description="in box sizes, from where its last velocity would have taken it")
    max_overlap: float = Field(0.3, ge=0, le=1, description="views overlapped more (IoU) do not update an appearance")
    smoothing: float = Field(0.9, ge=0, lt=1, description="weight of a track's past appearance in each update")


class TrackerConfig(Strict):
    enabled: bool = True
    # bounded like appearance.max_lost_s: a huge buffer kept every lost track of a long-running camera for ever
    lost_track_buffer: int = Field(30, ge=0, le=1800, description="how long a lost track is kept, in frames at 30 "
                                   "fps (trackers' unit, scaled to the analysed rate): 1800 is 60 s")
    # 0.6, not trackers' 0.5: chosen with the demo heads' thresholds on the analytics tuning seeds, where
    # it halved the line-count error (a track starts only on a confident box; weaker boxes still extend tracks)
    track_activation_threshold: float = Field(0.6, ge=0, le=1)
    minimum_consecutive_frames: int = Field(2, ge=1)
    minimum_iou_threshold: float = Field(0.1, ge=0, le=1)
    high_conf_det_threshold: float = Field(0.5, ge=0, le=1)
    appearance: AppearanceConfig = AppearanceConfig()


# Ray's rule for node labels (Kubernetes' syntax), mirrored from ray/_private/label_utils.py (validate_label_key,
# validate_label_value) so that a config is checked without importing Ray; .options() refuses any other label.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?"
_LABEL_PREFIX = re.compile(rf"(?:{_LABEL})?(?:\.(?:{_LABEL})?)*")


class CameraPlacement(Strict):
    """Where a camera's StreamActor (its decoder) may run on a Ray cluster, e.g. on the node beside the camera.

    ``labels`` are node labels (``ray start --labels``), matched by equality; ``resources`` are custom Ray
    resources the actor reserves on its node (``ray start --resources``). With ``strict: false`` the labels
    are a preference: the actor runs elsewhere when no such node is alive (resources are always required).
    """

    labels: dict[str, str] = Field(default_factory=dict)
    resources: dict[str, float] = Field(default_factory=dict)
    strict: bool = True

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            prefix, slash, name = key.rpartition("/")
            if slash and (len(prefix) > 253 or not _LABEL_PREFIX.fullmatch(prefix)):
                raise ValueError(f"key {key!r}: the part before '/' must be DNS labels joined by '.', "
                                 "at most 253 characters")
            if not re.fullmatch(_LABEL, name):
                raise ValueError(f"key {key!r}: a name must be 1-63 letters, digits, '-', '_' or '.', starting and "
                                 "ending with a letter or digit (an optional 'prefix/' before it)")
            if value and not re.fullmatch(_LABEL, value):
                raise ValueError(f"value {value!r} of {key!r}: must be empty or 1-63 letters, digits, '-', '_' "
                                 "or '.', starting and ending with a letter or digit")
        return v

    @field_validator("resources")
    @classmethod
    def _resources(cls, v: dict[str, float]) -> dict[str, float]:
        reserved = {"CPU", "GPU", "memory", "object_store_memory"} & set(v)
        if reserved:
            raise ValueError(f"{sorted(reserved)} are set by ray.stream_cpus, not per camera")
        # below Ray's step (a ValueError when the actor is made) or infinite (never placeable): refused here
        bad = {k: n for k, n in v.items() if not RAY_RESOURCE_STEP <= n < math.inf}
        if bad:
            raise ValueError(f"amounts must be > 0 (at least {RAY_RESOURCE_STEP:g}, Ray's step) and finite, got {bad}")
        return v


class CameraConfig(Strict):
    id: str
    url: str
    fps: float | None = Field(None, gt=0, le=240, description="frames per second to analyse; None: every frame")
    heads: list[str] | None = Field(None, description="heads to run; None: all heads of the model")
    tracker: TrackerConfig = TrackerConfig()
    transport: Literal["tcp", "udp"] = "tcp"
    open_timeout_s: float = Field(10.0, gt=0, le=MAX_TIMEOUT_S, description="how long an open waits on a silent "
                                  "camera: the connection and handshake, then FFmpeg's first look at the stream, "
                                  "each up to this long (whatever read_timeout_s says)")
    read_timeout_s: float = Field(10.0, gt=0, le=MAX_TIMEOUT_S, description="a running camera that sends no "
                                  "picture for this long is reconnected")
    realtime: bool = Field(True, description="files and live HLS/DASH: pace at their timestamps (True) or decode "
                           "as fast as possible (False: losslessly, for files)")
    loop: bool = Field(False, description="files: start again at the end")
    max_inflight: int = Field(2, ge=1, le=16, description="frames of this camera inside inference at once")
    stall_timeout_s: float | None = Field(None, gt=0, description="watchdog: restart the decoder after this long "
                                          "without progress; default 3 x read_timeout_s + open_timeout_s")
    hwaccel: str | None = Field(None, description="decode on an FFmpeg hardware device: 'cuda' (NVDEC), 'vaapi', "
                                "'qsv', ...; falls back to the CPU decoder when the device cannot be created")
    placement: CameraPlacement | None = Field(None, description="cluster mode: the nodes this camera's decoder may run on")
    max_frame_age_ms: float | None = Field(None, gt=0, le=600_000, description="frame-age budget, capture to "
                                           "publish: when the p95 age exceeds it, this camera stops waiting for "
                                           "batches, then analyses fewer frames (workers/budget.py); None: off")
    # Analytics (workers/analytics_settings.py, workers/analytics.py): counting zones and lines, the motion gate,
    # annotated snapshots.
    zones: list[ZoneConfig] = Field(default_factory=list, max_length=64)
    lines: list[LineConfig] = Field(default_factory=list, max_length=64)
    motion: MotionConfig = MotionConfig()
    snapshot: SnapshotConfig = SnapshotConfig()
    # Set only by admission (pipeline/admission.py), never read from a config or a command: a private attribute
    # travels with copies and pickles (to the camera's actor), and no export, status or answer shows it
    _untrusted: bool = PrivateAttr(False)

    @property
    def untrusted(self) -> bool:
        """A camera whose URL came from a control channel: its source follows no redirect and opens no playlist
        (workers/av_source.py), since admission checked only the host the URL names."""
        return self._untrusted

    def as_untrusted(self) -> "CameraConfig":
        """A copy marked ``untrusted``."""
        camera = self.model_copy()
        camera._untrusted = True
        return camera

    @model_validator(mode="after")
    def _analytics(self) -> "CameraConfig":
        problems = camera_analytics_problems(self.zones, self.lines, self.heads, self.tracker.enabled)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def as_json(self) -> dict:
        """The camera as JSON data, its defaults left out; an infinite setting (``stall_timeout_s: .inf``, a watchdog
        that never restarts; ``motion.max_skip_s: .inf``, inference on motion only) as "inf", which reads back as
        inf: JSON has no Infinity (GET /cameras answered 500)."""
        return _infinite_as_text(self.model_dump(mode="json", exclude_defaults=True))

    @field_validator("hwaccel")
    @classmethod
    def _hwaccel(cls, v: str | None) -> str | None:
        from av.codec.hwaccel import hwdevices_available

        if v is not None and v not in hwdevices_available():
            raise ValueError(f"not a hardware decoder this FFmpeg supports ({', '.join(hwdevices_available())})")
        return v

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not CAMERA_ID.match(v):
            # the value is not echoed here: every error's line shows it, cut short (pipeline/config.py:_format_errors)
            raise ValueError("must be 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit")
        return v

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        # Surrounding whitespace is no part of it (a quoted YAML value, a ${VAR} read from a file with its final
        # newline); the sources strip it too. " rtsp://cam/1" was refused as "unsupported scheme ' rtsp'".
        v = v.strip()
        if not v:
            raise ValueError("must not be empty")
        scheme = v.split("://", 1)[0].lower() if "://" in v else ""
        if scheme and scheme not in URL_SCHEMES:
            raise ValueError(f"unsupported scheme {scheme!r} in {redact_url(v)!r} (use one of {', '.join(URL_SCHEMES)} or a file path)")
        if re.search(r"[\x00-\x1f\x7f]", v):
            # urlsplit drops a newline without a word, FFmpeg sends it: a password with one failed (401) for ever
            raise ValueError("holds a line break or another control character inside (a ${VAR} read from a file "
                             "with its final newline?)")
        if hidden := re.search(rf"[\x80-\x9f{BIDI_CONTROLS}]", v):
            # invisible, and no URL needs one: a U+202E turned the dashboard's error text backwards, a U+009B (CSI)
            # reached the log raw (a URL shows in errors, statuses, events and log lines)
            raise ValueError(f"holds the invisible control character U+{ord(hidden[0]):04X} (a C1 control or a "
                             "bidirectional one: it reorders or hides the text where the URL is shown)")
        if not scheme and (typo := re.match(r"(?i)(rtsps?|https?|file|synthetic|device):", v)):
            # without '//' it is a file path: "rtsp:/cam/1" failed when the camera started, as "no such file"
            raise ValueError(f"'{typo[1]}:' without '//' is read as a file name; write {typo[1].lower()}://...")
        if scheme == "device" and not v.partition("://")[2].startswith("/"):
            # FFmpeg opened "dev/video0" relative to the working directory: "no such device", retried for ever
            raise ValueError("device:// takes an absolute path: device:///dev/video0 (three slashes), or just "
                             "/dev/video0")
        if scheme in LIVE_SCHEMES and scheme != "device":
            try:  # FFmpeg too ends the host at the first '/', '?' or '#': it dialled "admin" or so
                parts = urlsplit(v)
                # port 0 and "host:" (FFmpeg reads it as 0) failed on each connect, retried for ever
                bad_port = parts.port == 0 or parts.netloc.rpartition("@")[2].endswith(":")
            except ValueError:
                bad_port = True
            if bad_port:
                raise ValueError(f"no readable host:port in {redact_url(v)!r} (a port is a number 1-65535); a user "
                                 "or password holding '/', '?', '#' or '@' must be percent-encoded (%2F, %3F, %23, "
                                 "%40)") from None
            if not parts.hostname:  # FFmpeg dialled this machine: "connection refused", retried for ever
                raise ValueError(f"no host (e.g. {scheme}://camera.local/stream)")
        if scheme in ("synthetic", "file"):
            # The source's own reading, at load and for live adds and updates: a typo failed only in the camera
            from workers.sources import SourceError, file_url_path
            from workers.synthetic_source import parse_synthetic_url

            try:
                (parse_synthetic_url if scheme == "synthetic" else file_url_path)(v)
            except SourceError as e:  # "<url, redacted>: <cause>": the field's error shows the URL already
                raise ValueError(str(e).removeprefix(f"{redact_url(v)}: ")) from None
        return v

    @field_validator("heads")
    @classmethod
    def _heads(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("must name at least one head (or be omitted for all heads)")
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"lists a head twice: {v}")
        return v

    @model_validator(mode="after")
    def _budget_needs_time(self) -> "CameraConfig":
        if self.max_frame_age_ms is not None and self.lossless:
            raise ValueError("max_frame_age_ms: an unpaced file (realtime: false) is analysed frame by frame at the "
                             "pipeline's pace, so its frames have no age to keep; use realtime: true or drop the budget")
        return self

    @property
    def is_live(self) -> bool:
        """A camera, device or stream: its end of stream means a disconnect, so it reconnects forever."""
        scheme = self.url.split("://", 1)[0].lower() if "://" in self.url else ""
        return scheme in LIVE_SCHEMES or is_device_path(self.url)

    @property
    def lossless(self) -> bool:
        """Unpaced files and scenes: decoding waits for the pipeline instead of dropping frames."""
        return not self.realtime and not self.is_live

    @property
    def stall_timeout(self) -> float:
        return self.stall_timeout_s or 3 * self.read_timeout_s + self.open_timeout_s


def refused_setting(e: BaseException) -> str | None:
    """The ValueError an actor's constructor raised (how workers/ refuse a setting they cannot run with: they cannot
    import pipeline's UserError), from Ray's error for it, which keeps only its text, traceback and all; None for
    anything else, which stays a bug with its traceback."""
    if not getattr(e, "actor_init_failed", False):
        return None
    lines = [line.strip() for line in str(e).splitlines()]
    # ValueError's own subclasses of models/ too, which Ray's text names by module: a checkpoint whose weights or
    # LoRA base do not load, int8 without its calibration data (found only when the model loads, in the actor)
    return next((line.split(": ", 1)[1] for line in reversed(lines) if line.startswith(REFUSALS)), None)


REFUSALS = ("ValueError: ", "models.metadata.CheckpointError: ", "models.hydranet.ConfigError: ")
