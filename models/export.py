"""ONNX export of a HydraNet for ONNX Runtime: uint8 letterboxed images in, the pyramid and every head's raw
outputs out.

Decoding, NMS and attribute heads stay in torch (``HydraNet.decode``): they are small, data-dependent and
already shared with the eager path, so both paths give the same detections from the same raw outputs. The
batch dimension is dynamic. Exports are cached by checkpoint content (``cached_export``): the exporter takes
seconds, a service start should not pay them twice.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import glob
import hashlib
import io
import logging
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from models.files import STALE_ASIDE_S, file_identity, written_aside
from models.fuse import fuse_conv_bn
from models.hydranet import ConfigError, HydraNet
from models.metadata import CheckpointError

log = logging.getLogger(__name__)
OPSET = 18
# A cache file not used for this long is removed when another one is made: each checkpoint, torch version and
# exporter gets a file of its own (tens to hundreds of MB for large backbones), and a service retrained weekly
# would otherwise fill the disk. Using a file refreshes its time; one removed while still wanted is made again.
CACHE_MAX_AGE_DAYS = 30
RAW_KEYS = ("cls_logits", "box_ltrb", "centerness")
COMPILED_SUFFIX = ".compiled"  # beside an export: the folder of OpenVINO's compiled forms of it (compiled_cache)
# An export's metadata_props entry naming what it was made from (its ``cache_key``): a cache copied or restored from
# elsewhere can hold another checkpoint's export under this one's name, which every start then ran (or failed on).
FINGERPRINT = "hydravision.cache_key"


def output_names(model: HydraNet) -> list[str]:
    return [f"p{i}" for i in range(len(model.strides))] + [f"{h}.{k}" for h in model.head_names for k in RAW_KEYS]


class GroupNormForExport(nn.Module):
    """``nn.GroupNorm``'s arithmetic (biased variance, two passes) written without reshaping the activation:
    per-channel spatial means, averaged into groups on the small (N, C) statistics. torch exports GroupNorm as
    Reshape, InstanceNormalization, Reshape, which makes OpenVINO's CPU plugin move each head activation out of
    its blocked layout and back (``Reorder``s); this form costs the demo model's OpenVINO call ~10% less CPU in
    bf16 and ~20% in fp32, with the same outputs in fp32 (benchmarks/README.md, "GroupNorm in the export").
    The int8 graph is quantized from torch's form (``group_norm="torch"``): quantized from this one, its held-out
    mAP@0.5:0.95 fell 0.006-0.009 below fp32's, against 0.0014 from torch's form."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.groups, self.eps, self.weight, self.bias = norm.num_groups, norm.eps, norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]

        def per_group(v: torch.Tensor) -> torch.Tensor:  # (N, C, 1, 1) per channel -> its group's mean, per channel
            grouped = v.reshape(n, self.groups, c // self.groups)
            return grouped.mean(2, keepdim=True).expand_as(grouped).reshape(n, c, 1, 1)

        centred = x - per_group(x.mean((2, 3), keepdim=True))  # channels of a group have equal counts: the
        var = per_group((centred * centred).mean((2, 3), keepdim=True))  # mean of their means is the group's
        scale = torch.rsqrt(var + self.eps) * self.weight.view(1, c, 1, 1)
        return centred * scale + self.bias.view(1, c, 1, 1)


def export_group_norms(model: nn.Module) -> None:
    """Replaces every affine ``nn.GroupNorm`` in ``model`` by ``GroupNormForExport`` (the same parameters)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.GroupNorm) and child.affine:
                setattr(parent, name, GroupNormForExport(child))


class _Graph(nn.Module):
    def __init__(self, model: HydraNet):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.model.features(self.model.normalize(images))
        outs = [self.model.heads[h](feats) for h in self.model.head_names]
        return (*feats, *(o[k] for o in outs for k in RAW_KEYS))


EXPORTERS = ("torchscript", "dynamo")
EXPORTER = "torchscript"  # the one the cache holds


GROUP_NORMS = ("export", "torch")  # GroupNormForExport, or torch's own export of nn.GroupNorm


def check_exportable(model: HydraNet) -> None:
    """Refuses a model the export cannot carry: before any "exporting ..." line is logged for it. (A stand-in
    for the model, with no ``adapters``, has none.)"""
    if getattr(model, "adapters", None):  # the graph computes every head from one pyramid; adapter heads need their own
        raise ConfigError(f"models with LoRA adapters ({', '.join(model.adapters)}) are not exported to ONNX; "
                          "use the torch backend")


def export_onnx(model: HydraNet, path: str | Path, exporter: str = EXPORTER, group_norm: str = "export",
                metadata: dict[str, str] | None = None) -> Path:
    """Writes ``path`` (atomically); BatchNorm is folded first, as the eager serving path does, and GroupNorm
    written as ``GroupNormForExport`` (``group_norm="torch"``: as torch exports it). ``metadata``: added to the
    model's metadata_props (the cache's ``FINGERPRINT``).

    ``exporter``: torch's TorchScript exporter (the default) or its torch.export one ("dynamo"). The first is
    deprecated since torch 2.9 but still in the pinned 2.13, and exports the demo model 7.5x faster (1.3
    against 9.8 s) to a graph with the same outputs and speed in ONNX Runtime (benchmarks/bench_export.py);
    switch the default when a torch drops it."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter: {exporter!r} is not one of {EXPORTERS}")
    if group_norm not in GROUP_NORMS:
        raise ValueError(f"group_norm: {group_norm!r} is not one of {GROUP_NORMS}")
    check_exportable(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    serving = copy.deepcopy(model).float().cpu().eval()  # the example input below is a host tensor
    fuse_conv_bn(serving.backbone)
    if group_norm == "export":
        export_group_norms(serving)
    h, w = serving.config.input_size
    example = torch.zeros((2, 3, h, w), dtype=torch.uint8)
    names = output_names(serving)
    # Quiet: the exporters' own notices (torchvision's ops not installed, IR passes logged at INFO).
    quiet = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir", "onnxscript")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), written_aside(path, path.with_name(path.name + f".{os.getpid()}.tmp")) as tmp:
            # the exporters narrate their passes (and the deprecation) as warnings
            warnings.simplefilter("ignore")
            # The two differ only in how the batch dimension is declared dynamic (and the newer one's file layout).
            how = ({"dynamo": False, "dynamic_axes": {name: {0: "batch"} for name in ["images", *names]}}
                   if exporter == "torchscript" else
                   {"dynamo": True, "verbose": False, "external_data": False,  # one file (protobuf's 2 GB limit)
                    "dynamic_shapes": ({0: torch.export.Dim("batch", min=1, max=1024)},)})
            torch.onnx.export(_Graph(serving), (example,), str(tmp), input_names=["images"], output_names=names,
                              opset_version=OPSET, **how)
            append_metadata(tmp, metadata or {})
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("HYDRAVISION_CACHE", "~/.cache/hydravision")).expanduser() / "onnx"


