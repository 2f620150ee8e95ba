"""Self-describing checkpoints: safetensors weights plus the architecture and training metadata.

A checkpoint stores, in the safetensors header metadata (strings only):
  format          "hydravision-checkpoint"
  format_version  "1"
  config          JSON of HydraNetConfig (input size, backbone, neck, heads with class names)
  training        JSON of free-form training metadata (steps, seeds, data, per-head history)
  base            (adapter files only) JSON {"path", "sha256"}: the checkpoint this file adds to
Loading rebuilds the model from ``config`` and checks every tensor's name and shape.

An adapter file (a LoRA fine-tune, ``models/lora.py``) holds only the tensors its base lacks: the adapter
and its new heads. ``config`` is the whole model's, so the service reads heads and input size from it as
from any checkpoint; loading reads the base's tensors too (its path is relative to the adapter file, and
its SHA-256 must still match: an adapter trained on other weights would silently compute something else).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.files import aside_of, file_identity, written_aside
from models.hydranet import ConfigError, HydraNet, HydraNetConfig
from models.metadata import FORMAT, FORMAT_VERSION, CheckpointError, read_metadata  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


@contextlib.contextmanager
def training_into(out: str | Path) -> Iterator[None]:
    """Held while a training writes ``out`` (and its resume state beside it); ``prepare_output`` done. One run per
    output at a time: two both trained, shared (and overwrote) the resume state, and the last to finish replaced
    the other's model, both exit 0. A file lock beside it (the kernel releases it if the run dies), as exports
    take; a second run is refused at once."""
    from models.export import file_lock  # the exports' lock

    out = Path(out)
    if not (out.parent.is_dir() and os.access(out.parent, os.W_OK)):
        prepare_output(out)  # makes the folder the lock is made in, or says why it cannot be written
    lock = out.with_name(out.name + ".lock")
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(file_lock(lock, remove=True, wait=False))
        except BlockingIOError:
            raise ConfigError(f"--out {out}: another training run is writing it now (it holds {lock}); wait for "
                              "it to finish, or name another --out") from None
        prepare_output(out)  # before any training: not when its result is saved
        yield


def prepare_output(path: str | Path) -> Path:
    """Makes the folder of a checkpoint a training will write, before the training: a name that cannot be written
    must fail in the first second, not when the finished model is saved. Says when it will replace a file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; name the .safetensors file to write in it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{path}: cannot make its folder ({e.strerror or e})") from None
    if not os.access(path.parent, os.W_OK):
        raise ConfigError(f"{path}: its folder is not writable")
    if path.exists():
        log.warning("%s exists: the training replaces it when it finishes", path)
    return path


