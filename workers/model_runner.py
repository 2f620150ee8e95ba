"""ModelRunner: a HydraNet checkpoint loaded once, run on batches of letterboxed uint8 frames.

Kept apart from workers/inference.py so that the Ray actor classes there import without torch: every
StreamActor deserializes an InferenceActor handle, which imports the actor's module, and torch alone
would add ~190 MB to each camera's process.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from models.checkpoint import load_checkpoint
from models.export import COMPILED_SUFFIX, RAW_KEYS, compiled_cache, compiling, mark_used
from models.postprocess import to_cpu
from workers.frames import HeadArrays
from workers.histograms import BATCH_SECONDS_BUCKETS, HEAD_SECONDS_BUCKETS, Histogram
from workers.settings import backend_problem, runs_on_cpu_only
from workers.thread_names import worker_thread

log = logging.getLogger(__name__)


def pick_device(device: str = "auto") -> torch.device:
    """``auto``: CUDA where there is one, else the CPU. A device asked for that this process cannot use is an
    error naming it (torch's own came from deep inside the model's load: "Torch not compiled with CUDA")."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    d = torch.device(device)
    if d.type == "cuda" and (not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()):
        seen = ("a CPU-only torch build" if torch.version.cuda is None else
                f"{torch.cuda.device_count()} CUDA device(s) visible (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
        raise ValueError(f"model.device {device}: no such device on this node ({seen}); set model.device auto or cpu")
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"model.device {device}: no Apple GPU (MPS) on this node; set model.device auto or cpu")
    return d


def pick_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    """fp16 on CUDA by default (tensor cores); full precision on CPU, where half is slower. int8 is OpenVINO's
    (``models/quantize.py``): what stays in torch (decoding, NMS) runs in fp32."""
    if precision in ("fp32", "int8") or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "bf16":
        return torch.bfloat16
    return torch.float16


# torch's fp16 against fp32 on a CPU: the demo model took 163-166 against 27-29 ms of CPU per frame (one thread)
FP16_CPU_COST = "~6x"
BACKENDS = ("torch", "onnxruntime", "openvino")
PRECISIONS = {torch.float16: "fp16", torch.bfloat16: "bf16"}  # autocast dtype -> model.precision's name


@functools.cache
def openvino_core():
    """The process's one OpenVINO Core, never released. OpenVINO's CPU plugin points the signal stack of the
    thread that loads it at memory it unmaps when the plugin is released; a Core per model, loaded and
    released as models came and went, left a thread's signal stack dangling, and the next signal with a
    handler delivered to it (a SIGCHLD) killed the process with SIGSEGV (the test suite's process, in a
    browser test). One Core for the process's life loads the plugin once and never unmaps that stack."""
    import openvino as ov  # only where this backend is used

    return ov.Core()


@functools.cache  # one answer per process: the CPU does not change
def native_bf16() -> bool:
    """Whether OpenVINO is installed and this CPU runs bf16 natively (AVX512-BF16 or AMX): there its bf16
    inference takes ~20% less CPU per frame than ONNX Runtime in fp32 (benchmarks/README.md, "OpenVINO in bf16
    on a CPU"); without it OpenVINO runs f32 (measured: no emulated bf16), slower than ONNX Runtime."""
    try:
        return "BF16" in openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except ImportError:
        return False
    except Exception as e:  # an install that cannot load its CPU plugin: auto picks ONNX Runtime instead
        log.warning("OpenVINO cannot query the CPU (%s: %s); not using it", type(e).__name__, e)
        return False