def cache_key(checkpoint: str | Path, group_norm: str = "export") -> str:
    """What an export is made from: the checkpoint's content, torch version, opset, exporter and GroupNorm form."""
    digest = hashlib.sha256()
    with open(checkpoint, "rb") as f:  # in chunks: read whole, a checkpoint of GBs took as much memory to hash
        for chunk in iter(lambda: f.read(1 << 20), b""):  # not hashlib.file_digest: Python 3.10 has none
            digest.update(chunk)
    digest.update(f"{torch.__version__}/{OPSET}/{EXPORTER}/{group_norm}".encode())  # each changes the graph
    return digest.hexdigest()[:16]


def made_for(folder: Path, key: str) -> Path | None:
    """The export made for ``key`` under any checkpoint name (the first by name), if there is one."""
    made = sorted(p for p in folder.glob(f"*-{key}.onnx") if p.is_file())
    return made[0] if made else None


def cache_path(checkpoint: str | Path, group_norm: str = "export", key: str | None = None) -> Path:
    """Where ``cached_export`` keeps the ONNX file of this checkpoint content, torch version, opset, exporter
    and GroupNorm form (``key``: their ``cache_key``, if known): the file made for them under any checkpoint
    name, else one named after this one."""
    key = key or cache_key(checkpoint, group_norm)
    # The stem is for people; the key finds the file: the same weights under another name (a replica's copy in
    # its temp dir, a renamed or versioned file) found none and exported again beside the one there (the image's).
    # The first by name: every name of these weights gets the same file, and so its compiled forms.
    return made_for(cache_dir(), key) or cache_dir() / f"{Path(checkpoint).stem}-{key}.onnx"


