"""HydraNet: one backbone and neck run once per frame, several named detection heads on the shared features."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

import torch
from torch import nn

from models.attributes import AttributeConfig, AttributeHead
from models.fpn import FPN, FPNConfig
from models.fuse import fuse_conv_bn
from models.backbone import Carry
from models.heads import DetectionHead, HeadConfig
from models.lora import LoRA, LoRAConfig
from models.mobilenet import MobileNetConfig, MobileNetV3
from models.pan import PAN, PANConfig
from models.postprocess import HeadDetections, make_points, postprocess
from models.reid import EmbeddingHead, ReIDConfig
from models.resnet import ResNet, ResNetConfig
from models.vit import ViT, ViTConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Architecture registries: a checkpoint names its parts by these keys. A backbone is a StagedBackbone
# (models/backbone.py: maps with declared out_channels and strides, run as stages); a neck takes the
# backbone's channels and strides and declares its own. New head kinds (classification, re-ID) register here.
BACKBONES: dict[str, tuple[type, type]] = {"resnet": (ResNetConfig, ResNet), "vit": (ViTConfig, ViT),
                                           "mobilenet": (MobileNetConfig, MobileNetV3)}
NECKS: dict[str, tuple[type, type]] = {"fpn": (FPNConfig, FPN), "pan": (PANConfig, PAN)}
HEADS: dict[str, tuple[type, type]] = {"fcos": (HeadConfig, DetectionHead)}


class ConfigError(ValueError):
    """A model config that cannot be built; the message names the field and the value."""


def _build_part_config(kind: str, spec: dict, registry: dict[str, tuple[type, type]]) -> tuple[str, Any]:
    spec = dict(spec)
    type_name = spec.pop("type", None)
    if type_name not in registry:
        raise ConfigError(f"unknown {kind} type {type_name!r} (known: {', '.join(sorted(registry))})")
    cfg_cls = registry[type_name][0]
    try:
        return type_name, cfg_cls(**spec)
    except TypeError as e:  # unexpected or missing keyword
        raise ConfigError(f"bad {kind} config {spec}: {e}") from None
    except ValueError as e:
        raise ConfigError(f"bad {kind} config: {e}") from None


def _named_config(kind: str, cls: type, name: str, spec: dict) -> Any:
    """``cls(**spec)`` for the part called ``name``; errors name the kind of part, the part and the field."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"{kind} name must be an identifier-like string, got {name!r}")
    try:
        return cls(**spec)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad {kind} {name!r} config: {e}") from None


def _adapter_config(name: str, spec: dict) -> LoRAConfig:
    return _named_config("adapter", LoRAConfig, name, spec)


def _attribute_config(name: str, spec: dict) -> AttributeConfig:
    return _named_config("attribute", AttributeConfig, name, spec)


def _reid_config(spec: dict) -> ReIDConfig:
    return _named_config("reid", ReIDConfig, "reid", spec)


def _channel_values(name: str, values: Any, positive: bool = False) -> tuple[float, ...]:
    """A per-channel (R, G, B) normalisation, checked: a 0 or NaN std made every score NaN (no boxes, no error),
    a wrong length failed in a bare reshape when the model was built."""
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or not all(math.isfinite(v) and (v > 0 or not positive) for v in out):
        each = ", each > 0" if positive else ""
        raise ConfigError(f"{name} must be 3 finite numbers (R, G, B){each}, got {values!r}")
    return out