def pick_backend(backend: str, device: torch.device, autocast: torch.dtype | None, compile: bool,
                 model: torch.nn.Module, precision: str = "auto") -> str:
    """'auto' on a CPU: OpenVINO in bf16 where the CPU runs bf16 natively (precision auto or bf16), else ONNX
    Runtime in fp32, which runs the model on 20-30% less CPU per frame than torch eager (benchmarks/README.md,
    "ONNX Runtime by default on a CPU"); torch on a GPU (fp16 autocast; onnxruntime-gpu is another package),
    with compile, half precision the exports do not run, or LoRA adapters (the export has one pyramid).
    Precision int8 runs on OpenVINO only (the CPU's int8 kernels), also where the CPU has no native bf16."""
    if why := backend_problem(backend, precision, device.type, compile):
        raise ValueError(why)
    if precision == "int8":
        if model.adapters:  # the export's own refusal said "use the torch backend", which int8 is not
            raise ValueError(f"precision int8 runs the ONNX export in OpenVINO, which does not carry LoRA adapters "
                             f"({', '.join(model.adapters)}); set model.precision auto, bf16 or fp32")
        return "openvino"
    if backend != "auto":
        return backend
    if device.type != "cpu" or compile or model.adapters:
        return "torch"
    if precision in ("auto", "bf16") and native_bf16():
        return "openvino"
    return "onnxruntime" if autocast is None else "torch"


# The cache removes files nobody used for CACHE_MAX_AGE_DAYS (models/export.py), and a service runs longer than
# that on the files it loaded at its start: a session marks them used again while it runs, this often.
MARK_USED_EVERY_S = 86400.0


class ExportedSession:
    """The model's backbone, neck and heads in a runtime that reads the ONNX export (exported once, cached);
    decoding, NMS and attribute heads stay in torch on the same raw outputs. Every head runs on every image
    of a batch (the graph is fixed); a head an image did not ask for is computed and then not decoded."""

    precision = "fp32"
    device = "cpu"  # where the runtime computes the graph, for info()

    def __init__(self, model, checkpoint: str | Path, group_norm: str = "export"):
        from models.export import cached_export, output_names

        self.model = model
        self.path = cached_export(model, checkpoint, group_norm)
        self.names = output_names(model)
        self.levels = len(model.strides)
        self.cache_files = [self.path]  # what it runs from the cache (and what a restart would load again)
        self._marked = time.monotonic()

    def keep_cached(self) -> None:
        """Marks the session's cache files and their compiled forms used, every ``MARK_USED_EVERY_S``: on
        a service running past the cache's age limit, another export pruned them (then a size compiled
        after it failed, and a restart exported again)."""
        if time.monotonic() - self._marked < MARK_USED_EVERY_S:
            return
        self._marked = time.monotonic()
        for path in self.cache_files:
            mark_used(path)
            mark_used(path.with_name(path.name + COMPILED_SUFFIX))  # where there is one

    def infer(self, images: np.ndarray) -> list[np.ndarray]:
        """The graph's outputs, in ``self.names``' order."""
        raise NotImplementedError

    def detect(self, images: np.ndarray, heads: Sequence[Sequence[str] | None], score_threshold: float | None):
        self.keep_cached()
        n = images.shape[0]
        wanted = self.model.wanted_heads(heads, n)
        outs = dict(zip(self.names, self.infer(images)))
        feats = [torch.from_numpy(outs[f"p{i}"]) for i in range(self.levels)]
        raw = {}
        for name in self.model.head_names:
            idx = [i for i, w in enumerate(wanted) if name in w]
            if idx:
                rows = idx if len(idx) < n else slice(None)
                raw[name] = (idx, {k: torch.from_numpy(outs[f"{name}.{k}"][rows]) for k in RAW_KEYS})
        with torch.inference_mode():  # uint8 images: a re-ID head reading colour normalises only what it reads
            return self.model.decode(feats, raw, n, tuple(images.shape[-2:]), score_threshold,
                                     images=torch.from_numpy(images))