def cached_export(model: HydraNet, checkpoint: str | Path, group_norm: str = "export",
                  made: list[Path] | None = None) -> Path:
    """The ONNX file for this checkpoint, exported once per checkpoint content, torch version, opset, exporter
    and GroupNorm form. ``made``: as ``cached``'s."""
    check_exportable(model)  # refused before the cache's "exporting ... (once; cached at ...)" line
    key = cache_key(checkpoint, group_norm)
    # The key is the file's content now: a checkpoint copied over it since ``model`` was loaded from it had the old
    # weights' graph filed under the new content, which every later start of the new checkpoint then ran.
    loaded = getattr(model, "checkpoint_identity", None)
    if loaded is not None and file_identity(checkpoint) != loaded:
        raise CheckpointError(f"{checkpoint}: replaced while it was being loaded; start again to load the new one")
    # A whole file can still be another model's (a cache copied or restored from elsewhere): its fingerprint says
    # so (damaged), and for one exported before fingerprints its inputs and outputs (unlike).
    return cached(cache_path(checkpoint, group_norm, key),
                  lambda path: export_onnx(model, path, group_norm=group_norm, metadata={FINGERPRINT: key}),
                  f"exporting {checkpoint} to ONNX", key, lambda path: damaged(path) or unlike(path, model), made)


def cached(path: Path, make: Callable[[Path], object], what: str, key: str | None = None,
           check: Callable[[Path], str | None] | None = None, made: list[Path] | None = None) -> Path:
    """``path``, made by ``make(path)`` (which writes it atomically) unless it is there already; making one
    removes the files of its folder not used for ``CACHE_MAX_AGE_DAYS`` (``prune_cache``). ``key``: an export's
    ``cache_key``; the lock is then the key's, and the file made for it under another checkpoint name is taken.
    ``check``: why a file found there is not whole (e.g. ``damaged``), or None; one that is not is said, removed
    with its compiled forms, and made again. ``made``: the path is appended to it when this call made the file (not
    when it found it, made before or by another process while this one waited for the lock)."""
    # A damaged file (cut short on a copied or restored cache, a failing disk) failed every start that loaded it,
    # or ran torch for good under 'auto': said once, removed and made again. One made while we waited is whole.
    why = check(path) if check and path.is_file() else None
    if path.is_file() and not why:
        mark_used(path)
        return path
    try:
        found = file_identity(path) if why else None
    except FileNotFoundError:  # another process that found it damaged too removed it meanwhile (and makes it again)
        found = None
    path.parent.mkdir(parents=True, exist_ok=True)
    # Replicas starting together on a fresh cache: one makes the file, the others wait for it (a file lock, as
    # they are separate processes; the kernel releases it if the maker dies). An export's lock is its content's:
    # one per file name let two names of the same weights (two replicas' temp copies) both export.
    with file_lock(path.with_name(f"{key}.lock" if key else path.name + ".lock"), remove=True):
        if why and path.is_file() and file_identity(path) == found:  # not replaced by another process meanwhile
            log.warning("%s in the model cache is damaged or stale (%s): removed, making it again", path.name, why)
            # with what was made from it: its int8 copies (models/quantize.py:int8_path), kept, were another model's
            # graph run beside the new export ("Output for tensor name ... is not found"), and their compiled forms
            for gone in [path, *path.parent.glob(f"{glob.escape(path.stem)}-int8-*.onnx")]:
                shutil.rmtree(gone.with_name(gone.name + COMPILED_SUFFIX), ignore_errors=True)
                gone.unlink(missing_ok=True)
        path = (made_for(path.parent, key) if key else None) or path  # made meanwhile, under another name?
        if not path.is_file():
            # what makers killed half-way left (nobody else writes there: we hold its lock)
            for leftover in path.parent.glob(f"*-{key}.onnx.*.tmp" if key else f"{glob.escape(path.name)}.*.tmp"):
                leftover.unlink(missing_ok=True)
            log.info("%s (once; cached at %s)", what, path)
            # before making: on a disk the cache filled, the old files' space is what lets the new one be written
            prune_cache(path.parent)
            started = time.monotonic()
            make(path)
            # its end too: an export (48 s) or a first int8 quantization (36 s) was silent until the next line
            log.info("%s: done in %.0f s", what, time.monotonic() - started)
            if made is not None:
                made.append(path)
        else:  # not there before the lock: the process we waited for made it
            log.info("%s was made meanwhile by another process: using it", path)
    return path


