"""int8 for OpenVINO (``model.precision: int8``): the ONNX export with its convolutions quantized, weights per
channel in int8 and activations per tensor in uint8, as QuantizeLinear/DequantizeLinear pairs that OpenVINO's
CPU plugin runs as int8 kernels (VNNI). Everything else in the graph runs in bf16 or fp32 as before.

Activation ranges are calibrated on frames like the model's training data, found from the checkpoint's
training history: synthetic street frames for the demo model, or the YOLO folder it was trained on. A model
whose training data is not at hand is refused with a message saying so, as a range guessed from other
pictures can cost accuracy unnoticed. onnxruntime's quantizer does the work (already a dependency: the
onnxruntime backend); the result is cached beside the export, one per checkpoint content.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from models.export import cached, damaged, unlike
from models.files import written_aside
from models.hydranet import ConfigError, HydraNet

log = logging.getLogger(__name__)
CALIBRATION_FRAMES = 64  # 32 or 128 moved the demo model's mAPs by under 0.003 (benchmarks/README.md)
CALIBRATION_SEED = 7  # synthetic calibration scenes: training seeds, not the evaluation's
VERSION = "int8-v1"  # in the cache name: change it when the recipe changes


def int8_path(export: Path) -> Path:
    """Beside the export (``models.export.cached_export``), named after it: one per checkpoint content."""
    return export.with_name(f"{export.stem}-{VERSION}-{CALIBRATION_FRAMES}.onnx")


def cached_int8(model: HydraNet, export: Path, history: list[dict[str, Any]]) -> Path:
    """The quantized copy of ``export`` (the model's cached ONNX export), made once (seconds) and cached."""
    # a damaged copy is made again, and as the export one of another model (a cache copied or restored from
    # elsewhere): its fingerprint, kept from the export it was quantized from (damaged), or its inputs and outputs
    return cached(int8_path(export), lambda path: quantize(export, path, calibration_frames(model, history)),
                  f"quantizing {export.name} to int8", check=lambda path: damaged(path) or unlike(path, model))


def check_sources(checkpoint: str | Path, history: list[dict[str, Any]]) -> None:
    """Refuses int8 (``calibration_frames``' ConfigError) where its quantized copy is not cached whole and the
    training data it calibrates on is not at hand: before the export and the "quantizing ... (once; cached at
    ...)" line, which both came before the refusal. A copy quantized before runs without that data."""
    from models.export import cache_path

    made = int8_path(cache_path(checkpoint, "torch"))  # int8 is quantized from torch's GroupNorm form
    if made.is_file() and damaged(made) is None:
        return
    sources = [r for r in history if r.get("data")]
    missing = [r for r in sources if r["data"] != "synthetic" and not Path(str(r["data"])).exists()]
    if missing or not sources:
        calibration_frames(None, missing, n=0)  # raises, before it touches a model or reads a frame


def calibration_frames(model: HydraNet, history: list[dict[str, Any]], n: int = CALIBRATION_FRAMES) -> list[np.ndarray]:
    """``n`` letterboxed (3, H, W) uint8 frames, shared out among the training data the history names."""
    from models.datasets import SyntheticFrames, YoloFolder

    sources = list(dict.fromkeys(str(r["data"]) for r in history if r.get("data")))
    if not sources:
        raise ConfigError("model.precision int8 calibrates on the model's training data, and this checkpoint's "
                          "history names none (e.g. imported weights); use precision auto, bf16 or fp32")
    frames: list[np.ndarray] = []
    for i, data in enumerate(sources):
        want = (n - len(frames)) // (len(sources) - i)
        if data == "synthetic":
            stream = iter(SyntheticFrames(model.config.input_size, seed=CALIBRATION_SEED, augment=False))
            frames += [next(stream).image for _ in range(want)]
            continue
        if not Path(data).exists():  # a folder, or the data.yaml a training was given (YoloFolder reads either)
            raise ConfigError(f"model.precision int8 calibrates on the model's training data; {data} (from the "
                              "checkpoint's history) is not here. Use precision auto, bf16 or fp32, or run where "
                              "that folder is")
        folder = YoloFolder(data, model.config.input_size, augment=False)
        pick = np.random.default_rng(CALIBRATION_SEED).permutation(len(folder))[:want]
        frames += [folder[int(j)].image for j in pick]
    if len(frames) < n:  # a training folder of a few pictures: ranges from so few can clip other scenes
        log.warning("int8 calibrates on %d frames, not %d: the training data (%s) holds fewer pictures than its "
                    "share", len(frames), n, ", ".join(sources))
    return frames


def quantize(src: Path, dst: Path, frames: list[np.ndarray]) -> Path:
    """Writes ``dst`` (atomically): ``src`` with every Conv quantized, ranges from ``frames`` (min/max)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Frames(CalibrationDataReader):
        def __init__(self):
            self.left = iter(frames)

        def get_next(self):
            frame = next(self.left, None)
            return None if frame is None else {"images": frame[None]}

    # The quantizer narrates on the root logger (each bias it copies; its pre-processing advice, every time): a
    # filter there while it runs keeps only its errors. It sees only records logged on the root logger itself.
    narration = _ErrorsOnly()
    logging.getLogger().addFilter(narration)
    try:
        with written_aside(dst, dst.with_name(dst.name + f".{os.getpid()}.tmp")) as tmp:
            # Conv only: the convolutions are ~70% of the model's time (OpenVINO's profile); quantizing the rest
            # (normalisation, resizes) would add conversions and error for little.
            quantize_static(str(src), str(tmp), Frames(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=["Conv"])
    finally:
        logging.getLogger().removeFilter(narration)
    return dst


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR
