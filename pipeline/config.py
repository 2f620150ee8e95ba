"""The YAML config, validated by pydantic. Every error names the field path and the offending value.

Strings may use ``${VAR}`` or ``${VAR:-default}`` (the default also where VAR is empty, as in the shell;
any other ``${`` is refused); secrets (camera passwords, Redis passwords) come from the environment this
way and never need to sit in the file.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from pipeline.errors import UserError
from workers.redact import redact_text, redact_url
from workers.analytics_settings import analytics_errors
from workers.budget import COUNTING_MIN_FPS
from workers.settings import (RAY_RESOURCE_STEP, REDIS_MAX_COUNT, CameraConfig, RedisConfig, Strict, TrackerConfig,
                              backend_problem)

__all__ = ["CameraConfig", "Config", "ConfigError", "RedisConfig", "TrackerConfig", "load_config", "parse_camera",
           "parse_config"]

log = logging.getLogger(__name__)

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _ray_amount(v: float | None) -> float | None:
    """A resource amount an actor reserves: 0, or at least the step Ray counts in, and finite."""
    if v is not None and v == math.inf:  # no node offers it: the start was refused only once Ray was up
        raise ValueError("must be finite")
    if v is not None and 0 < v < RAY_RESOURCE_STEP:
        raise ValueError(f"Ray reserves resources in steps of {RAY_RESOURCE_STEP:g}: use 0 or at least that")
    return v


class ConfigError(UserError, ValueError):
    """A config that cannot be used; one line per problem, each naming the field path.
    (Still a ValueError, for callers that caught it as one before UserError existed.)"""


class RayConfig(Strict):
    address: str | None = Field(None, description="'local' starts Ray in-process; 'auto', host:port or "
                                "ray://host:10001 joins a cluster; None: $RAY_ADDRESS when set, else 'local'")
    namespace: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Ray namespace of this "
                                  "pipeline's named actors; default hydravision-{redis.prefix}")
    num_cpus: int | None = Field(None, ge=1, description="local mode: logical CPUs of the Ray it starts")
    object_store_mb: int = Field(512, ge=75)  # Ray refuses less than 75 MiB (a ValueError at ray.init)
    stream_cpus: float = Field(0.1, ge=0, le=64, description="CPU each camera reserves, its StreamActor the sum "
                               "(~0.04 measured for 640x360 at 10 fps, docs/scaling.md; more for 1080p or high fps)")
    cameras_per_process: int | None = Field(None, ge=1, le=256, description="cameras that share one StreamActor "
                                            "process (a crash restarts them together); None: as few processes as "
                                            "spread the cameras over the cores (1 per process on a machine with as "
                                            "many cores as cameras)")
    inference_cpus: float = Field(0, ge=0, le=256, description="CPU each inference replica reserves besides its "
                                  "GPU or inference resource")
    inference_resource: str = Field("hydravision_inference", pattern=r"^[A-Za-z0-9_.-]{1,64}$",
                                    description="custom resource of the nodes that can run inference (torch, the "
                                    "model); when any node advertises it, each replica reserves 1 of it")
    # Finite and bounded: Ray takes a wait as int64 milliseconds (ray.get(timeout=inf) is an OverflowError).
    placement_timeout_s: float = Field(120, gt=0, le=86_400, description="how long actors may wait for a node to "
                                       "take them, and the controller for the Ray head at ray.address to answer")
    wait_for_resources: dict[str, float] = Field(default_factory=dict, description="before placing anything, wait "
                                                 "(up to placement_timeout_s) until the cluster offers these totals, "
                                                 "e.g. {hydravision_inference: 1, GPU: 1}: nodes still joining")

    @field_validator("stream_cpus", "inference_cpus")
    @classmethod
    def _amounts(cls, v: float) -> float:
        return _ray_amount(v)

    @field_validator("wait_for_resources")
    @classmethod
    def _wanted(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: n for k, n in v.items() if not 0 <= n < math.inf}  # inf is never offered; nan, -1 mean nothing
        if bad:
            raise ValueError(f"amounts must be finite and >= 0 (0: nothing to wait for), got {bad}")
        return v

    def resolved_address(self) -> str:
        """'local', or the cluster to join: the config's address, else $RAY_ADDRESS."""
        return self.address or os.environ.get("RAY_ADDRESS") or "local"

    @property
    def cluster(self) -> bool:
        return self.resolved_address() != "local"


class ModelConfig(Strict):
    checkpoint: str = Field("demo", description="'demo' (bundled) or a path to a .safetensors checkpoint")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    precision: Literal["auto", "fp32", "fp16", "bf16", "int8"] = Field(
        "auto", description="'auto': fp16 on a GPU, bf16 or fp32 on a CPU (see backend); 'int8': OpenVINO with "
        "the convolutions quantized, calibrated on frames like the model's training data (models/quantize.py)")
    score_threshold: float | None = Field(None, gt=0, lt=1, description="override every head's threshold")
    compile: bool = Field(False, description="torch.compile the backbone and neck (slow start; mostly a GPU win)")
    backend: Literal["auto", "torch", "onnxruntime", "openvino"] = Field(
        "auto", description="what runs backbone, neck and heads: 'torch' (eager, or compiled with compile: true), "
        "'onnxruntime' (the model exported to ONNX once and cached in ~/.cache/hydravision/onnx; fp32; decoding and "
        "NMS stay in torch), 'openvino' (the same export in OpenVINO on the CPU; bf16 or fp32) or 'auto': on a CPU "
        "openvino in bf16 where the CPU runs bf16 natively and precision is auto or bf16, else onnxruntime; torch "
        "on a GPU, with compile, fp16, LoRA adapters, or bf16 on a CPU without native bf16 (torch's autocast)")
    distribute: Literal["auto", "object_store", "path"] = Field(
        "auto", description="how inference replicas get the checkpoint: 'object_store' (the controller reads it and "
        "Ray copies it to each node), 'path' (every node reads the same path: shared storage or baked into the "
        "image); 'auto': object_store on a cluster, path locally")

    @model_validator(mode="after")
    def _backend_runs_it(self) -> "ModelConfig":
        if why := backend_problem(self.backend, self.precision, self.device, self.compile):
            raise ValueError(why)
        return self

    def checkpoint_path(self) -> Path:
        """Absolute, from the controller's working directory: replicas (``distribute: path``) read the file the
        controller checked, whatever their own process's working directory is."""
        return checkpoint_path(self.checkpoint).absolute()


def absolute_path_url(url: str) -> str:
    """A camera URL that is a relative file path, made absolute from this process's working directory (what the
    camera processes get: cluster.actor_camera); any other URL as it is ("~" is left to the source)."""
    return url if "://" in url or url.startswith(("/", "~")) else os.path.abspath(url)


def checkpoint_path(name: str) -> Path:
    """'demo': the bundled checkpoint; anything else a path."""
    if name == "demo":
        return Path(__file__).resolve().parent.parent / "models" / "checkpoints" / "demo.safetensors"
    return Path(name).expanduser()


class InferenceConfig(Strict):
    max_batch: int = Field(32, ge=1, le=256, description="the largest batch; with adapt_batch, the ceiling of what "
                           "the replica measures")
    adapt_batch: bool = Field(True, description="batches start at up to 8 frames and grow (powers of two, up to "
                              "max_batch) only while the replica measures larger ones faster per frame "
                              "(workers/batch_size.py); false: always up to max_batch")
    max_wait_ms: float = Field(5.0, ge=0, le=1000)
    merge_window_ms: float = Field(0.0, ge=0, le=100, description=(
        "0: each camera's frames go to inference in calls of their own. Above 0: the cameras of one process "
        "that use the same replica share calls, a camera's frames waiting at most this long for the others' "
        "(docs/architecture.md, 'Calls shared by a process's cameras': less CPU per frame in-process, no gain "
        "measured with the real command on 2 CPU cores)"))
    in_camera_process: bool | None = Field(None, description=(
        "true: each camera process loads the model and batches its own cameras' frames, instead of sending them "
        "to shared replicas (no replicas start; replicas, num_gpus and merge_window_ms do not apply; threads: "
        "per camera process; not with model.device cuda). None: true on the CPUs of one machine (1.2x the "
        "frames/s at 0.8x the CPU per frame on 2 cores), false on GPUs and with ray.cluster "
        "(docs/architecture.md, 'The model in the camera processes')"))
    replicas: int | None = Field(None, ge=1, le=64, description="model processes; None: 1 where they get a GPU, "
                                 "2 on CPUs (docs/architecture.md, 'Two replicas on a CPU')")
    num_gpus: float | None = Field(None, ge=0, description="per replica; None: 1 when CUDA is visible, else 0")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads per replica (default: the node's "
                                "cores shared among the replicas placed on it)")
    max_pending: int | None = Field(None, ge=1, description="requests waiting per replica; beyond it the oldest of "
                                    "the camera holding the most is shed (default: 8 x max_batch, at least "
                                    "max_pending_per_camera)")
    max_pending_per_camera: int | None = Field(None, ge=1, description="requests of one camera waiting per replica "
                                               "(default: max(16, max_batch))")

    @field_validator("num_gpus")
    @classmethod
    def _gpus(cls, v: float | None) -> float | None:
        return _ray_amount(v)