def damaged(path: Path) -> str | None:
    """Why the ONNX file ``path`` is not whole (cut short, empty, not an ONNX model), or not the export (or int8
    copy) its cache name says (its ``FINGERPRINT`` is another key than the name's: another checkpoint's export
    copied over it), or None. Its top-level protobuf fields only, skipped by their lengths: a few reads whatever
    the file's size. By hand: importing the onnx package to check it cost every start 1.1-1.6 s."""
    seen = set()
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            while f.tell() < size:
                key = _varint(f)
                field, kind = key >> 3, key & 7
                if field == 0:  # no protobuf field is numbered 0 (a file of zeros: said at once, not read through)
                    return f"not an ONNX model (field 0 at byte {f.tell()})"
                if kind == 0:
                    _varint(f)
                elif kind in (1, 2, 5):
                    f.seek({1: 8, 5: 4}.get(kind) or _varint(f), os.SEEK_CUR)
                else:
                    return f"not an ONNX model (wire type {kind} at byte {f.tell()})"
                if f.tell() > size:
                    return f"cut short: {size} bytes, its field {field} ends at byte {f.tell()}"
                seen.add(field)
    except EOFError:
        return f"cut short: {size} bytes, the last field unfinished"
    except OSError:  # gone meanwhile, or unreadable: not judged here (the runtime's load says why)
        return None
    needed = {1: "ir_version", 7: "graph", 8: "opset_import"}  # ModelProto's fields every runtime reads
    missing = [name for field, name in needed.items() if field not in seen]
    if missing:
        return f"not an ONNX model: no {', '.join(missing)} ({size} bytes)"
    # a cache name (cache_path) or its int8 copy's (models/quantize.py:int8_path; the quantizer keeps the metadata)
    named = re.fullmatch(r".*-([0-9a-f]{16})(-int8-v[0-9]+-[0-9]+)?\.onnx", path.name)
    made_from = fingerprint(path) if named else None  # whole now: its few top-level fields read again
    if named and made_from and made_from != named[1]:
        return f"exported from other weights: its fingerprint is {made_from}, its name's {named[1]}"
    return None


def _read_entry(data: bytes, into: dict[str, str]) -> None:
    """A StringStringEntryProto's key and value into ``into`` (one that does not read as such is left out: it
    judges nothing)."""
    fields = dict(_message_fields(data))
    if isinstance(fields.get(1), bytes) and isinstance(fields.get(2), bytes):
        with contextlib.suppress(UnicodeDecodeError):
            into[fields[1].decode()] = fields[2].decode()


def fingerprint(path: Path) -> str | None:
    """The ONNX file's ``FINGERPRINT`` (the ``cache_key`` it was exported for), or None: none (exported before
    fingerprints, or by hand) or not readable."""
    metadata: dict[str, str] = {}
    try:
        with open(path, "rb") as f:
            for field, kind, length in _fields(f, os.fstat(f.fileno()).st_size):
                if field == 14 and kind == 2 and length <= 4096:  # metadata_props, as ``damaged`` reads them
                    _read_entry(f.read(length), metadata)
    except (OSError, EOFError):
        return None
    return metadata.get(FINGERPRINT)


