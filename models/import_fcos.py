"""A real detector by import: torchvision's COCO-trained FCOS (``fcos_resnet50_fpn``) into a HydraNet.

The file is the state dict torchvision publishes (``fcos_resnet50_fpn_coco-99b0c9b7.pth``, see README);
nothing is downloaded here. Every tensor is mapped by key onto the same architecture in our layout:

  backbone.body.*                          -> backbone.*        ResNet-50 (same keys; its frozen BN has no
                                                                 num_batches_tracked, which we fill with 0)
  backbone.fpn.inner_blocks.{i}[.0].*      -> neck.lateral.{i}.*     (".0" since torchvision 0.13)
  backbone.fpn.layer_blocks.{i}[.0].*      -> neck.output.{i}.*
  backbone.fpn.extra_blocks.p6/p7.*        -> neck.extra.0/1.*       P6 from P5, P7 from relu(P6)
  head.classification_head.conv.{j}.*      -> heads.coco.cls_tower.{j}.*   4 x (conv 3x3, GroupNorm(32), ReLU)
  head.classification_head.cls_logits.*    -> heads.coco.cls_logits.*      the 80 real classes of its 91 rows
  head.regression_head.conv.{j}.*          -> heads.coco.box_tower.{j}.*
  head.regression_head.bbox_reg.*          -> heads.coco.box_ltrb.*
  head.regression_head.bbox_ctrness.*      -> heads.coco.centerness.*

Two facts of torchvision's FCOS make the outputs equal, not just similar: its box code is
``relu(bbox_reg) * anchor size`` with one anchor per location whose size is the level's stride, which
is our ``relu(scale * box_ltrb) * stride`` with every per-level scale at 1; and its anchors are centred
at ``i * stride`` (our heads use ``(i + 0.5) * stride``), so the head's ``center_offset`` is 0.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from models.checkpoint import CheckpointError, compare_state_dict, load_torch_weights
from models.hydranet import HydraNet, HydraNetConfig

# COCO's 80 classes in torchvision's order; its classifier has 91 rows: row 0 is the background and
# rows 12, 26, 29, 30, 45, 66, 68, 69, 71 and 83 are category ids COCO never used ("N/A").
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)
UNUSED_COCO_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
TORCHVISION_ROWS = 91
COCO_ROWS = [i for i in range(1, TORCHVISION_ROWS) if i not in UNUSED_COCO_IDS]  # row of each COCO_CLASSES entry
DEFAULT_INPUT_SIZE = (512, 896)  # torchvision resizes to 800 px on the short side; this is the CPU-friendly size


def coco_fcos_config(input_size: tuple[int, int] = DEFAULT_INPUT_SIZE) -> HydraNetConfig:
    """The architecture of torchvision's fcos_resnet50_fpn as a HydraNet with one 80-class ``coco`` head."""
    return HydraNetConfig(
        input_size=input_size,
        backbone={"type": "resnet", "depth": 50, "width": 64},
        neck={"type": "fpn", "channels": 256, "extra_levels": 2},
        heads={"coco": {"classes": list(COCO_CLASSES), "tower": "split", "tower_convs": 4, "norm_groups": 32,
                        "center_offset": 0.0,
                        # torchvision's inference defaults (its top-k is 1000 per level; ours is global)
                        "score_threshold": 0.2, "nms_iou": 0.6, "max_detections": 100}},
    )


def _our_key(key: str) -> str | None:
    """Our name for one of torchvision's keys, or None for a key that is not part of its FCOS."""
    rules = (
        (r"backbone\.body\.(.+)", r"backbone.\1"),
        (r"backbone\.fpn\.inner_blocks\.(\d+)\.(?:0\.)?(weight|bias)", r"neck.lateral.\1.\2"),
        (r"backbone\.fpn\.layer_blocks\.(\d+)\.(?:0\.)?(weight|bias)", r"neck.output.\1.\2"),
        (r"backbone\.fpn\.extra_blocks\.p6\.(weight|bias)", r"neck.extra.0.\1"),
        (r"backbone\.fpn\.extra_blocks\.p7\.(weight|bias)", r"neck.extra.1.\1"),
        (r"head\.classification_head\.conv\.(\d+)\.(weight|bias)", r"heads.coco.cls_tower.\1.\2"),
        (r"head\.classification_head\.cls_logits\.(weight|bias)", r"heads.coco.cls_logits.\1"),
        (r"head\.regression_head\.conv\.(\d+)\.(weight|bias)", r"heads.coco.box_tower.\1.\2"),
        (r"head\.regression_head\.bbox_reg\.(weight|bias)", r"heads.coco.box_ltrb.\1"),
        (r"head\.regression_head\.bbox_ctrness\.(weight|bias)", r"heads.coco.centerness.\1"),
    )
    for pattern, repl in rules:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def import_torchvision_fcos(path: str | Path, input_size: tuple[int, int] = DEFAULT_INPUT_SIZE) -> HydraNet:
    """Builds the COCO detector from torchvision's FCOS state dict; every key must land, every shape fit."""
    path = Path(path)
    state = load_torch_weights(path)
    model = HydraNet(coco_fcos_config(input_size))
    expected = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    foreign = []
    for key, value in state.items():
        ours = _our_key(key.removeprefix("module."))
        if ours is None:
            foreign.append(key)
            continue
        if ours == "heads.coco.cls_logits.weight" or ours == "heads.coco.cls_logits.bias":
            if value.shape[0] != TORCHVISION_ROWS:
                raise CheckpointError(f"{path}: {key} has {value.shape[0]} class rows; torchvision's COCO FCOS has "
                                      f"{TORCHVISION_ROWS} (background, 80 classes, 10 unused ids)")
            value = value[COCO_ROWS]
        mapped[ours] = value
    if foreign:
        raise CheckpointError(f"{path}: not torchvision's fcos_resnet50_fpn state dict: {len(foreign)} keys it does "
                              f"not have (e.g. {foreign[:5]})")
    for key, value in expected.items():  # frozen BatchNorm keeps no step count; ours does, and never reads it
        if key.endswith("num_batches_tracked") and key not in mapped:
            mapped[key] = torch.zeros_like(value)
    for key in (k for k in expected if re.fullmatch(r"heads\.coco\.scales\.\d+\.scale", k)):
        mapped[key] = torch.ones_like(expected[key])  # torchvision has no per-level scale: 1 is the identity
    problems = compare_state_dict(expected, mapped)
    if problems:
        raise CheckpointError(f"{path}: does not fit torchvision's fcos_resnet50_fpn layout: {problems}")
    model.load_state_dict(mapped)
    return model.eval()
