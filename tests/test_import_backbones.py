"""ImageNet backbones by import: torchvision's resnet18/50 and vit_b_16 files load key by key, compute what
torchvision computes, and a wrong-shaped or foreign file is refused with an error naming the key.

The state dicts are built from torchvision's published source (models/resnet.py, models/vision_transformer.py:
key names, shapes, BatchNorm buffers), not from our modules; the layouts' parameter counts must equal the ones
torchvision publishes. The reference forward passes are written from the same source with functional ops
(and torch's own nn.MultiheadAttention, which torchvision's ViT uses).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.checkpoint import CheckpointError, import_backbone_weights, load_checkpoint, load_pretrained
from models.hydranet import HydraNet, HydraNetConfig
from models.mobilenet import MobileNetConfig, MobileNetV3
from models.resnet import ResNet, ResNetConfig
from models.vit import ViT, ViTConfig
from pipeline.cli import main as cli_main

RESNETS = {18: ("basic", (2, 2, 2, 2), 11_689_512), 50: ("bottleneck", (3, 4, 6, 3), 25_557_032)}
VIT_B_16 = {"width": 768, "depth": 12, "heads": 12, "mlp_dim": 3072}
VIT_B_16_PARAMS = 86_567_656  # ViT_B_16_Weights.IMAGENET1K_V1.meta["num_params"]


def resnet_layout(depth: int, classes: int = 1000) -> dict[str, tuple[int, ...]]:
    kind, blocks, _ = RESNETS[depth]
    expansion = 1 if kind == "basic" else 4
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, c: int) -> None:  # nn.BatchNorm2d: two parameters, three buffers
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    shapes["conv1.weight"] = (64, 3, 7, 7)
    bn("bn1", 64)
    cin = 64
    for layer, (n, planes) in enumerate(zip(blocks, (64, 128, 256, 512)), 1):
        for j in range(n):
            p = f"layer{layer}.{j}"
            if kind == "basic":
                convs = [(planes, cin, 3), (planes, planes, 3)]
            else:
                convs = [(planes, cin, 1), (planes, planes, 3), (planes * 4, planes, 1)]
            for i, (co, ci, k) in enumerate(convs, 1):
                shapes[f"{p}.conv{i}.weight"] = (co, ci, k, k)
                bn(f"{p}.bn{i}", co)
            if j == 0 and (layer > 1 or cin != planes * expansion):
                shapes[f"{p}.downsample.0.weight"] = (planes * expansion, cin, 1, 1)
                bn(f"{p}.downsample.1", planes * expansion)
            cin = planes * expansion
    shapes["fc.weight"], shapes["fc.bias"] = (classes, cin), (classes,)
    return shapes


def vit_layout(width: int, depth: int, heads: int, mlp_dim: int, grid: int = 14, classes: int = 1000,
               old_mlp_names: bool = False) -> dict[str, tuple[int, ...]]:
    d = width
    shapes = {"class_token": (1, 1, d), "conv_proj.weight": (d, 3, 16, 16), "conv_proj.bias": (d,),
              "encoder.pos_embedding": (1, 1 + grid * grid, d)}
    mlp = ("linear_1", "linear_2") if old_mlp_names else ("0", "3")
    for i in range(depth):
        p = f"encoder.layers.encoder_layer_{i}"
        shapes.update({f"{p}.ln_1.weight": (d,), f"{p}.ln_1.bias": (d,),
                       f"{p}.self_attention.in_proj_weight": (3 * d, d), f"{p}.self_attention.in_proj_bias": (3 * d,),
                       f"{p}.self_attention.out_proj.weight": (d, d), f"{p}.self_attention.out_proj.bias": (d,),
                       f"{p}.ln_2.weight": (d,), f"{p}.ln_2.bias": (d,),
                       f"{p}.mlp.{mlp[0]}.weight": (mlp_dim, d), f"{p}.mlp.{mlp[0]}.bias": (mlp_dim,),
                       f"{p}.mlp.{mlp[1]}.weight": (d, mlp_dim), f"{p}.mlp.{mlp[1]}.bias": (d,)})
    shapes.update({"encoder.ln.weight": (d,), "encoder.ln.bias": (d,), "heads.head.weight": (classes, d),
                   "heads.head.bias": (classes,)})
    return shapes


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Values that keep activations in range, so that comparing outputs compares something."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(100)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith(("running_mean", "bias")) or key in ("class_token", "encoder.pos_embedding"):
            out[key] = torch.randn(shape, generator=g) * 0.1
        elif len(shape) >= 2:
            fan_in = torch.Size(shape[1:]).numel()
            out[key] = torch.randn(shape, generator=g) * (1.0 / fan_in) ** 0.5
        else:  # BN / LayerNorm scales; a residual branch's last BN small, as trained ResNets have it
            out[key] = torch.rand(shape, generator=g) * 0.5 + (0.1 if ".bn3." in key or ".bn2." in key else 0.75)
    return out


def numbered_weights(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Each tensor filled with its own index: cheap at 86 M parameters, and shows where every key landed."""
    return {k: torch.full(s, float(i)) if s else torch.tensor(i) for i, (k, s) in enumerate(shapes.items())}