def _message_fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field, value) of a protobuf message held in memory: varints as ints, length-delimited fields as bytes
    (others skipped); stops where the data does not read as one."""
    f = io.BytesIO(data)
    try:
        while f.tell() < len(data):
            key = _varint(f)
            kind = key & 7
            if kind == 0:
                yield key >> 3, _varint(f)
            elif kind == 2:
                length = _varint(f)
                value = f.read(length)
                if len(value) < length:
                    return
                yield key >> 3, value
            elif kind in (1, 5):
                f.seek({1: 8, 5: 4}[kind], os.SEEK_CUR)
            else:
                return
    except EOFError:
        return


def append_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Adds ``metadata`` to the ONNX file's metadata_props by appending to the file: protobuf reads a message's
    fields in any order and adds up repeated ones, so nothing is parsed (nor the onnx package imported)."""
    with open(path, "ab") as f:
        for key, value in metadata.items():
            f.write(_length_field(14, _length_field(1, key.encode()) + _length_field(2, value.encode())))


def _length_field(number: int, data: bytes) -> bytes:
    return _varint_bytes(number << 3 | 2) + _varint_bytes(len(data)) + data


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes([*out, value])


def graph_io(path: Path) -> tuple[dict[str, list[int | str]], list[str]]:
    """The ONNX file's graph inputs ({name: dims, a dynamic one by its name}) and output names, read by hand as
    ``damaged`` does: the graph's nodes and weights are skipped by their lengths."""
    inputs: dict[str, list[int | str]] = {}
    outputs: list[str] = []
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for field, kind, length in _fields(f, size):
            if field != 7 or kind != 2:
                continue
            for part, part_kind, part_length in _fields(f, f.tell() + length):
                if part in (11, 12) and part_kind == 2:  # GraphProto.input / .output: ValueInfoProto
                    info = dict(_message_fields(f.read(part_length)))
                    name = info.get(1, b"").decode(errors="replace")
                    if part == 12:
                        outputs.append(name)
                    else:
                        inputs[name] = _dims(info.get(2, b""))
    return inputs, outputs


def _fields(f, end: int) -> Iterator[tuple[int, int, int]]:
    """(field, wire type, length of a length-delimited one) of the message from ``f``'s position to ``end``; the
    caller may read a field's bytes, what it leaves is skipped."""
    while f.tell() < end:
        key = _varint(f)
        kind = key & 7
        if kind == 0:
            _varint(f)
            continue
        if kind != 2:
            f.seek({1: 8, 5: 4}.get(kind, 0), os.SEEK_CUR)
            continue
        length = _varint(f)
        start = f.tell()
        yield key >> 3, kind, length
        f.seek(start + length)


def _dims(type_proto: bytes) -> list[int | str]:
    """A TypeProto's tensor dims: each dim_value, or its dim_param's name."""
    tensor = dict(_message_fields(type_proto)).get(1, b"")  # TypeProto.tensor_type
    shape = dict(_message_fields(tensor)).get(2, b"")  # .shape
    dims: list[int | str] = []
    for field, dim in _message_fields(shape):
        if field == 1:  # TensorShapeProto.dim
            value = dict(_message_fields(dim))
            dims.append(value[1] if 1 in value else value.get(2, b"?").decode(errors="replace"))
    return dims


def unlike(path: Path, model: HydraNet | None) -> str | None:
    """How the whole ONNX file ``path`` differs from ``model``'s export (its heads or other outputs, its input
    size), or None; None without a model (a stand-in). What an export made before ``FINGERPRINT`` existed is
    judged by; one with a fingerprint is judged by that too (``damaged``)."""
    if model is None:
        return None
    try:
        inputs, outputs = graph_io(path)
    except (OSError, EOFError) as e:  # gone meanwhile, unreadable: the runtime's load says why
        log.debug("%s: graph not read (%s)", path, e)
        return None
    names, (h, w) = output_names(model), model.config.input_size
    if outputs != names:
        theirs, ours = (list(dict.fromkeys(n.split(".")[0] for n in o if "." in n)) for o in (outputs, names))
        if theirs != ours:
            return f"another model's export: its heads are {', '.join(theirs)}, this checkpoint's {', '.join(ours)}"
        return f"another model's export: its outputs are {', '.join(outputs)}, this checkpoint's {', '.join(names)}"
    dims = inputs.get("images")
    if dims is None or [str(d) for d in dims[1:]] != ["3", str(h), str(w)]:
        return (f"another model's export: its input is {', '.join(f'{k} {dims}' for k, dims in inputs.items())}, "
                f"this checkpoint's images [batch, 3, {h}, {w}]")
    return None