class StatusConfig(Strict):
    interval_s: float = Field(1.0, gt=0, le=3600)  # finite: the controller's Event.wait overflows on inf
    table: bool = True


API_TOKEN_ENV = "HYDRAVISION_API_TOKEN"
MIN_TOKEN_LENGTH = 16


def _token_problem(token: str) -> str | None:
    """Why no request can send ``token``: HTTP drops a header's surrounding whitespace and refuses control
    characters, so every request was refused (e.g. a token read from a file with its final newline)."""
    if token != token.strip() or not token.isprintable():
        return "starts or ends with whitespace or holds a control character (a newline from a file?)"
    return None


class ApiConfig(Strict):
    """Live control: the HTTP API, and what a camera added or changed at run time (over HTTP or the Redis
    control stream) may read. Cameras from this file are trusted; those from a control channel are not."""
    host: str = Field("127.0.0.1", description="address the HTTP API binds; anything but loopback needs a token")
    port: int | None = Field(None, ge=0, le=65535,
                             description="HTTP API port; None: no HTTP API; 0: a free port (printed at start)")
    tokens: dict[str, str] = Field(default_factory=dict, description=(
        "bearer tokens by name, e.g. {ops: \"${HV_OPS_TOKEN}\"} (quoted: YAML reads { as a mapping); "
        "the name is recorded as who sent a command; "
        "an empty one (${VAR:-} unset) is no token. "
        f"${API_TOKEN_ENV}, when set, adds a token named 'env'. With any token, every request needs one"))
    media_roots: list[str] = Field(default_factory=list, description=(
        "folders whose files a camera added at run time may read (symlinks resolved); none: no files; "
        "an empty one (${VAR:-} unset) is none"))
    devices: list[str] = Field(default_factory=list, description=(
        "capture devices a camera added at run time may open, e.g. [/dev/video0]; none: no devices"))
    max_cameras: int = Field(64, ge=1, description="a control channel cannot add cameras beyond this many")

    @field_validator("tokens")
    @classmethod
    def _tokens(cls, v: dict[str, str]) -> dict[str, str]:
        v = {name: token for name, token in v.items() if token}  # ${VAR:-} left empty: no such token
        for name, token in v.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", name):  # not re.match with "$": it let "ops\n" through
                raise ValueError(f"token name {name!r}: 1-32 letters, digits, '_', '-' or '.'")
            if len(token) < MIN_TOKEN_LENGTH:  # the value itself is never shown
                raise ValueError(f"token {name!r} is shorter than {MIN_TOKEN_LENGTH} characters")
            if problem := _token_problem(token):
                raise ValueError(f"token {name!r} {problem}")
        return v

    @field_validator("media_roots", "devices")
    @classmethod
    def _paths(cls, v: list[str]) -> list[str]:
        # ${VAR:-} left empty: no such entry (realpath("") is the working directory). "~" is the home folder, as in
        # a camera's file path and model.checkpoint: realpath kept it as a folder named "~", and no file was allowed.
        return [os.path.expanduser(p) for p in v if p]

    def all_tokens(self, env: dict[str, str] | None = None) -> dict[str, str]:
        """Configured tokens plus $HYDRAVISION_API_TOKEN as 'env'; raises ConfigError on a weak one."""
        env = os.environ if env is None else env
        tokens = dict(self.tokens)
        if value := env.get(API_TOKEN_ENV):
            if len(value) < MIN_TOKEN_LENGTH:
                raise ConfigError(f"${API_TOKEN_ENV}: the token is shorter than {MIN_TOKEN_LENGTH} characters")
            if problem := _token_problem(value):
                raise ConfigError(f"${API_TOKEN_ENV}: the token {problem}")
            if tokens.get("env", value) != value:  # it replaced the configured one without a word: that token failed
                raise ConfigError(f"api.tokens.env: ${API_TOKEN_ENV} is the token named 'env' too, and another; "
                                  "rename the one in the config")
            tokens["env"] = value
        return tokens

    @property
    def loopback(self) -> bool:
        try:  # by address, not text: "127.example.com" is a name that may resolve anywhere
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"


