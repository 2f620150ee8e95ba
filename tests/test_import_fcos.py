"""Importing torchvision's COCO FCOS: every key lands, shapes are checked, and the outputs equal a reference.

The state dict here is built key by key from torchvision's published source (torchvision/models/resnet.py,
ops/feature_pyramid_network.py, models/detection/fcos.py, FrozenBatchNorm2d: four buffers, no step count),
not from our modules; its parameter count must equal the 32,269,600 that torchvision publishes for
fcos_resnet50_fpn. The reference forward below is written from the same source with functional ops.
"""

import re

import pytest
import torch
import torch.nn.functional as F

from models.checkpoint import CheckpointError, load_checkpoint
from models.import_fcos import COCO_CLASSES, COCO_ROWS, import_torchvision_fcos
from pipeline.cli import main as cli_main

RESNET50_BLOCKS = (3, 4, 6, 3)
FPN_CHANNELS = 256
STRIDES = (8, 16, 32, 64, 128)
PUBLISHED_NUM_PARAMS = 32_269_600  # torchvision's FCOS_ResNet50_FPN_Weights.COCO_V1.meta["num_params"]
SIZE = (128, 256)  # a multiple of the coarsest stride, so both sides agree on every level's stride


def torchvision_layout(num_classes: int = 91, fpn_suffix: str = ".0") -> dict[str, tuple[int, ...]]:
    """Key -> shape of torchvision's fcos_resnet50_fpn state dict (``fpn_suffix`` "" for files saved before
    torchvision 0.13 wrapped the FPN's convs)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def frozen_bn(prefix: str, c: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (c,)

    def conv(prefix: str, cout: int, cin: int, k: int, bias: bool = True) -> None:
        shapes[f"{prefix}.weight"] = (cout, cin, k, k)
        if bias:
            shapes[f"{prefix}.bias"] = (cout,)

    body = "backbone.body"
    conv(f"{body}.conv1", 64, 3, 7, bias=False)
    frozen_bn(f"{body}.bn1", 64)
    cin = 64
    for layer, (blocks, planes) in enumerate(zip(RESNET50_BLOCKS, (64, 128, 256, 512)), 1):
        for j in range(blocks):
            p = f"{body}.layer{layer}.{j}"
            conv(f"{p}.conv1", planes, cin, 1, bias=False)
            frozen_bn(f"{p}.bn1", planes)
            conv(f"{p}.conv2", planes, planes, 3, bias=False)
            frozen_bn(f"{p}.bn2", planes)
            conv(f"{p}.conv3", planes * 4, planes, 1, bias=False)
            frozen_bn(f"{p}.bn3", planes * 4)
            if j == 0:
                conv(f"{p}.downsample.0", planes * 4, cin, 1, bias=False)
                frozen_bn(f"{p}.downsample.1", planes * 4)
            cin = planes * 4
    for i, c in enumerate((512, 1024, 2048)):
        conv(f"backbone.fpn.inner_blocks.{i}{fpn_suffix}", FPN_CHANNELS, c, 1)
        conv(f"backbone.fpn.layer_blocks.{i}{fpn_suffix}", FPN_CHANNELS, FPN_CHANNELS, 3)
    for extra in ("p6", "p7"):
        conv(f"backbone.fpn.extra_blocks.{extra}", FPN_CHANNELS, FPN_CHANNELS, 3)
    for branch in ("classification_head", "regression_head"):
        for j in range(4):  # Sequential of (Conv2d, GroupNorm(32), ReLU) x 4
            conv(f"head.{branch}.conv.{3 * j}", FPN_CHANNELS, FPN_CHANNELS, 3)
            shapes[f"head.{branch}.conv.{3 * j + 1}.weight"] = (FPN_CHANNELS,)
            shapes[f"head.{branch}.conv.{3 * j + 1}.bias"] = (FPN_CHANNELS,)
    conv("head.classification_head.cls_logits", num_classes, FPN_CHANNELS, 3)
    conv("head.regression_head.bbox_reg", 4, FPN_CHANNELS, 3)
    conv("head.regression_head.bbox_ctrness", 1, FPN_CHANNELS, 3)
    return shapes


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Values that keep a random ResNet-50's activations in range (so the comparison is meaningful)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if key.endswith("running_var"):
            v = torch.rand(shape, generator=g) + 0.5
        elif key.endswith("running_mean") or key.endswith("bias"):
            v = torch.randn(shape, generator=g) * 0.1
        elif len(shape) == 4:
            v = torch.randn(shape, generator=g) * (2.0 / (shape[1] * shape[2] * shape[3])) ** 0.5
        else:  # BN / GN scale; the last BN of a residual branch small, as trained ResNets have it
            v = torch.rand(shape, generator=g) * 0.5 + (0.1 if ".bn3." in key else 0.75)
        out[key] = v
    return out


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """torchvision's fcos_resnet50_fpn from a normalized batch to its head outputs and decoded boxes."""

    def conv(t, p, stride=1, padding=0):
        return F.conv2d(t, sd[f"{p}.weight"], sd.get(f"{p}.bias"), stride, padding)

    def frozen_bn(t, p):
        scale = sd[f"{p}.weight"] * (sd[f"{p}.running_var"] + 1e-5).rsqrt()
        shift = sd[f"{p}.bias"] - sd[f"{p}.running_mean"] * scale
        return t * scale[None, :, None, None] + shift[None, :, None, None]

    body = "backbone.body"
    t = F.max_pool2d(F.relu(frozen_bn(conv(x, f"{body}.conv1", 2, 3), f"{body}.bn1")), 3, 2, 1)
    c = []
    for layer, blocks in enumerate(RESNET50_BLOCKS, 1):
        for j in range(blocks):
            p, stride = f"{body}.layer{layer}.{j}", (2 if j == 0 and layer > 1 else 1)
            out = F.relu(frozen_bn(conv(t, f"{p}.conv1"), f"{p}.bn1"))
            out = F.relu(frozen_bn(conv(out, f"{p}.conv2", stride, 1), f"{p}.bn2"))
            out = frozen_bn(conv(out, f"{p}.conv3"), f"{p}.bn3")
            identity = frozen_bn(conv(t, f"{p}.downsample.0", stride), f"{p}.downsample.1") if j == 0 else t
            t = F.relu(out + identity)
        if layer >= 2:
            c.append(t)
    inner = [conv(f, f"backbone.fpn.inner_blocks.{i}.0") for i, f in enumerate(c)]
    last = inner[-1]
    p = [conv(last, "backbone.fpn.layer_blocks.2.0", 1, 1)]
    for i in (1, 0):
        last = inner[i] + F.interpolate(last, size=inner[i].shape[-2:], mode="nearest")
        p.insert(0, conv(last, f"backbone.fpn.layer_blocks.{i}.0", 1, 1))
    p6 = conv(p[-1], "backbone.fpn.extra_blocks.p6", 2, 1)  # LastLevelP6P7(256, 256): from P5
    p.extend([p6, conv(F.relu(p6), "backbone.fpn.extra_blocks.p7", 2, 1)])

    def tower(t, branch):
        for j in range(4):
            t = conv(t, f"head.{branch}.conv.{3 * j}", 1, 1)
            t = F.relu(F.group_norm(t, 32, sd[f"head.{branch}.conv.{3 * j + 1}.weight"],
                                    sd[f"head.{branch}.conv.{3 * j + 1}.bias"]))
        return t

    cls, reg, ctr, boxes = [], [], [], []
    for f in p:
        n, _, h, w = f.shape
        flat = lambda t: t.permute(0, 2, 3, 1).reshape(n, h * w, -1)  # noqa: E731 (N, C, H, W) -> (N, HW, C)
        t = tower(f, "regression_head")
        cls.append(flat(conv(tower(f, "classification_head"), "head.classification_head.cls_logits", 1, 1)))
        r = flat(F.relu(conv(t, "head.regression_head.bbox_reg", 1, 1)))
        reg.append(r)
        ctr.append(flat(conv(t, "head.regression_head.bbox_ctrness", 1, 1))[..., 0])
        # AnchorGenerator(sizes=(s,), aspect_ratios=(1.0,)) with stride = image // feature map, then
        # BoxLinearCoder(normalize_by_size=True).decode: centre -/+ distance x anchor size
        sy, sx = x.shape[-2] // h, x.shape[-1] // w
        size = float(STRIDES[len(boxes)])
        yy, xx = torch.meshgrid(torch.arange(h) * sy, torch.arange(w) * sx, indexing="ij")
        cx, cy = xx.reshape(-1).float(), yy.reshape(-1).float()
        boxes.append(torch.stack([cx - r[..., 0] * size, cy - r[..., 1] * size,
                                  cx + r[..., 2] * size, cy + r[..., 3] * size], -1))
    return {"cls_logits": torch.cat(cls, 1), "bbox_ctrness": torch.cat(ctr, 1), "boxes": torch.cat(boxes, 1)}


