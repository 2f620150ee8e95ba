"""A checkpoint's metadata without torch: the service's controller checks a config against the model (heads,
input size) before anything loads it, and importing torch would add a second to every start.
The format itself is described in models/checkpoint.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

FORMAT = "hydravision-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A file that cannot be loaded as a hydravision checkpoint; the message names the file and why."""


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The decoded metadata of a checkpoint (config and training), without loading weights."""
    path = Path(path)
    if path.is_dir():  # it exists: "no such file" sent users looking for a typo
        raise CheckpointError(f"{path}: is a folder; name the checkpoint file (.safetensors) in it")
    if not path.is_file():  # a relative path is of the working directory; the bundled one is named "demo"
        bundled = Path(__file__).resolve().parent / "checkpoints" / "demo.safetensors"
        hint = " (the bundled checkpoint is named 'demo')" if path.name == "demo.safetensors" and \
            path.resolve() != bundled else ""  # 'demo' itself, missing: no hint to write what was written
        raise CheckpointError(f"{path}: no such checkpoint file{hint}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: a safetensors file but not a hydravision checkpoint (no format={FORMAT!r} metadata)")
    version = meta.get("format_version", "?")
    if version != str(FORMAT_VERSION):
        raise CheckpointError(f"{path}: checkpoint format version {version} is not supported (this build reads {FORMAT_VERSION})")
    try:
        config, training = json.loads(meta["config"]), json.loads(meta.get("training", "{}"))
        base = json.loads(meta["base"]) if "base" in meta else None  # an adapter file: what it adds to
    except (KeyError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: JSON nested too deep
        raise CheckpointError(f"{path}: checkpoint metadata is damaged ({e})") from None
    if "base" in meta and not (isinstance(base, dict) and all(isinstance(base.get(k), str)
                                                              for k in ("path", "sha256"))):
        raise CheckpointError(f"{path}: checkpoint metadata is damaged (its base is not a path and a sha256)")
    if not isinstance(config, dict) or not isinstance(training, dict) or not all(
            isinstance(config.get(part, {}), dict) for part in ("heads", "attributes", "adapters", "reid")):
        raise CheckpointError(f"{path}: checkpoint metadata is damaged (its config, heads, attributes, adapters or "
                              "reid are not a mapping)")
    # what the service reads of the metadata alone, before any weights (its cameras' heads and input size): a
    # config without them ended the start in a KeyError
    missing = [key for key in ("input_size", "heads") if key not in config]
    missing += [f"heads.{name}.classes" for name, spec in config.get("heads", {}).items()
                if not (isinstance(spec, dict) and "classes" in spec)]
    if missing:
        raise CheckpointError(f"{path}: checkpoint metadata is damaged (its config has no {', '.join(missing)})")
    for spec in config.get("heads", {}).values():
        if isinstance(spec, dict) and spec.get("type", "fcos") == "fcos":
            spec.setdefault("tower", "conv")  # saved before heads had a choice of tower: FCOS's full convs
    return {"config": config, "training": training, **({"base": base} if "base" in meta else {})}