@dataclass
class HydraNetConfig:
    input_size: tuple[int, int] = (256, 448)  # (height, width) of the letterboxed model input
    backbone: dict = field(default_factory=lambda: {"type": "resnet", "depth": 18, "width": 16})
    neck: dict = field(default_factory=lambda: {"type": "fpn", "channels": 64})
    heads: dict[str, dict] = field(default_factory=dict)  # name -> {"type": "fcos", "classes": [...], ...}
    # name -> {"labels": [...], "on": detection head, "of": [its classes]}: labels for that head's boxes
    attributes: dict[str, dict] = field(default_factory=dict)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # name -> {"heads": [...], "rank": 4, "stages": 1}: LoRA adapters whose heads read adapted features
    adapters: dict[str, dict] = field(default_factory=dict)
    # {"heads": [...], "dim": 32, ...}: an appearance embedding for those heads' boxes (models/reid.py); {}: none
    reid: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if any(isinstance(v, bool) or (isinstance(v, numbers.Real) and not float(v).is_integer())
               for v in self.input_size):
            raise ConfigError(f"input_size must be whole numbers, got {self.input_size}")  # int() cut 256.7 to 256
        self.input_size = tuple(int(v) for v in self.input_size)
        if len(self.input_size) != 2 or any(v <= 0 or v % 32 for v in self.input_size):
            raise ConfigError(f"input_size must be (height, width), each a positive multiple of 32, got {self.input_size}")
        self.mean, self.std = _channel_values("mean", self.mean), _channel_values("std", self.std, positive=True)
        # Written out in full (defaults too), so that a checkpoint names its architecture even if a default
        # changes; the values that were given come back unchanged.
        btype, bcfg = _build_part_config("backbone", self.backbone, BACKBONES)
        self.backbone = {"type": btype, **asdict(bcfg)}
        ntype, ncfg = _build_part_config("neck", self.neck, NECKS)
        self.neck = {"type": ntype, **asdict(ncfg)}
        for name, spec in self.heads.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ConfigError(f"head name must be an identifier-like string, got {name!r}")
            _, head = _build_part_config(f"head {name!r}", {"type": "fcos", **spec}, HEADS)
            # Written out, so that a checkpoint names its tower even if the default changes again.
            self.heads[name] = {**spec, "tower": head.tower}
        for name, spec in self.attributes.items():
            attr = _attribute_config(name, spec)
            if attr.on not in self.heads:
                raise ConfigError(f"attribute {name!r}: 'on' names head {attr.on!r}, not one of {list(self.heads)}")
            classes = self.heads[attr.on]["classes"]
            if any(c not in classes for c in attr.of):
                raise ConfigError(f"attribute {name!r}: 'of' {attr.of} must be classes of head {attr.on!r} {classes}")
        adapted: dict[str, str] = {}
        for name, spec in self.adapters.items():
            self.adapters[name] = asdict(_adapter_config(name, spec))  # written out, as the parts above
            for head in self.adapters[name]["heads"]:
                if head not in self.heads:
                    raise ConfigError(f"adapter {name!r}: head {head!r} is not one of {list(self.heads)}")
                if head in adapted:
                    raise ConfigError(f"head {head!r} is in two adapters, {adapted[head]!r} and {name!r}")
                adapted[head] = name
        for name, spec in self.attributes.items():
            if spec["on"] in adapted:  # attribute heads read the plain features
                raise ConfigError(f"attribute {name!r} is on head {spec['on']!r}, which reads adapter "
                                  f"{adapted[spec['on']]!r}; attributes of adapted heads are not supported")
        if self.reid:
            self.reid = asdict(_reid_config(self.reid))  # written out, as the parts above
            for head in self.reid["heads"]:
                if head not in self.heads:
                    raise ConfigError(f"reid: head {head!r} is not one of {list(self.heads)}")
                if head in adapted:  # the embedding reads the plain features
                    raise ConfigError(f"reid: head {head!r} reads adapter {adapted[head]!r}; re-ID of adapted "
                                      "heads is not supported")

    def to_dict(self) -> dict:
        d = asdict(self)
        for optional in ("adapters", "reid"):  # files without them stay readable by builds from before them
            if not d[optional]:
                del d[optional]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HydraNetConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown model config fields {sorted(unknown)} (known: {sorted(known)})")
        return cls(**d)