def gpu_providers(export: Path, device_id: int, input_name: str = "images", input_size: Sequence[int] | None = None,
                  max_batch: int | None = None, fp16: bool = False) -> list[tuple[str, dict]]:
    """ONNX Runtime's TensorRT and CUDA providers for ``export``, best first. TensorRT builds an engine (minutes):
    kept on disk in the export's own compiled folder, so only the first start on a machine pays it, and the
    cache's pruning removes them with their export (a folder shared by every export grew for ever). Given the
    input's (H, W) and ``max_batch``, one engine covers batches 1 to ``max_batch`` (tuned for full ones, the
    load where speed counts): without a profile the provider built another each time a batch outgrew the sizes
    it had seen, up to 7 builds in the middle of serving as a load grew 1 -> 64. ``fp16``: TensorRT's engines in
    fp16 (benchmarks/gpu_check.py's; the CUDA provider has no such option and stays fp32). Not run here (no GPU
    lent to this project)."""
    folder = compiled_cache(export)
    engines = folder / "tensorrt" if folder is not None else None
    if engines is not None:
        engines.mkdir(exist_ok=True)
    cache = ({"trt_engine_cache_enable": True, "trt_engine_cache_path": str(engines),
              "trt_timing_cache_enable": True, "trt_timing_cache_path": str(engines)} if engines is not None
             else {})  # a read-only cache: the engines are built at every start
    profile = {}
    if input_size is not None and max_batch is not None:  # the export's batch axis is its only dynamic one
        shape = "x".join(str(d) for d in (3, *input_size))
        profile = {"trt_profile_min_shapes": f"{input_name}:1x{shape}",
                   "trt_profile_opt_shapes": f"{input_name}:{max_batch}x{shape}",
                   "trt_profile_max_shapes": f"{input_name}:{max_batch}x{shape}"}
    trt = {"device_id": device_id, **cache, **profile, **({"trt_fp16_enable": True} if fp16 else {})}
    return [("TensorrtExecutionProvider", trt),
            ("CUDAExecutionProvider", {"device_id": device_id})]


class OrtSession(ExportedSession):
    """ONNX Runtime, fp32: the CPU execution provider, or on a CUDA device its TensorRT / CUDA ones (package
    onnxruntime-gpu), else it refuses to start."""

    def __init__(self, model, checkpoint: str | Path, device: torch.device, threads: int | None, max_batch: int = 8):
        import onnxruntime as ort  # only where this backend is chosen

        super().__init__(model, checkpoint)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's default, one per physical core
        options.inter_op_num_threads = 1
        # A pool of several threads waits for work without spinning: spinning took ~3x a batch-1 call's CPU
        # from the decoders and trackers on the same cores, and beside a busy core it doubled the call's time
        # (docs/architecture.md, "CPU under contention"). HYDRAVISION_ORT_SPIN=1 gives ONNX Runtime's own
        # default back, for benchmarks/bench_threads.py to measure against.
        spin = os.environ.get("HYDRAVISION_ORT_SPIN", "0")
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        providers: list = ["CPUExecutionProvider"]
        if device.type == "cuda":
            wanted = gpu_providers(self.path, device.index or 0, "images", model.config.input_size, max_batch)
            providers = [p for p in wanted if p[0] in ort.get_available_providers()] + providers
        # TensorRT builds its engines into the export's cache folder at the session's start, writing them in place:
        # replicas sharing a GPU and a fresh cache built at once, and one could load another's half-written engine.
        # Under the folder's lock the first builds, the others find the engines whole (as OpenVINO's compiles).
        engines = dict(p for p in providers if isinstance(p, tuple)).get("TensorrtExecutionProvider", {}).get(
            "trt_engine_cache_path")
        with compiling(Path(engines)) if engines else contextlib.nullcontext():
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        # ONNX Runtime falls back to its CPU provider without failing (plain onnxruntime has no GPU one, and
        # onnxruntime-gpu's does not load without its CUDA libraries): the model would take the CPU while the
        # replica's GPU sat idle.
        if self.session.get_providers()[0] != "CPUExecutionProvider":
            self.device = str(device)
        elif device.type not in ("cuda", "cpu"):  # an Apple GPU (mps): ONNX Runtime ran on the CPU, unsaid
            raise ValueError(f"backend onnxruntime runs on the CPU or a CUDA device, not on device {device}; set "
                             "model.backend to torch, or model.device to cpu")
        elif device.type == "cuda":
            raise ValueError(f"backend onnxruntime cannot run on device {device} here: ONNX Runtime has no GPU "
                             f"provider it can load (it has {', '.join(ort.get_available_providers())}); install "
                             "onnxruntime-gpu in place of onnxruntime, or set model.backend to torch")

    def infer(self, images: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.names, {"images": images})