def save_checkpoint(model: HydraNet, path: str | Path, training: dict[str, Any] | None = None,
                    base: str | Path | None = None) -> Path:
    """Writes the model; with ``base``, only the tensors ``base`` lacks (every tensor it has must be unchanged)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(model.config.to_dict()),
        "training": json.dumps(training or {}),
    }
    if base is not None:
        base = Path(base)
        shared = read_tensors(base)
        changed = [k for k, v in shared.items() if k not in tensors or not torch.equal(v, tensors[k])]
        if changed:  # a bug in the caller: the file would load as a model that was never trained
            raise RuntimeError(f"{path}: cannot be written as additions to {base}: {len(changed)} of its tensors "
                               f"differ (e.g. {changed[:5]})")
        tensors = {k: v for k, v in tensors.items() if k not in shared}
        metadata["base"] = json.dumps({"path": os.path.relpath(base.resolve(), path.parent.resolve()),
                                       "sha256": file_sha256(base)})
    if base is not None and path.resolve() in [p.resolve() for p in checkpoint_files(base)]:
        raise RuntimeError(f"{path}: would overwrite its own base")  # a caller's bug: TrainConfig, train() refuse it
    with written_aside(path, aside_of(path)) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600: a service running as another user could not read it
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[HydraNet, dict[str, Any]]:
    """Rebuilds the model a checkpoint describes and loads its weights; returns (model in eval mode, training meta)."""
    path = Path(path)
    meta = read_metadata(path)
    identity = file_identity(path)  # before its tensors are read: what an export of them is filed under must match
    try:
        config = HydraNetConfig.from_dict(meta["config"])
        model = HydraNet(config)
    except (ValueError, TypeError) as e:  # ConfigError among them; a ValueError: e.g. an input_size of letters
        raise CheckpointError(f"{path}: cannot build the architecture it describes: {e}") from None
    tensors = read_tensors(path, meta)
    problems = compare_state_dict(model.state_dict(), tensors)
    if problems:
        raise CheckpointError(f"{path}: weights do not match the architecture it describes: {problems}")
    model.load_state_dict(tensors)
    model.checkpoint_identity = identity  # models/export.py:cached_export checks the file is still this one
    return model.to(device).eval(), meta["training"]


def checkpoint_files(path: str | Path) -> list[Path]:
    """The files a checkpoint loads from: itself, the checkpoint it adds to (an adapter file's base), its base..."""
    files = [Path(path)]
    while files[-1].is_file() and "base" in (meta := read_metadata(files[-1])):
        base = files[-1].resolve().parent / meta["base"]["path"]  # relative to the file itself, as saved
        if base.resolve() in [f.resolve() for f in files]:
            break  # a loop: reading its tensors says what is wrong
        files.append(base)
    return files


def read_tensors(path: str | Path, meta: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, its base's included when it is an adapter file."""
    path = Path(path)
    meta = meta or read_metadata(path)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if "base" not in meta:
        return tensors
    # relative to where the file really is (save_checkpoint wrote it so): a symlink to it elsewhere looked beside itself
    base = path.resolve().parent / meta["base"]["path"]
    if not base.is_file():
        raise CheckpointError(f"{path}: adds to the checkpoint {base}, which is missing (keep the two files "
                              "where they were relative to each other)")
    digest = file_sha256(base)
    if digest != meta["base"]["sha256"]:
        raise CheckpointError(f"{path}: adds to {base}, which has changed since (sha256 {digest[:12]}, expected "
                              f"{meta['base']['sha256'][:12]}): the adapter was trained on other weights")
    return {**read_tensors(base), **tensors}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def compare_state_dict(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], limit: int = 5) -> str:
    """'' when names and shapes agree, else a short description of the first differences."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [
        f"{k}: expected {tuple(expected[k].shape)}, got {tuple(found[k].shape)}"
        for k in sorted(set(expected) & set(found))
        if tuple(expected[k].shape) != tuple(found[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[:limit]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:limit]})")
    if shapes:
        parts.append(f"{len(shapes)} with wrong shape ({'; '.join(shapes[:limit])})")
    return "; ".join(parts)


def load_torch_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A ``torch.save``d state dict of tensors (optionally under "state_dict"), loaded safely.

    Uses ``torch.load(weights_only=True)``, so a pickle that carries code is refused.
    """
    path = Path(path)
    if path.is_dir():  # it exists: "no such weights file" sent users looking for a typo
        raise CheckpointError(f"{path}: is a folder; name the weights file (.pth) in it")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(f"{path}: refused: it holds pickled objects other than tensors{what}, "
                              "and loading them could run code from the file") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, ... for files that are not torch.save output
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a PyTorch weights file ({first})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return state


def import_backbone_weights(model: HydraNet, path: str | Path) -> list[str]:
    """Loads a plain PyTorch state dict of the backbone's published layout (torchvision's ImageNet
    ``resnet18``..``resnet101``, ``vit_b_16``, ``mobilenet_v3_large``/``_small``) into the model's backbone.

    Keys may carry a ``module.``, ``backbone.`` or ``body.`` prefix. The file's ImageNet classifier (``fc.*``,
    ``heads.*``, ``classifier.*``) is ignored unless the backbone keeps one (``num_classes``). Every other key
    must be one of the backbone's, with its shape; only our own additions (the ViT's pyramid) may be absent.
    Returns the keys that were loaded.
    """
    return load_pretrained(model.backbone, load_torch_weights(path), f"{path} ({model.config.backbone})")


def load_pretrained(backbone: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> list[str]:
    """``state`` into ``backbone`` key by key (see ``import_backbone_weights``); errors name ``what``."""
    classifier = getattr(backbone, "classifier_prefix", "")
    keeps_classifier = getattr(getattr(backbone, "config", None), "num_classes", None) is not None
    cleaned = {}
    for k, v in state.items():
        for prefix in ("module.", "backbone.", "body."):
            k = k.removeprefix(prefix)
        k = backbone.published_key(k) if hasattr(backbone, "published_key") else k
        if keeps_classifier or not classifier or not k.startswith(classifier):
            cleaned[k] = v
    new = tuple(getattr(backbone, "new_prefixes", ()))
    expected = {k: v for k, v in backbone.state_dict().items() if not (new and k.startswith(new))}
    for k, v in expected.items():  # torchvision's ResNet files predate BatchNorm's counter: it starts at 0
        if k.endswith("num_batches_tracked") and k not in cleaned:
            cleaned[k] = torch.zeros_like(v)
    problems = compare_state_dict(expected, cleaned)
    if problems:
        raise CheckpointError(f"{what}: does not fit this backbone: {problems}")
    backbone.load_state_dict(cleaned, strict=not new)
    return sorted(cleaned)