def _varint(f) -> int:
    value = shift = 0
    while True:
        byte = f.read(1)
        if not byte:
            raise EOFError
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7


def compiled_cache(export: Path) -> Path | None:
    """The folder where OpenVINO keeps the compiled forms of ``export`` (its CACHE_DIR: one file per input shape
    and compile options), made if needed and marked used; None where it cannot be written (a read-only cache:
    the model is then compiled at every start, as without one). Loading a compiled form took 0.06 s where
    compiling the demo model took 0.27-0.32 s (docs/architecture.md, "Compiled forms kept on disk")."""
    folder = export.with_name(export.name + COMPILED_SUFFIX)
    try:
        folder.mkdir(exist_ok=True)
    except OSError:
        return None
    if not os.access(folder, os.W_OK):
        return None
    mark_used(folder)
    return folder


def compiling(folder: Path) -> contextlib.AbstractContextManager[None]:
    """Holds ``folder``'s lock across processes while OpenVINO compiles into it: it writes a compiled form in
    place (no temporary file), so another process starting the same model meanwhile could read half of one.
    Under the lock, the first process writes it and the others find it whole."""
    # removed since the session made it (by hand, a tmp cleaner): made again, or every later compile failed
    folder.mkdir(parents=True, exist_ok=True)
    return file_lock(folder / "lock")


@contextlib.contextmanager
def file_lock(path: Path, remove: bool = False, wait: bool = True) -> Iterator[None]:
    """An exclusive lock on the file ``path`` (made if missing), held across processes; the kernel releases it
    if the holder dies. ``remove``: the file is removed when the block ends (also when it fails). ``wait``: False
    raises BlockingIOError at once where another process holds it."""
    said = False
    while True:
        lock = open(path, "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a replica waited minutes in silence for another's export of a large model
            if not wait:
                lock.close()
                raise
            if not said:
                log.info("waiting for another process that holds %s (making or compiling this model)", path)
                said = True
            fcntl.flock(lock, fcntl.LOCK_EX)
        # A lock file removed while we waited is no one's lock: take the one now at ``path``, as the others do
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(lock.fileno()).st_ino == os.stat(path).st_ino:
                break
        lock.close()
    with lock:
        try:
            yield
        finally:
            if remove:
                path.unlink(missing_ok=True)


def mark_used(path: Path) -> None:
    """Marks a cache file used now (its mtime), so that pruning keeps it; a read-only cache is left as it is."""
    try:
        os.utime(path)
    except OSError:
        pass


def prune_cache(folder: Path, max_age_days: float = CACHE_MAX_AGE_DAYS, now: float | None = None) -> list[Path]:
    """Removes the ONNX files in ``folder`` not used (made or loaded) for ``max_age_days``, their compiled forms
    (``compiled_cache``) with them or as long unused, and leftovers of exports that died half-way (``*.tmp``)
    older than a day. Returns what it removed."""
    now = time.time() if now is None else now
    removed = []
    for path in sorted(folder.iterdir(), key=lambda p: p.name.endswith(COMPILED_SUFFIX)):  # exports first
        orphan = False
        if path.name.endswith(".tmp"):
            limit = STALE_ASIDE_S
        elif path.name.endswith(".onnx"):
            limit = max_age_days * 86400.0
        elif path.name.endswith(COMPILED_SUFFIX) and path.is_dir():
            # without its export (removed above, or by hand) nobody loads it again: it goes at once
            orphan = not path.with_name(path.name[:-len(COMPILED_SUFFIX)]).is_file()
            limit = max_age_days * 86400.0
        else:
            continue  # not ours (locks are removed by their holders)
        try:
            stat = path.stat()
            if orphan or now - stat.st_mtime > limit:
                # rglob: TensorRT's engines are in a folder of their own inside (gpu_providers)
                size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else stat.st_size
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                removed.append(path)
                why = "its export is gone" if orphan else f"unused for {(now - stat.st_mtime) / 86400:.0f} days"
                log.info("removed %s from the model cache (%.0f MB, %s)", path.name, size / 1e6, why)
        except OSError:  # another process removed it first, or the cache is not ours to change
            continue
    return removed