class ControlConfig(Strict):
    """The Redis control stream {prefix}:control: any Redis client can add, remove or update cameras."""
    enabled: bool = Field(True, description="read commands from {prefix}:control (Redis ACLs decide who may write it)")
    group: str = Field("hydravision", pattern=r"^[A-Za-z0-9_.-]{1,64}$",
                       description="consumer group: commands acknowledged by it are never applied again")
    results_maxlen: int = Field(1000, ge=10, le=REDIS_MAX_COUNT,
                                description="approximate MAXLEN of {prefix}:control:results")


class DashboardConfig(Strict):
    """The ``dashboard:`` section a controller config can carry (the controller serves the page when enabled)."""
    enabled: bool = False
    host: str = Field("127.0.0.1", description="address to bind; the page has no login, keep it on loopback "
                      "or behind a proxy that has one")
    port: int = Field(8765, ge=0, le=65535, description="0: a free port")
    interval_s: float = Field(1.0, ge=0.1, le=60, description="how often camera tiles are read and pushed "
                              "(0.1 s at least: as `hydravision dashboard --interval`)")
    allow_control: bool = Field(False, description="offer add/remove camera on the page (through the Redis "
                                "control stream); anyone who reaches the page can then use them")
    allowed_hosts: list[str] = Field(default_factory=list, description="on loopback the page answers only requests "
                                     "naming a loopback Host (against DNS rebinding); a proxy's names it also answers. "
                                     "Given, the check holds bound to any address (a container's 0.0.0.0), which "
                                     "then also answers a Host that is an IP address (no rebound page sends one)")


class Config(Strict):
    redis: RedisConfig = RedisConfig()
    ray: RayConfig = RayConfig()
    model: ModelConfig = ModelConfig()
    inference: InferenceConfig = InferenceConfig()
    status: StatusConfig = StatusConfig()
    api: ApiConfig = ApiConfig()
    control: ControlConfig = ControlConfig()
    dashboard: DashboardConfig = DashboardConfig()
    cameras: list[CameraConfig] = Field(default_factory=list)
    # Camera id -> its url as written in the file (with its ${VAR}s), for `hydravision cameras export`.
    _written_urls: dict[str, str] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _unique_ids(self) -> "Config":
        seen: dict[str, int] = {}
        for i, cam in enumerate(self.cameras):
            if cam.id in seen:
                raise ValueError(f"cameras[{i}].id: duplicate camera id {cam.id!r} (also cameras[{seen[cam.id]}])")
            seen[cam.id] = i
        return self