class ExactShapes:
    """Models compiled for one batch size each, for the sizes a session runs most; compiled in the background.

    OpenVINO's CPU plugin runs a model compiled for one input shape on 11-20% less CPU per frame than the same
    model with a dynamic batch (one thread, batches of 1-16 on the demo model: docs/architecture.md, "A model
    compiled per batch size"), but each shape holds its own buffers (25-50 MB a size on the demo model), so
    not every size gets one: a size does once it has been ``hot`` of the last ``window`` calls. At most
    ``window // hot`` sizes can be that at once, which bounds how many are kept (the coldest is dropped when
    another becomes hot: the load changed), and a size no call has run for ``idle_s`` is dropped too (those a
    start passes through before the load settles held 25-50 MB each for nothing; a minute, not ``window`` calls,
    so that a size coming and going costs at most a compile a minute). Compiling takes ~0.25 s, on a thread of
    its own: the calls go on at the dynamic shape meanwhile, and a size whose compile fails stays there (logged
    once).

    ``get`` is called from the one thread that runs the calls; only it changes what is ready."""

    def __init__(self, compile_size: Callable[[int], object], window: int = 64, hot: int = 16,
                 idle_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self._compile_size = compile_size
        self.hot, self.cap = hot, window // hot
        self.idle_s, self._clock = idle_s, clock
        self._last_run: dict[int, float] = {}  # size -> when a call last had it
        self._recent: collections.deque[int] = collections.deque(maxlen=window)
        self._counts: collections.Counter[int] = collections.Counter()
        self.ready: dict[int, object] = {}
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._failed: set[int] = set()
        self._wanted: set[int] = set()  # sizes asked for by want(), compiled at their next call however rare
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def get(self, size: int):
        """What ``compile_size(size)`` made, if ready; None: run the dynamic model this time."""
        if len(self._recent) == self._recent.maxlen:
            self._counts[self._recent[0]] -= 1
        self._recent.append(size)
        self._counts[size] += 1
        now = self._last_run[size] = self._clock()
        for idle in [s for s in self.ready if now - self._last_run[s] > self.idle_s]:
            del self.ready[idle]  # a start's or a refused probe's size: its buffers back
        self._collect()
        if ((self._counts[size] >= self.hot or size in self._wanted) and size not in self.ready
                and size not in self._pending and size not in self._failed):
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="exact-shape-compile",
                                                                   initializer=worker_thread,
                                                                   initargs=("hv-compile",))
            self._pending[size] = self._pool.submit(self._compile_size, size)
        return self.ready.get(size)

    def want(self, size: int) -> bool:
        """True once batches of ``size`` run compiled for it, or never will (its compile failed); until then
        asks for it to be compiled at its next call, however rarely it runs (the BatchSizer's probe of a
        larger batch, which should be timed as it would run if adopted). From any thread: it only reads and
        adds to a set."""
        if size in self.ready or size in self._failed:
            return True
        self._wanted.add(size)
        return False

    def wait(self) -> None:
        """Until every compile asked for has finished (tests and benchmarks: a known state)."""
        concurrent.futures.wait(list(self._pending.values()))
        self._collect()

    def _collect(self) -> None:
        for size, future in list(self._pending.items()):
            if not future.done():
                continue
            del self._pending[size]
            self._wanted.discard(size)
            if future.exception() is not None:
                self._failed.add(size)
                log.warning("could not compile the model for batches of %d (%s); they run at the dynamic shape",
                            size, future.exception())
                continue
            if len(self.ready) >= self.cap:
                del self.ready[min(self.ready, key=self._counts.__getitem__)]
            self.ready[size] = future.result()


def openvino_config(hint: str, threads: int | None) -> dict:
    """OpenVINO's CPU compile options for a session: ``hint`` the INFERENCE_PRECISION_HINT ('bf16' or 'f32')."""
    return {
        "INFERENCE_PRECISION_HINT": hint,
        "INFERENCE_NUM_THREADS": threads or 0,  # 0: all cores
        "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,  # one batch at a time, as the Batcher sends them
        "ENABLE_CPU_PINNING": False,  # decoders and other camera processes share these cores
    }


# OpenVINO's compile_model with a CACHE_DIR (writing or loading a compiled form) sets the process's locale to "C"
# for its duration and then puts back the one it found (libopenvino calls setlocale; without a CACHE_DIR it does
# not). setlocale is process-wide: two compiles at once on two threads (one session's ExactShapes compiling in
# the background while another session, of another export, compiles) can have the second save the first's "C"
# and put it back last, leaving LC_CTYPE "C" for good (2 threads compiling 2 batch sizes of one export into one
# CACHE_DIR at once: 8-10 tries in 20 left it); subprocess's text mode and open() then decode UTF-8 as ASCII.
# So compiles are serialized in the process (tests/test_locale_race.py); one export's already were (its
# cache folder's file lock), those of different exports were not.
_COMPILE_LOCK = threading.Lock()


class OpenVinoSession(ExportedSession):
    """OpenVINO's CPU plugin on the same ONNX export: bf16 (``precision`` auto where the CPU runs it natively,
    or bf16), fp32, or int8 (the export quantized, ``models/quantize.py``; the rest of the graph in bf16 where
    native). bf16 keeps the demo model's mAPs within 0.0013 of fp32's, int8 within 0.004 (benchmarks/README.md).
    The batch sizes it runs most also get a model compiled for their exact shape (``ExactShapes``)."""

    def __init__(self, model, checkpoint: str | Path, threads: int | None, precision: str):
        # on the CPU, in a precision it runs: ModelRunner's pick_backend checked that (backend_problem)
        # int8 is quantized from torch's form of GroupNorm: from the faster one it lost accuracy (models/export.py)
        if precision == "int8":
            from models.metadata import read_metadata
            from models.quantize import cached_int8, check_sources

            history = read_metadata(checkpoint)["training"].get("history", [])
            check_sources(checkpoint, history)  # refused before an export and a "quantizing" line are said
        super().__init__(model, checkpoint, "torch" if precision == "int8" else "export")
        if precision == "int8":
            self.path = cached_int8(model, self.path, history)
            self.cache_files.append(self.path)
        if precision in ("bf16", "int8"):
            self.precision = precision
        else:
            self.precision = "bf16" if precision == "auto" and native_bf16() else "fp32"
        # int8: what the quantizer left (normalisation, resizes) runs in bf16 where native.
        rest = "bf16" if self.precision == "bf16" or (self.precision == "int8" and native_bf16()) else "f32"
        self.config = openvino_config(rest, threads)
        # Compiled forms kept beside the export and loaded at the next start (HYDRAVISION_OPENVINO_CACHE=0: always
        # compile, for benchmarks to measure against).
        self.compiled = compiled_cache(self.path) if os.environ.get("HYDRAVISION_OPENVINO_CACHE", "1") != "0" else None
        if self.compiled is not None:
            self.config["CACHE_DIR"] = str(self.compiled)
        self._graph = openvino_core().read_model(str(self.path))  # read once; each exact size compiles a copy
        self.dynamic = self._compile(None)
        ran = self.dynamic[2].get_property("INFERENCE_PRECISION_HINT").get_type_name()
        if rest == "bf16" and ran != "bf16":  # the CPU plugin runs f32 on a CPU without bf16, and says nothing
            capabilities = ", ".join(openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
            log.warning("model.precision %s: this CPU does not run bf16 (OpenVINO's CPU capabilities: %s), so OpenVINO "
                        "runs %s in %s, at fp32's speed", precision, capabilities, self.path.name, ran)
        # HYDRAVISION_OPENVINO_EXACT_SHAPES=0: the dynamic shape only, for benchmarks to measure against.
        exact = os.environ.get("HYDRAVISION_OPENVINO_EXACT_SHAPES", "1") != "0"
        self.exact_shapes = ExactShapes(self._compile) if exact else None
        # Each compiled model's one request is reused (its buffers too); ModelRunner.run is called from one
        # thread at a time (the Batcher's), the lock keeps that true for any other caller.
        self._lock = threading.Lock()

    def _compile(self, size: int | None) -> tuple:
        """(request, outputs, the compiled model, kept alive with its request) for batches of ``size`` (None:
        any size, the export's dynamic batch)."""
        graph = self._graph
        if size is not None:
            graph = graph.clone()  # reshape changes the graph it is called on
            graph.reshape({graph.inputs[0].get_any_name(): [size, *graph.inputs[0].get_partial_shape()[1:]]})
        # A damaged form in the cache (cut short, garbage, a folder in its place: tried) is compiled over.
        # _COMPILE_LOCK: one compile at a time in this process (see there); the folder's file lock serializes
        # only the compiles of this export (any process's), not those of another export on another thread.
        with _COMPILE_LOCK, (compiling(self.compiled) if self.compiled is not None else contextlib.nullcontext()):
            compiled = openvino_core().compile_model(graph, "CPU", self.config)
        request = compiled.create_infer_request()
        if size is not None:  # its first call sets up kernels and buffers: here, not in a camera's batch
            request.infer({0: np.zeros(tuple(compiled.inputs[0].get_shape()), np.uint8)})
        return request, [compiled.output(name) for name in self.names], compiled

    def infer(self, images: np.ndarray) -> list[np.ndarray]:
        with self._lock:
            exact = self.exact_shapes.get(images.shape[0]) if self.exact_shapes else None
            request, outputs, _ = exact or self.dynamic
            result = request.infer({0: images})  # copies the outputs: the next call reuses the buffers
            return [result[o] for o in outputs]


class ModelRunner:
    """Loads a checkpoint once and runs batches: backbone once, each head on the frames that want it."""

    def __init__(self, checkpoint: str | Path, device: str = "auto", precision: str = "auto",
                 threads: int | None = None, score_threshold: float | None = None, max_batch: int = 8,
                 fuse_bn: bool = True, compile: bool = False, backend: str = "auto"):
        if backend not in (*BACKENDS, "auto"):
            raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
        if threads:
            torch.set_num_threads(threads)
        # OpenVINO and int8: 'auto' is the CPU, also on a machine with a GPU (as the config's check reads it)
        self.device = pick_device("cpu" if device == "auto" and runs_on_cpu_only(backend, precision) else device)
        self.autocast = pick_autocast(precision, self.device)
        if self.device.type == "cuda" and self.autocast is None:
            # fp32 asked for: cuDNN runs fp32 convolutions in TF32 (10-bit mantissa) on Ampere and later by default,
            # so "fp32" was not fp32. Process-wide, turned off and never back on: fp16/bf16 runs barely use it.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self.model, _ = load_checkpoint(checkpoint, device=self.device)
        self.backend = pick_backend(backend, self.device, self.autocast, compile, self.model, precision)
        self.session: ExportedSession | None = None
        if self.backend in ("onnxruntime", "openvino"):
            # The runtime computes the graph (on the GPU where ONNX Runtime has its CUDA provider) and hands its
            # outputs over in host memory: what stays in torch (decoding, NMS, attribute and re-ID heads, the
            # export itself) runs on the CPU beside them.
            self.model.to("cpu")
            try:
                self.session = (OrtSession(self.model, checkpoint, self.device, threads, max_batch)
                                if self.backend == "onnxruntime"
                                else OpenVinoSession(self.model, checkpoint, threads, precision))
                # One blank frame of its own size: a runtime that loaded but failed its first call (an op or a
                # provider it cannot run) failed every batch of the run; no caller's input to blame here.
                self.session.detect(np.zeros((1, 3, *self.model.config.input_size), np.uint8), [None],
                                    score_threshold)
            except Exception as e:  # chosen by 'auto' only: torch runs every model, slower on a CPU
                if backend != "auto" or precision == "int8":  # int8 was asked for, and torch does not run it
                    if self.session is not None:
                        # The backend setting is the user's to change: a ConfigError ends `run` (from Ray's text:
                        # workers.settings.refused_setting, which reads one line) and `eval` with one `error:` line,
                        # exit 2, where a RuntimeError was called a bug in hydravision, with a 94-line traceback.
                        from models.hydranet import ConfigError

                        said = next(iter(str(e).strip().splitlines()), "")
                        raise ConfigError(f"model.backend {backend}, precision {precision}: {self.backend} failed on a "
                                          f"blank frame at start ({type(e).__name__}: {said}); set model.backend to "
                                          "torch (precision fp32, bf16 or fp16) to run the model in torch") from e
                    raise
                log.warning("%s could not run %s (%s: %s); running it in torch", self.backend, Path(checkpoint).name,
                            type(e).__name__, e)
                self.backend, self.session = "torch", None
                self.model.to(self.device)
        if self.autocast == torch.float16 and self.device.type == "cpu":  # was accepted without a word
            # one line per process that loads the model (camera processes each load their own)
            log.warning("model.precision fp16 on the CPU (%s): torch runs half precision there on slow kernels, %s "
                        "the CPU per frame of fp32, and cameras drop frames as overload; on a CPU set model.precision "
                        "auto (the exported backends), bf16 or fp32", Path(checkpoint).name, FP16_CPU_COST)
        if fuse_bn:  # serving copy only: one conv instead of conv + BatchNorm, same numbers
            self.model.fuse_batchnorm()
        self.model.to(memory_format=torch.channels_last)  # NHWC convs are faster on oneDNN and cuDNN
        if compile:  # optional: minutes of compilation at start, then fewer kernel launches (mostly a GPU win)
            self.model.backbone = torch.compile(self.model.backbone, dynamic=True)
            self.model.neck = torch.compile(self.model.neck, dynamic=True)
        self.score_threshold = score_threshold
        self.input_size = tuple(self.model.config.input_size)
        if compile:  # torch.compile works at the first call, and again at the first batch of more than one (it
            # specialises size 1): here, not in the cameras' first batches, whose frames expired while it did
            for n in sorted({1, max_batch}):
                x = torch.zeros((n, 3, *self.input_size), dtype=torch.uint8, device=self.device)
                self.model.detect(x.contiguous(memory_format=torch.channels_last), autocast_dtype=self.autocast)
        self.heads = {name: self.model.head_classes(name) for name in self.model.head_names}
        # Page-locked staging buffer: host->GPU copies can then run asynchronously (non_blocking).
        self._staging = None
        if self.device.type == "cuda" and self.session is None:  # torch's own forward pass reads the batch there
            self._staging = torch.empty((max_batch, 3, *self.input_size), dtype=torch.uint8).pin_memory()
        self.stats = {"batches": 0, "frames": 0, "backbone_frames": 0, "head_frames": collections.Counter(),
                      "seconds": 0.0, "cpu_seconds": 0.0, "batch_sizes": collections.Counter()}
        # A one-thread backend computes on the calling thread (torch, ONNX Runtime and OpenVINO alike), so that
        # thread's clock is the model's CPU and leaves out the decoders sharing a camera process with it; with
        # more threads the model's are not told apart from the others', and the process's clock is an upper bound.
        self._cpu_clock = time.thread_time if threads == 1 else time.process_time
        self.batch_seconds = Histogram(BATCH_SECONDS_BUCKETS)
        self.head_seconds = {name: Histogram(HEAD_SECONDS_BUCKETS) for name in self.heads}
        self._time_heads()

    def _time_heads(self) -> None:
        """Times each head's forward pass (its towers and output convs, per batch; decoding and NMS are not in
        it) with forward hooks, so models/ stays free of measurement code. On CUDA the time is what the host
        spends launching the head's kernels, as nothing here synchronizes the device."""
        started: dict[str, float] = {}
        for name, head in self.model.heads.items():
            head.register_forward_pre_hook(lambda _m, _a, name=name: started.__setitem__(name, time.perf_counter()))
            head.register_forward_hook(lambda _m, _a, _o, name=name: self.head_seconds[name].observe(
                time.perf_counter() - started.pop(name, time.perf_counter())))

    def histograms(self) -> dict:
        """Snapshots for metrics: seconds per batch (whole run()), and per head (its forward pass)."""
        return {"batch_seconds": self.batch_seconds.snapshot(),
                "head_seconds": {name: h.snapshot() for name, h in self.head_seconds.items()}}

    def info(self) -> dict:
        return {"input_size": list(self.input_size), "heads": self.heads,
                "device": self.session.device if self.session else str(self.device),
                # the config's names, as the exported runtimes give theirs (it said "torch.bfloat16" beside "bf16")
                "autocast": self.session.precision if self.session else PRECISIONS.get(self.autocast, "fp32"),
                "backend": self.backend, "threads": torch.get_num_threads()}

    def evaluate(self, cfg=None, progress: bool = False) -> dict:
        """``models.evaluate.evaluate``'s scores with the detections computed here (this backend and precision):
        the tolerance check of a backend against torch fp32 (`hydravision eval --backend`, bench_backends.py)."""
        from models.evaluate import EvalConfig, evaluate

        cfg = cfg or EvalConfig()
        kept, self.score_threshold = self.score_threshold, cfg.score_threshold  # run() applies the runner's own
        try:
            return evaluate(self.model, cfg, progress,
                            detect=lambda images, heads, _threshold: self.run(list(images), heads))
        finally:
            self.score_threshold = kept

    def _to_device(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        n = len(images)
        if self._staging is not None and n <= self._staging.shape[0]:
            staged = self._staging[:n]
            for i, img in enumerate(images):
                staged[i].copy_(torch.from_numpy(img))
            return staged.to(self.device, non_blocking=True)
        return torch.from_numpy(np.stack(images)).to(self.device)

    @property
    def _exact(self) -> ExactShapes | None:
        """The session's models per batch size (OpenVINO with them on), else None."""
        return getattr(self.session, "exact_shapes", None)

    def exact_shapes(self) -> list[int]:
        """The batch sizes that run a model compiled for their size now (OpenVINO; ``ExactShapes``)."""
        exact = self._exact
        return sorted(tuple(exact.ready)) if exact else []  # tuple(): one step under the GIL, beside the calls

    def steady(self, size: int) -> bool:
        """Whether batches of ``size`` run at their steady cost now; if not, starts getting them there
        (OpenVINO: compiles the size, ``ExactShapes.want``). The BatchSizer asks before it times a probe."""
        exact = self._exact
        return exact.want(size) if exact else True

    def warm(self, images: Sequence[np.ndarray], heads: Sequence[Sequence[str] | None]) -> None:
        """Runs this batch until it costs what it will in steady state: its shape's kernels built and, on
        OpenVINO, a model compiled for its size. Benchmarks call it before they time a batch size."""
        exact = self._exact
        for _ in range(exact.hot if exact else 2):
            self.run(images, heads)
        if exact:
            exact.wait()
        self.run(images, heads)  # the compiled model's first call

    def run(self, images: Sequence[np.ndarray], heads: Sequence[Sequence[str] | None]) -> list[dict[str, HeadArrays]]:
        """images: (3, H, W) uint8 letterboxed; heads: per image (None = all). Per image {head: arrays}."""
        t0, c0 = time.perf_counter(), self._cpu_clock()
        if self.session is not None:
            x = np.stack(images)
            results = self.session.detect(x, heads, self.score_threshold)
        else:
            x = self._to_device(images).contiguous(memory_format=torch.channels_last)
            results = self.model.detect(x, heads, score_threshold=self.score_threshold, autocast_dtype=self.autocast)
        out = [{name: det.numpy() for name, det in r.items()} for r in to_cpu(results)]
        elapsed = time.perf_counter() - t0
        self.stats["seconds"] += elapsed
        self.batch_seconds.observe(elapsed)
        self.stats["cpu_seconds"] += self._cpu_clock() - c0
        self.stats["batches"] += 1
        self.stats["frames"] += len(images)
        self.stats["backbone_frames"] += int(x.shape[0])
        self.stats["batch_sizes"][len(images)] += 1
        for r in results:
            self.stats["head_frames"].update(r.keys())
        return out