def resnet_reference(sd: dict[str, torch.Tensor], depth: int, x: torch.Tensor) -> torch.Tensor:
    kind, blocks, _ = RESNETS[depth]

    def bn(t, p):
        return F.batch_norm(t, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                            False, 0.0, 1e-5)

    t = F.max_pool2d(F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), "bn1")), 3, 2, 1)
    for layer, n in enumerate(blocks, 1):
        for j in range(n):
            p, stride = f"layer{layer}.{j}", (2 if j == 0 and layer > 1 else 1)
            convs = 2 if kind == "basic" else 3
            out = t
            for i in range(1, convs + 1):
                w = sd[f"{p}.conv{i}.weight"]
                s = stride if (i == 1 and kind == "basic") or (i == 2 and kind == "bottleneck") else 1  # v1.5
                out = bn(F.conv2d(out, w, stride=s, padding=w.shape[-1] // 2), f"{p}.bn{i}")
                out = F.relu(out) if i < convs else out
            if f"{p}.downsample.0.weight" in sd:
                t = bn(F.conv2d(t, sd[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1")
            t = F.relu(out + t)
    return F.linear(t.mean((2, 3)), sd["fc.weight"], sd["fc.bias"])


def vit_reference(sd: dict[str, torch.Tensor], heads: int, x: torch.Tensor) -> torch.Tensor:
    t = F.conv2d(x, sd["conv_proj.weight"], sd["conv_proj.bias"], stride=16)
    n, d = t.shape[:2]
    t = t.reshape(n, d, -1).permute(0, 2, 1)
    t = torch.cat([sd["class_token"].expand(n, -1, -1), t], 1) + sd["encoder.pos_embedding"]
    i = 0
    while f"encoder.layers.encoder_layer_{i}.ln_1.weight" in sd:
        p = f"encoder.layers.encoder_layer_{i}"
        attention = nn.MultiheadAttention(d, heads, batch_first=True).eval()
        attention.load_state_dict({k.removeprefix(f"{p}.self_attention."): v for k, v in sd.items()
                                   if k.startswith(f"{p}.self_attention.")})
        y = F.layer_norm(t, (d,), sd[f"{p}.ln_1.weight"], sd[f"{p}.ln_1.bias"], 1e-6)
        t = t + attention(y, y, y, need_weights=False)[0]
        y = F.layer_norm(t, (d,), sd[f"{p}.ln_2.weight"], sd[f"{p}.ln_2.bias"], 1e-6)
        y = F.linear(F.gelu(F.linear(y, sd[f"{p}.mlp.0.weight"], sd[f"{p}.mlp.0.bias"])),
                     sd[f"{p}.mlp.3.weight"], sd[f"{p}.mlp.3.bias"])
        t, i = t + y, i + 1
    t = F.layer_norm(t, (d,), sd["encoder.ln.weight"], sd["encoder.ln.bias"], 1e-6)
    return F.linear(t[:, 0], sd["heads.head.weight"], sd["heads.head.bias"])


def trainable_count(shapes: dict[str, tuple[int, ...]]) -> int:
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    return sum(torch.Size(s).numel() for k, s in shapes.items() if not k.endswith(buffers))


@pytest.mark.parametrize("depth", sorted(RESNETS))
def test_resnet_imagenet_file_loads_key_by_key_and_classifies_as_torchvision(depth, tmp_path):
    shapes = resnet_layout(depth)
    assert trainable_count(shapes) == RESNETS[depth][2]  # torchvision's published parameter count
    sd = random_weights(shapes)
    path = tmp_path / f"resnet{depth}.pth"
    torch.save(sd, path)
    model = ResNet(ResNetConfig(depth=depth, num_classes=1000)).eval()
    loaded = load_pretrained(model, torch.load(path, weights_only=True), str(path))
    assert sorted(loaded) == sorted(shapes)  # fc included: this ResNet keeps the classifier
    ours = model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in sd.items())
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        logits, ref = model.classify(x), resnet_reference(sd, depth, x)
    assert ref.std() > 0.1
    torch.testing.assert_close(logits, ref, atol=1e-4 * ref.abs().max(), rtol=1e-4)


def test_resnet_imagenet_file_initialises_a_detectors_backbone_from_the_cli(tmp_path):
    sd = random_weights(resnet_layout(18))
    path = tmp_path / "resnet18.pth"
    torch.save(sd, path)
    out = tmp_path / "det.safetensors"
    assert cli_main(["train", "--out", str(out), "--head", "people=person", "--import-backbone", str(path),
                     "--width", "64", "--input-size", "64x96", "--steps", "1", "--batch-size", "1", "--lr", "1e-9",
                     "--no-progress"]) == 0
    imported, _ = load_checkpoint(tmp_path / "det.imported.safetensors")
    assert not hasattr(imported.backbone, "fc")  # the classifier stays behind
    assert all(torch.equal(v, sd[k]) for k, v in imported.backbone.state_dict().items())


def bad_resnet18(kind: str) -> dict[str, torch.Tensor]:
    sd = numbered_weights(resnet_layout(18))
    if kind == "narrow_layer":
        sd["layer3.0.conv1.weight"] = torch.zeros(128, 128, 3, 3)
    elif kind == "resnet50":
        sd = numbered_weights(resnet_layout(50))
    elif kind == "vit":
        sd = numbered_weights(vit_layout(64, 1, 4, 128))
    elif kind == "truncated":
        del sd["layer4.1.bn2.running_var"]
    return sd


@pytest.mark.parametrize("kind, message", [
    ("narrow_layer", r"1 with wrong shape \(layer3\.0\.conv1\.weight: expected \(256, 128, 3, 3\), got \(128, 128, 3, 3\)\)"),
    ("resnet50", r"unexpected \(e\.g\. \['layer1\.0\.bn3\.bias'.*layer1\.0\.conv1\.weight: expected \(64, 64, 3, 3\), "
                 r"got \(64, 64, 1, 1\)"),
    ("vit", r"missing \(e\.g\. \['bn1\.bias'.*unexpected \(e\.g\. \['class_token', 'conv_proj\.bias'"),
    ("truncated", r"1 missing \(e\.g\. \['layer4\.1\.bn2\.running_var'\]\)"),
])
def test_a_wrong_or_foreign_file_is_refused_naming_the_key(kind, message, tmp_path):
    path = tmp_path / f"{kind}.pth"
    torch.save(bad_resnet18(kind), path)
    model = HydraNet(HydraNetConfig(backbone={"type": "resnet", "depth": 18, "width": 64}))
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    with pytest.raises(CheckpointError, match=message) as err:
        import_backbone_weights(model, path)
    assert str(path) in str(err.value) and "does not fit this backbone" in str(err.value)
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in before.items())  # nothing half-loaded


@pytest.fixture(scope="module")
def vit_b_16_file(tmp_path_factory):
    shapes = vit_layout(**VIT_B_16)
    path = tmp_path_factory.mktemp("vit") / "vit_b_16.pth"
    torch.save(numbered_weights(shapes), path)
    return shapes, path


def test_vit_b_16_layout_has_torchvisions_parameter_count(vit_b_16_file):
    assert trainable_count(vit_b_16_file[0]) == VIT_B_16_PARAMS


def test_vit_b_16_file_loads_key_by_key_into_a_detectors_backbone(vit_b_16_file):
    shapes, path = vit_b_16_file
    model = HydraNet(HydraNetConfig(input_size=(64, 96), backbone={"type": "vit", **VIT_B_16},
                                    neck={"type": "fpn", "channels": 32}, heads={"people": {"classes": ["person"]}}))
    loaded = import_backbone_weights(model, path)
    assert sorted(loaded) == sorted(k for k in shapes if not k.startswith("heads."))  # the classifier stays behind
    ours = model.backbone.state_dict()
    numbers = {k: i for i, k in enumerate(shapes)}
    assert all(torch.equal(ours[k], torch.full_like(ours[k], numbers[k])) for k in loaded)
    assert {k for k in ours if k not in loaded} == {"pyramid.up.weight", "pyramid.up.bias"}  # ours, new
    feats = model.eval().features(torch.zeros(1, 3, 64, 96))  # a non-square input: the 14x14 grid is resized
    assert [tuple(f.shape[1:]) for f in feats] == [(32, 8, 12), (32, 4, 6), (32, 2, 3)]


def test_vit_computes_what_torchvisions_vit_computes():
    """A small model of the vit_b_16 layout (224 px pretraining grid is 14; here 64 px, 4x4 patches)."""
    sd = random_weights(vit_layout(64, 2, 4, 128, grid=4, classes=10))
    model = ViT(ViTConfig(width=64, depth=2, heads=4, mlp_dim=128, pos_grid=4, num_classes=10)).eval()
    assert sorted(load_pretrained(model, sd, "small vit")) == sorted(sd)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        logits, ref = model.classify(x), vit_reference(sd, 4, x)
    assert ref.std() > 0.1
    torch.testing.assert_close(logits, ref, atol=1e-4 * ref.abs().max(), rtol=1e-4)


def test_vit_files_with_torchvisions_older_mlp_names_load_too():
    old = numbered_weights(vit_layout(64, 2, 4, 128, old_mlp_names=True))
    model = ViT(ViTConfig(width=64, depth=2, heads=4, mlp_dim=128))
    loaded = load_pretrained(model, old, "old vit")
    assert "encoder.layers.encoder_layer_1.mlp.3.bias" in loaded
    assert torch.equal(model.encoder.layers[1].mlp[3].bias, old["encoder.layers.encoder_layer_1.mlp.linear_2.bias"])


@pytest.mark.parametrize("change, message", [
    ({"encoder.pos_embedding": (1, 577, 64)},  # a file trained at 384 px (24x24 patches)
     r"encoder\.pos_embedding: expected \(1, 197, 64\), got \(1, 577, 64\)"),
    ({"encoder.layers.encoder_layer_0.self_attention.in_proj_weight": (64, 64)},
     r"encoder\.layers\.encoder_layer_0\.self_attention\.in_proj_weight: expected \(192, 64\), got \(64, 64\)"),
])
def test_a_wrong_vit_file_is_refused_naming_the_key(change, message):
    shapes = {**vit_layout(64, 2, 4, 128), **change}
    model = ViT(ViTConfig(width=64, depth=2, heads=4, mlp_dim=128))
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(model, numbered_weights(shapes), "vit file")


@pytest.mark.parametrize("arch, published", [("large", 5_483_032), ("small", 2_542_856)])
def test_mobilenet_v3_has_torchvisions_layout_size_and_its_files_import(arch, published, tmp_path):
    source = MobileNetV3(MobileNetConfig(arch=arch, width=1.0, num_classes=1000))
    assert sum(p.numel() for p in source.parameters()) == published  # torchvision's num_params
    path = tmp_path / f"mobilenet_v3_{arch}.pth"
    torch.save(source.state_dict(), path)
    model = HydraNet(HydraNetConfig(input_size=(64, 96), backbone={"type": "mobilenet", "arch": arch, "width": 1.0}))
    loaded = import_backbone_weights(model, path)
    assert not any(k.startswith("classifier.") for k in loaded)
    assert torch.equal(model.backbone.features[-1][0].weight, source.features[-1][0].weight)


def test_a_resnet_file_from_before_batchnorms_counter_loads_too(tmp_path):
    """torchvision's V1 ResNet files (resnet18-f37072fd.pth and the rest) have no num_batches_tracked buffers,
    which BatchNorm gained later: they were refused as '20 missing'."""
    shapes = {k: v for k, v in resnet_layout(18).items() if not k.endswith("num_batches_tracked")}
    sd = random_weights(shapes)
    model = ResNet(ResNetConfig(depth=18, num_classes=1000)).eval()
    load_pretrained(model, sd, "resnet18-f37072fd.pth")
    ours = model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in sd.items())
    assert all(int(v) == 0 for k, v in ours.items() if k.endswith("num_batches_tracked"))