class HydraNet(nn.Module):
    def __init__(self, config: HydraNetConfig):
        super().__init__()
        self.config = config
        btype, bcfg = _build_part_config("backbone", config.backbone, BACKBONES)
        self.backbone = BACKBONES[btype][1](bcfg)
        ntype, ncfg = _build_part_config("neck", config.neck, NECKS)
        self.neck = NECKS[ntype][1](self.backbone.out_channels, self.backbone.strides, ncfg)
        self.strides = self.neck.strides  # of the maps the heads see
        coarsest = self.strides[-1]
        if any(v % coarsest for v in config.input_size):
            raise ConfigError(f"input_size {config.input_size} must be a multiple of the coarsest stride {coarsest} "
                              "in both dimensions")
        self.heads = nn.ModuleDict()
        for name, spec in config.heads.items():
            self._attach_head(name, spec)
        self.attributes = nn.ModuleDict(
            {name: AttributeHead(self.neck.out_channels, self.strides, _attribute_config(name, spec))
             for name, spec in config.attributes.items()})
        self.adapters = nn.ModuleDict()
        for name, spec in config.adapters.items():
            self._attach_adapter(name, spec)
        self.reid = EmbeddingHead(self.neck.out_channels, self.strides, _reid_config(config.reid)) if config.reid else None
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1) * 255, persistent=False)
        self._points: dict[tuple, torch.Tensor] = {}

    @property
    def head_names(self) -> list[str]:
        return list(self.heads)

    def head_classes(self, name: str) -> list[str]:
        return list(self.heads[name].config.classes)

    def _attach_head(self, name: str, spec: dict) -> None:
        htype, hcfg = _build_part_config(f"head {name!r}", {"type": "fcos", **spec}, HEADS)
        try:
            self.heads[name] = HEADS[htype][1](self.neck.out_channels, self.strides, hcfg)
        except ValueError as e:  # a setting that does not fit this neck (e.g. norm groups)
            raise ConfigError(f"bad head {name!r} config: {e}") from None

    def add_head(self, name: str, classes: Sequence[str], **options: Any) -> DetectionHead:
        """Adds a new, randomly initialised head (transfer learning: train it on frozen features)."""
        if not isinstance(name, str) or not name.isidentifier():  # as HydraNetConfig: else the saved file cannot load
            raise ConfigError(f"head name must be an identifier-like string, got {name!r}")
        if name in self.heads:
            raise ConfigError(f"head {name!r} already exists (heads: {self.head_names})")
        # a string stays one, for HeadConfig to refuse (as a list it was a class per letter)
        spec = {"classes": classes if isinstance(classes, str) else list(classes), **options}
        self._attach_head(name, spec)
        self.config.heads[name] = {**spec, "tower": self.heads[name].config.tower}
        device = next(self.parameters()).device
        self.heads[name].to(device)
        return self.heads[name]

    def _attach_adapter(self, name: str, spec: dict) -> None:
        try:
            self.adapters[name] = LoRA(self.backbone, _adapter_config(name, spec))
        except ValueError as e:  # e.g. more stages than this backbone has
            raise ConfigError(f"bad adapter {name!r} config: {e}") from None

    def add_adapter(self, name: str, heads: Sequence[str], **options: Any) -> LoRA:
        """Adds a new LoRA adapter (the identity until trained) whose features ``heads`` read from now on."""
        if name in self.adapters:
            raise ConfigError(f"adapter {name!r} already exists (adapters: {list(self.adapters)})")
        adapters = {**self.config.adapters, name: {"heads": list(heads), **options}}
        replace(self.config, adapters=adapters)  # validates the heads
        self._attach_adapter(name, adapters[name])
        self.config.adapters = adapters
        self.adapters[name].to(next(self.parameters()).device)
        return self.adapters[name]

    def adapter_of(self, head: str) -> str | None:
        return next((name for name, a in self.adapters.items() if head in a.config.heads), None)

    def fuse_batchnorm(self) -> int:
        """Serving only (eval mode): folds the backbone's BatchNorms into its convs, and each adapter's delta
        with them, so that the plain pass is exactly the fused pass of the model without adapters."""
        scales: dict[str, torch.Tensor] = {}
        count = fuse_conv_bn(self.backbone, scales)
        for adapter in self.adapters.values():
            adapter.fold_batchnorm(scales)
        return count

    def add_attribute(self, name: str, labels: Sequence[str], on: str, of: Sequence[str], **options: Any) -> AttributeHead:
        """Adds a new, randomly initialised attribute head for head ``on``'s boxes of classes ``of``."""
        if name in self.attributes or name in self.heads:
            raise ConfigError(f"{name!r} is already a head or attribute of this model")
        spec = {"labels": list(labels), "on": on, "of": list(of), **options}
        attributes = {**self.config.attributes, name: spec}
        replace(self.config, attributes=attributes)  # validates on / of against the heads
        self.config.attributes = attributes
        self.attributes[name] = AttributeHead(self.neck.out_channels, self.strides, _attribute_config(name, spec))
        self.attributes[name].to(next(self.parameters()).device)
        return self.attributes[name]

    def add_reid(self, heads: Sequence[str], **options: Any) -> EmbeddingHead:
        """Adds a new, randomly initialised re-ID head that embeds the boxes of ``heads``."""
        if self.reid is not None:
            raise ConfigError(f"this model has a re-ID head already (on {self.config.reid['heads']})")
        spec = {"heads": list(heads), **options}
        checked = replace(self.config, reid=spec)  # validates the heads
        self.config.reid = checked.reid
        self.reid = EmbeddingHead(self.neck.out_channels, self.strides, _reid_config(checked.reid))
        self.reid.to(next(self.parameters()).device)
        return self.reid

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) RGB -> normalized float; done on the model's device so frames travel as uint8."""
        # One fused multiply-add instead of a subtract and a divide: half the passes over the batch.
        return torch.addcmul(-self.mean / self.std, images.float(), 1.0 / self.std)

    def features(self, x: torch.Tensor, adapter: str | None = None) -> list[torch.Tensor]:
        """Backbone + neck, once per batch: pyramid maps at ``self.strides`` (8, 16, 32 by default); with
        ``adapter``, the maps that adapter's heads read."""
        if adapter is None:
            return self.neck(self.backbone(x))
        lora = self.adapters[adapter]
        return self.neck(lora.finish(self.backbone, self.backbone.begin(x, lora.start), lora.start))

    def forward(self, x: torch.Tensor, heads: Sequence[str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """Normalized images -> raw outputs of the requested heads (all heads when None)."""
        names = self._check_heads(heads)
        sets = self._feature_sets(x, [names] * x.shape[0])
        return {name: self.heads[name](sets[self.adapter_of(name)][1]) for name in names}

    def _feature_sets(self, x: torch.Tensor,
                      wanted: list[list[str]]) -> dict[str | None, tuple[list[int], list[torch.Tensor]]]:
        """Per adapter (None: the plain features) that some image's heads read: (those images, their maps).

        Without adapters this is ``features(x)``, as it always was. With them, the stages before the first
        adapted one run once for the whole batch; the plain rest for every image, each adapter's rest for
        the images that want its heads.
        """
        n = x.shape[0]
        needed: dict[str | None, list[int]] = {}
        for i, heads in enumerate(wanted):
            for adapter in dict.fromkeys(self.adapter_of(h) for h in heads):
                needed.setdefault(adapter, []).append(i)
        if set(needed) <= {None}:
            return {None: (list(range(n)), self.features(x))}
        start = min(self.adapters[a].start for a in needed if a is not None)
        carry: Carry = self.backbone.begin(x, start)
        sets = {}
        if None in needed:
            sets[None] = (list(range(n)), self.neck(self.backbone.finish(carry, start)))
        for adapter, idx in needed.items():
            if adapter is not None:
                sub = carry if len(idx) == n else carry.select(torch.tensor(idx, device=x.device))
                sets[adapter] = (idx, self.neck(self.adapters[adapter].finish(self.backbone, sub, start)))
        return sets

    def _check_heads(self, heads: Sequence[str] | None) -> list[str]:
        if heads is None:
            return self.head_names
        unknown = [h for h in heads if h not in self.heads]
        if unknown:
            raise KeyError(f"unknown heads {unknown} (this model has {self.head_names})")
        return list(heads)

    def points(self, feats: list[torch.Tensor], offset: float = 0.5) -> torch.Tensor:
        """Every location's point in input pixels; ``offset`` is the head's ``center_offset``."""
        sizes = tuple(tuple(f.shape[-2:]) for f in feats)
        key = (sizes, feats[0].device, offset)
        if key not in self._points:
            self._points[key] = make_points(list(sizes), self.strides, feats[0].device, offset)
        return self._points[key]

    @torch.inference_mode()
    def detect(
        self,
        images: torch.Tensor,
        heads_per_image: Sequence[Sequence[str] | None] | None = None,
        score_threshold: float | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> list[dict[str, HeadDetections]]:
        """Runs the backbone once on the batch and each head only on the images that asked for it.

        images: uint8 (N, 3, H, W) letterboxed RGB. heads_per_image: per image the head names
        (None = every head). Returns per image {head: detections in model-input pixels}.
        """
        if images.ndim != 4 or images.shape[1] != 3:  # a CHW frame broadcast into 3 "images", an HWC one failed unnamed
            raise ValueError(f"images must be a batch (N, 3, H, W) of RGB frames, got shape {tuple(images.shape)}")
        n = images.shape[0]
        wanted = self.wanted_heads(heads_per_image, n)
        device = self.mean.device
        x = self.normalize(images.to(device, non_blocking=True))
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            sets = self._feature_sets(x, wanted)
            raw = {}
            for name, head in self.heads.items():
                idx = [i for i, w in enumerate(wanted) if name in w]
                if not idx:
                    continue
                rows, feats = sets[self.adapter_of(name)]
                if len(idx) < len(rows):
                    feats = [f[torch.tensor([rows.index(i) for i in idx], device=device)] for f in feats]
                raw[name] = (idx, head(feats))
            # the plain maps for the attribute heads (whose heads read them) and the points (only their sizes)
            feats = sets[None][1] if None in sets else next(iter(sets.values()))[1]
            return self.decode(feats, raw, n, tuple(images.shape[-2:]), score_threshold, images=x)

    def wanted_heads(self, heads_per_image: Sequence[Sequence[str] | None] | None, n: int) -> list[list[str]]:
        wanted = [self._check_heads(h) for h in ([None] * n if heads_per_image is None else heads_per_image)]
        if len(wanted) != n:
            raise ValueError(f"expected {n} head lists (one per image), got {len(wanted)}")
        return wanted

    def decode(self, feats: list[torch.Tensor], raw: dict[str, tuple[list[int], dict[str, torch.Tensor]]], n: int,
               image_size: tuple[int, int], score_threshold: float | None = None,
               images: torch.Tensor | None = None) -> list[dict[str, HeadDetections]]:
        """Raw head outputs -> detections per image, then the attribute and re-ID heads on them.

        ``raw``: head -> (the images it ran on, its outputs for those images); ``feats``: the pyramid of all
        ``n`` images; ``images``: the inputs, normalised or uint8 (a re-ID head that reads colour needs them).
        Split from ``detect`` so that another runtime (ONNX Runtime, OpenVINO) can compute the raw parts.
        """
        results: list[dict[str, HeadDetections]] = [{} for _ in range(n)]
        for name, (idx, out) in raw.items():
            cfg = self.heads[name].config
            dets = postprocess(out, self.points(feats, cfg.center_offset), image_size,
                               score_threshold=cfg.score_threshold if score_threshold is None else score_threshold,
                               nms_iou=cfg.nms_iou, max_detections=cfg.max_detections)
            for i, d in zip(idx, dets):
                results[i][name] = d
        for name, attr in self.attributes.items():
            self._label(name, attr, feats, results)
        if self.reid is not None:
            self._embed(feats, results, images)
        return results

    def _embed(self, feats: list[torch.Tensor], results: list[dict[str, HeadDetections]],
               images: torch.Tensor | None) -> None:
        """The re-ID head on every box of its heads, all heads and images in one call."""
        heads = self.reid.config.heads
        dets = [[r[h] for h in heads if h in r] for r in results]
        if not any(dets):
            return
        # an image without those heads gives no boxes: the whole batch's maps are read in place, not copied
        none = torch.zeros((0, 4), device=feats[0].device)
        boxes = [torch.cat([d.boxes for d in ds]) if ds else none for ds in dets]
        raw_pixels = images is not None and images.dtype == torch.uint8  # normalised under the boxes only
        emb = self.reid(feats, boxes, images, self.normalize if raw_pixels else None)
        embedded = [d for ds in dets for d in ds]  # in the order of their boxes
        for det, e in zip(embedded, emb.split([len(d) for d in embedded])):
            det.embeddings = e

    def _label(self, name: str, attr: AttributeHead, feats: list[torch.Tensor],
               results: list[dict[str, HeadDetections]]) -> None:
        """Runs one attribute head on its detection head's boxes of its classes, in every image that has them."""
        cfg = attr.config
        dets = [r.get(cfg.on) for r in results]  # None: the detection head did not run on that image
        ran = [d for d in dets if d is not None]
        if not ran:
            return
        sizes = [len(d) for d in ran]
        classes = torch.cat([d.class_ids for d in ran])
        pick = torch.zeros_like(classes, dtype=torch.bool)
        for c in cfg.of:  # compared with Python numbers: no table copied to the device
            pick |= classes == self.head_classes(cfg.on).index(c)
        # The batch's boxes selected at once and split per image: on a GPU two reads back to the host (the
        # counts, the selection) whatever the batch size. Images without the detection head give no boxes, so
        # the head reads the whole batch's maps in place instead of a copy of theirs.
        counts = torch.stack([p.sum() for p in pick.split(sizes)]).tolist()
        picked = iter(torch.cat([d.boxes for d in ran])[pick].split(counts))
        none = torch.zeros((0, 4), device=feats[0].device)
        boxes = [none if d is None else next(picked) for d in dets]  # one entry per image, in order
        probs, ids = attr(feats, boxes).float().softmax(1).max(1)
        label = torch.full((len(pick),), -1, dtype=torch.long, device=ids.device).masked_scatter_(pick, ids)
        prob = torch.zeros(len(pick), device=ids.device).masked_scatter_(pick, probs)
        for det, lab, pr in zip(ran, label.split(sizes), prob.split(sizes)):
            det.attributes[name] = (lab, pr, list(cfg.labels))