def interpolate_env(value: Any, path: str = "", env: dict[str, str] | None = None) -> Any:
    """Replaces ${VAR} / ${VAR:-default} in every string of a parsed YAML tree."""
    env = os.environ if env is None else env
    if isinstance(value, dict):
        # keys are not read: a `resources: {${NODE}: 1}` waited for a resource named "${NODE}", never offered
        if key := next((k for k in value if isinstance(k, str) and "${" in k), None):
            raise ConfigError(f"{path or 'config'}: the key {key!r} holds a ${{...}}; only values are read, not keys")
        return {k: interpolate_env(v, f"{path}.{k}" if path else str(k), env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate_env(v, f"{path}[{i}]", env) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if default is not None and "${" in default:  # the default ends at the first '}': the rest became text
            raise ConfigError(f"{path}: the default of ${{{name}:-...}} holds another ${{...}}; nested references "
                              "are not read")
        got = env.get(name)
        if got or (got is not None and default is None):  # ${VAR:-default}: unset or empty, as in the shell
            return got
        if default is not None:
            return default
        raise ConfigError(f"{path}: environment variable ${{{name}}} is not set (use ${{{name}:-default}} for a default)")

    # ${VAR:default}, ${VAR-default}, ${ VAR }: left as text they became a literal password or URL without a word.
    # Where, not what: the text after a stray '${' may be a password.
    if (at := _ENV.sub(lambda m: " " * len(m.group()), value).find("${")) >= 0:
        raise ConfigError(f"{path}: the '${{' at character {at + 1} starts no ${{VAR}} or ${{VAR:-default}} "
                          "(${VAR:default}, ${VAR-default} and spaces are not read); a '${' meant as text is "
                          "written %24{ in a URL")
    return _ENV.sub(sub, value)


def _urls_in(value: Any) -> list[str]:
    """Every URL-like string of a parsed YAML tree: the credentials an error message might echo."""
    if isinstance(value, dict):
        return [u for v in value.values() for u in _urls_in(v)]
    if isinstance(value, list):
        return [u for v in value for u in _urls_in(v)]
    return [value] if isinstance(value, str) and "://" in value else []


# YAML 1.1 (PyYAML) reads these unquoted: `id: 010` was "Input should be a valid string (got 8)"
_UNQUOTED = "; quote it: YAML reads unquoted on/off/yes/no as true/false, 010 as the octal 8 and 12:30 as 750"


MAX_ERROR_LINE = 1000  # characters of one error line; the rest is said by its length


def _format_errors(err: ValidationError, urls: list[str], root: str = "", yaml: bool = False) -> str:
    """One line per error, each starting with the field path (under ``root``, e.g. "camera" -> camera.fps);
    ``yaml``: the input was a YAML file (a number or boolean where text belongs gets the hint to quote it)."""
    lines = []
    for e in err.errors():
        parts = list(e["loc"])
        # a mapping's key: its path is the mapping's (an int key read as a list index: "labels[1].[key]")
        key = e["type"] == "invalid_key" or parts[-1:] == ["[key]"]
        if key:
            parts = parts[:-2] if parts[-1] == "[key]" else parts[:-1]
        loc = root
        for part in parts:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        value = e.get("input")
        shown = redact_url(value) if isinstance(value, str) else value
        msg = e["msg"].removeprefix("Value error, ")
        if key:
            msg = f"the key {value!r}: {msg}"
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling)"
        # An unknown field's value is no help and may be a secret (`redis.password: ${REDIS_PASSWORD}`); so is a token.
        secret = e["type"] == "extra_forbidden" or "tokens" in e["loc"]
        if isinstance(value, dict) or e["type"] == "missing" or secret or key:
            line = f"{loc or 'config'}: {msg}"
        else:
            line = f"{loc or 'config'}: {msg} (got {shown!r})"
        unquoted = yaml and e["type"] in ("string_type", "invalid_key") and isinstance(value, (bool, int, float))
        lines.append(line + (_UNQUOTED if unquoted else ""))
    # a validator may echo a value, a list's repr may hold a URL: nothing of the input leaves unredacted; then each
    # line cut (a refused value of 1 MiB came back whole in the answer, and in the log)
    return "\n".join(_cut(line) for line in redact_text("\n".join(lines), urls).split("\n"))


def _cut(line: str, most: int = MAX_ERROR_LINE) -> str:
    return line if len(line) <= most else f"{line[:most]}... ({len(line)} characters)"


class _RefuseKeysTwice:
    """safe_load that refuses a key given twice in one mapping: YAML keeps the last one silently, so a second
    `cameras:` block dropped the first one's cameras without a word."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` merges; its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: construct_mapping says so itself
                continue
            if first is not None:  # (compared by line, two on one line of a {flow: mapping} went through)
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice in one mapping (first on line {first + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


class _UniqueKeys(_RefuseKeysTwice, yaml.SafeLoader):
    """The pure-Python parser: its errors are the ones said (libyaml's marks cannot drop their snippet)."""


class _FastUniqueKeys(_RefuseKeysTwice, getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """libyaml's parser where PyYAML has it: the pure-Python one took 10 of the 13 s that a config of
    10,000 cameras needed to load."""


def load_yaml(text: str | bytes) -> Any:
    """yaml.safe_load, refusing duplicate keys; a text libyaml refuses is parsed again by the pure-Python
    parser, whose error (without the file's snippet, see _yaml_problem) is the one raised."""
    if ("\t" if isinstance(text, str) else b"\t") in text:  # libyaml takes tabs the pure parser refuses: one rule
        return yaml.load(text, Loader=_UniqueKeys)  # noqa: S506 (SafeLoader subclasses)
    try:
        return yaml.load(text, Loader=_FastUniqueKeys)  # noqa: S506
    except (yaml.YAMLError, ValueError):  # ValueError: bytes that are not UTF-8
        return yaml.load(text, Loader=_UniqueKeys)  # noqa: S506


def _yaml_problem(err: yaml.YAMLError) -> str:
    """The parser's message with line and column but without its snippet of the file, which can show a
    password written there (a snippet cut short can even end inside it, past any redaction rule)."""
    for mark in (getattr(err, "context_mark", None), getattr(err, "problem_mark", None)):
        if mark is not None:
            mark.buffer = None
    return str(err)


def parse_config(data: Any, source: str = "config") -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    written = data.get("cameras")
    try:
        data = interpolate_env(data)
    except RecursionError:  # `&a [*a]` is legal YAML: a list inside itself, endless to walk
        raise ConfigError(f"{source}: a YAML alias refers to the list or mapping it is in "
                          "(or it nests too deep)") from None
    try:
        config = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: invalid config:\n{_format_errors(e, _urls_in(data), yaml=True)}") from None
    if isinstance(written, list):
        config._written_urls = {cam.id: raw["url"] for cam, raw in zip(config.cameras, written)
                                if isinstance(raw, dict) and isinstance(raw.get("url"), str)}
    for cam in config.cameras:
        if warning := counting_rate_warning(cam):
            log.warning("%s: %s", source, warning)
    return config


def counting_rate_warning(cam: CameraConfig) -> str | None:
    """What to say of a camera whose lines or zones analyse fewer frames a second than counting needs
    (workers/budget.py: COUNTING_MIN_FPS); said, not refused: slower objects than the street's count at less."""
    if not (cam.lines or cam.zones) or cam.fps is None or cam.fps >= COUNTING_MIN_FPS:
        return None
    return (f"camera {cam.id}: fps {cam.fps:g} is below the {COUNTING_MIN_FPS:g} fps its lines and zones need to "
            "count right: an object that moves farther than its own width between analysed frames is never tracked "
            "from one to the next, and is not counted")


def parse_camera(data: Any, model_heads: dict[str, list[str]] | None = None, where: str = "camera") -> CameraConfig:
    """One camera's settings (a control API request, a live update): the same validation as in the YAML,
    zones and lines included, plus, given the model's heads, the heads and classes they name. Raises
    ConfigError with one line per problem, each naming the field path under ``where``
    (``camera.zones[1].polygon: edges 1-2 and 3-0 cross ...``)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    data = interpolate_env(data, where)
    try:
        cam = CameraConfig.model_validate(data)
    except ValidationError as e:
        out = []
        for ln in _format_errors(e, _urls_in(data)).splitlines():
            # A camera-level check names its field first ("config: zones[1].name: duplicate ..."): keep one path.
            ln = ln.removeprefix("config: ")
            out.append(f"{where}.{ln}" if re.match(r"^[A-Za-z_]\w*(\[\d+\])*[.:\[]", ln) else f"{where}: {ln}")
        raise ConfigError("\n".join(out)) from None
    if model_heads is not None:
        unknown = [h for h in (cam.heads or []) if h not in model_heads]
        # zones and lines only against heads the model has: analytics_errors looks the camera's heads up in it
        problems = ([f"heads: unknown heads {unknown} (the model has {list(model_heads)})"] if unknown
                    else analytics_errors(cam.zones, cam.lines, cam.heads, model_heads))
        if problems:
            raise ConfigError("\n".join(f"{where}.{p}" for p in problems))
    return cam


MAX_CONFIG_BYTES = 64 * 2**20  # 10,000 cameras with a zone each are 2.5 MB; more is a video given by mistake


def load_config(path: str | Path) -> Config:
    path = Path(path)
    if not path.exists():  # not is_file(): `run <(envsubst < c.yaml)` and /dev/stdin are pipes, and were "not found"
        raise ConfigError(f"{path}: config file not found")
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a config file")
    try:
        # bytes: the parser decodes them as YAML says (UTF-8/16, whatever the locale) and names a byte that
        # is not text (a video given by mistake) as a YAML error, not a UnicodeDecodeError's traceback
        if (size := path.stat().st_size) > MAX_CONFIG_BYTES:  # read whole, it took 2.2x its size in memory
            raise ConfigError(f"{path}: {size / 2**20:.1f} MiB, larger than {MAX_CONFIG_BYTES // 2**20} MiB: not a "
                              "config file (a video given by mistake?)")
        data = load_yaml(path.read_bytes())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config: {e.strerror or e}") from None
    except RecursionError:  # the parser recurses once per level of [ or {
        raise ConfigError(f"{path}: not valid YAML: it nests too deep") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    return parse_config(data, str(path))