@pytest.fixture(scope="module")
def tv_weights():
    return random_weights(torchvision_layout())


@pytest.fixture(scope="module")
def tv_file(tv_weights, tmp_path_factory):
    path = tmp_path_factory.mktemp("tv") / "fcos_resnet50_fpn_coco.pth"
    torch.save(tv_weights, path)
    return path


def test_the_layout_has_torchvisions_published_parameter_count():
    # FrozenBatchNorm2d holds buffers, not parameters: what torchvision counts is the rest
    shapes = torchvision_layout()
    bn = re.compile(r"backbone\.body\..*(bn\d|downsample\.1)\.")
    count = sum(torch.Size(s).numel() for k, s in shapes.items() if not bn.match(k))
    assert count == PUBLISHED_NUM_PARAMS


def test_every_key_lands_and_outputs_equal_the_reference(tv_weights, tv_file):
    model = import_torchvision_fcos(tv_file, SIZE)
    ours = model.state_dict()
    assert model.strides == STRIDES and model.head_classes("coco") == list(COCO_CLASSES)
    assert len(COCO_CLASSES) == 80 and COCO_CLASSES[0] == "person" and COCO_CLASSES[-1] == "toothbrush"
    # the class rows: COCO ids with the gaps torchvision keeps ("N/A"), e.g. stop sign is id 13, toothbrush 90
    assert COCO_ROWS[COCO_CLASSES.index("stop sign")] == 13 and COCO_ROWS[-1] == 90
    torch.testing.assert_close(ours["heads.coco.cls_logits.weight"], tv_weights["head.classification_head.cls_logits.weight"][COCO_ROWS])
    torch.testing.assert_close(ours["backbone.layer3.5.bn2.running_var"], tv_weights["backbone.body.layer3.5.bn2.running_var"])
    torch.testing.assert_close(ours["neck.extra.1.weight"], tv_weights["backbone.fpn.extra_blocks.p7.weight"])
    torch.testing.assert_close(ours["heads.coco.box_tower.10.bias"], tv_weights["head.regression_head.conv.10.bias"])

    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, 3, *SIZE), dtype=torch.uint8)
    with torch.inference_mode():
        x = model.normalize(images)
        out = model(x)["coco"]
        ref = reference_forward(tv_weights, x)
        feats = model.features(x)
        points = model.points(feats, model.heads["coco"].config.center_offset)
    assert out["cls_logits"].shape == (2, sum((SIZE[0] // s) * (SIZE[1] // s) for s in STRIDES), 80)
    scale = ref["cls_logits"].abs().max()
    torch.testing.assert_close(out["cls_logits"], ref["cls_logits"][..., COCO_ROWS], atol=1e-4 * scale, rtol=1e-4)
    torch.testing.assert_close(out["centerness"], ref["bbox_ctrness"], atol=1e-4 * ref["bbox_ctrness"].abs().max(), rtol=1e-4)
    boxes = torch.cat([points - out["box_ltrb"][..., :2], points + out["box_ltrb"][..., 2:]], -1)
    torch.testing.assert_close(boxes, ref["boxes"], atol=1e-3 * ref["boxes"].abs().max(), rtol=1e-4)
    assert ref["boxes"].std() > 1.0  # not all zeros: the comparison compares something
    dets = model.detect(images, score_threshold=0.0)  # the serving path runs on it end to end
    assert len(dets) == 2 and dets[0]["coco"].boxes.shape[1] == 4


def test_files_saved_before_torchvision_013_import_too(tv_weights, tmp_path):
    old = {re.sub(r"(fpn\.(inner|layer)_blocks\.\d+)\.0\.", r"\1.", k): v for k, v in tv_weights.items()}
    assert set(old) == set(torchvision_layout(fpn_suffix=""))
    path = tmp_path / "old.pth"
    torch.save(old, path)
    model = import_torchvision_fcos(path, SIZE)
    torch.testing.assert_close(model.state_dict()["neck.lateral.2.weight"],
                               tv_weights["backbone.fpn.inner_blocks.2.0.weight"])


def bad_file(kind, tv_weights, tmp_path):
    path = tmp_path / f"{kind}.pth"
    state = dict(tv_weights)
    if kind == "resnet_only":  # an ImageNet classifier, not a detector
        state = {k.removeprefix("backbone.body."): v for k, v in state.items() if k.startswith("backbone.body.")}
    elif kind == "other_classes":  # FCOS trained on another dataset (21 rows)
        state["head.classification_head.cls_logits.weight"] = torch.zeros(21, 256, 3, 3)
        state["head.classification_head.cls_logits.bias"] = torch.zeros(21)
    elif kind == "narrow_fpn":
        state["backbone.fpn.layer_blocks.1.0.weight"] = torch.zeros(128, 256, 3, 3)
    elif kind == "no_head":
        state = {k: v for k, v in state.items() if not k.startswith("head.regression_head")}
    elif kind == "code":
        torch.save({"w": torch.zeros(1), "evil": print}, path)
        return path
    torch.save(state, path)
    return path


@pytest.mark.parametrize("kind, message", [
    ("resnet_only", r"not torchvision's fcos_resnet50_fpn state dict: \d+ keys it does not have \(e\.g\. \['conv1\.weight'"),
    ("other_classes", r"cls_logits\.weight has 21 class rows; torchvision's COCO FCOS has 91"),
    ("narrow_fpn", r"neck\.output\.1\.weight: expected \(256, 256, 3, 3\), got \(128, 256, 3, 3\)"),
    ("no_head", r"missing \(e\.g\. \['heads\.coco\.box_ltrb\.bias'"),
    ("code", r"refused: it holds pickled objects other than tensors"),
])
def test_a_foreign_or_wrong_file_is_refused_naming_the_problem(kind, message, tv_weights, tmp_path):
    path = bad_file(kind, tv_weights, tmp_path)
    with pytest.raises(CheckpointError, match=message) as err:
        import_torchvision_fcos(path, SIZE)
    assert str(path) in str(err.value)


def test_import_detector_command_writes_a_checkpoint_that_loads(tv_file, tmp_path, capsys):
    out = tmp_path / "coco.safetensors"
    assert cli_main(["import-detector", str(tv_file), "--out", str(out), "--input-size", "128x256"]) == 0
    printed = capsys.readouterr().out
    assert "80 classes" in printed and str(out) in printed
    model, training = load_checkpoint(out)
    assert model.head_names == ["coco"] and model.config.input_size == (128, 256)
    assert "torchvision" in training["history"][0]["imported"]
    assert cli_main(["import-detector", str(tmp_path / "none.pth")]) == 2
    assert "none.pth: no such weights file" in capsys.readouterr().err
