"""Fine-tuning modes beside --freeze-shared: unfreezing the last backbone stages (the other heads are scored
before and after) and LoRA adapters (only adapter and new heads saved; the other heads bit-identical)."""

import numpy as np
import pytest
import torch
from safetensors import safe_open

from models.checkpoint import CheckpointError, load_checkpoint, read_metadata, save_checkpoint
from models.evaluate import EvalConfig, evaluate
from models.hydranet import ConfigError, HydraNet, HydraNetConfig
from models.train import TrainConfig, train
from pipeline.cli import main as cli_main
from workers.model_runner import ModelRunner

TINY = {"input_size": (64, 96), "batch_size": 2, "workers": 0, "warmup_steps": 1}
BACKBONES = {
    "resnet": {"type": "resnet", "depth": 10, "width": 8},
    "vit": {"type": "vit", "width": 32, "depth": 2, "heads": 2},
    "mobilenet": {"type": "mobilenet", "arch": "small", "width": 0.5},
}
# The backbones as a user gets them by default (hydravision train --backbone ...), for the size budget.
DEFAULT_BACKBONES = {"resnet": {"type": "resnet", "depth": 18, "width": 16}, "vit": {"type": "vit"},
                     "mobilenet": {"type": "mobilenet"}}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """kind -> a model with a people head, trained a few steps with that backbone (made once per module)."""
    made = {}

    def make(kind: str):
        if kind not in made:
            made[kind] = tmp_path_factory.mktemp(kind) / "base.safetensors"
            train(TrainConfig(out=made[kind], heads={"people": ["person"]}, backbone=BACKBONES[kind],
                              neck={"type": "fpn", "channels": 16}, steps=3, lr=0.01, **TINY), progress=False)
        return made[kind]

    return make


@pytest.fixture
def base(bases):
    return bases("resnet")


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 255, (n, 3, 64, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


ROUTES = [["people"], ["people", "bikes"], ["bikes"]]


@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_lora_fine_tune_keeps_other_heads_bit_identical_and_saves_only_its_own_weights(kind, bases, tmp_path):
    base = bases(kind)
    out = train(TrainConfig(out=tmp_path / "bikes.safetensors", heads={"bikes": ["bicycle"]}, init=base,
                            lora={"rank": 2, "stages": 1}, steps=3, lr=0.05, **TINY), progress=False)
    before, _ = load_checkpoint(base)
    after, training = load_checkpoint(out)
    assert after.config.adapters == {"bikes": {"heads": ["bikes"], "rank": 2, "alpha": None, "stages": 1}}
    assert training["history"][-1]["lora"] == {"adapter": "bikes", "rank": 2, "stages": 1}
    with safe_open(str(out), framework="pt") as f:
        saved = set(f.keys())
    assert saved == {k for k in after.state_dict() if k.startswith(("adapters.bikes.", "heads.bikes."))}
    assert read_metadata(out)["base"]["path"] == f"../{base.parent.name}/base.safetensors"
    for k, v in before.state_dict().items():
        assert torch.equal(v, after.state_dict()[k]), f"{k} changed"
    assert any(p.abs().sum() > 0 for p in after.adapters["bikes"].b.values())  # the adapter learned

    x = images()
    a = before.detect(x, [["people"], ["people"], []], score_threshold=0.0)
    b = after.detect(x, ROUTES, score_threshold=0.0)
    for i in (0, 1):  # people read the plain pass, whether or not the frame also asked for bikes
        assert torch.equal(a[i]["people"].boxes, b[i]["people"].boxes)
        assert torch.equal(a[i]["people"].scores, b[i]["people"].scores)
    with torch.inference_mode():  # and bikes really read the adapter's features
        xn = after.normalize(x)
        plain = after.heads["bikes"](after.features(xn))["cls_logits"]
        adapted = after(xn, ["bikes"])["bikes"]["cls_logits"]
    assert not torch.allclose(plain, adapted)


@pytest.mark.parametrize("kind", ["resnet", "mobilenet"])
def test_serving_folds_batchnorm_into_the_adapter_too(kind, bases, tmp_path):
    """ModelRunner folds BN into the convs: the plain pass must stay exactly the base's fused pass, and
    the adapter's delta must be folded with it (its head as the unfused model computes it)."""
    base = bases(kind)
    out = train(TrainConfig(out=tmp_path / "bikes.safetensors", heads={"bikes": ["bicycle"]}, init=base,
                            lora={"rank": 2, "stages": 2}, steps=2, lr=0.05, **TINY), progress=False)
    frames = [im.numpy() for im in images()]
    plain = ModelRunner(base, device="cpu", score_threshold=0.0, backend="torch").run(frames, [["people"], ["people"], []])
    runner = ModelRunner(out, device="cpu", score_threshold=0.0)
    served = runner.run(frames, ROUTES)
    for i in (0, 1):
        assert np.array_equal(plain[i]["people"]["boxes"], served[i]["people"]["boxes"])
        assert np.array_equal(plain[i]["people"]["scores"], served[i]["people"]["scores"])
    unfused, _ = load_checkpoint(out)
    ref = unfused.detect(images(), ROUTES, score_threshold=0.0)
    for i in (1, 2):
        np.testing.assert_allclose(served[i]["bikes"]["scores"], ref[i]["bikes"].scores.numpy(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kind", sorted(DEFAULT_BACKBONES))
def test_lora_stores_under_five_percent_of_the_backbone(kind):
    model = HydraNet(HydraNetConfig(backbone=DEFAULT_BACKBONES[kind], heads={"people": {"classes": ["person"]}}))
    adapter = model.add_adapter("people_lora", ["people"])  # the CLI's default: rank 4 on the last stage
    backbone = sum(p.numel() for p in model.backbone.parameters())
    stored = sum(p.numel() for p in adapter.parameters())
    assert 0 < stored < 0.05 * backbone, f"{stored} of {backbone}"


def test_an_adapter_file_needs_its_unchanged_base(base, tmp_path):
    lora = {"heads": {"bikes": ["bicycle"]}, "lora": {"rank": 2}, "steps": 1, **TINY}
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "base.safetensors").write_bytes(base.read_bytes())
    out = train(TrainConfig(out=moved / "a.safetensors", init=moved / "base.safetensors", **lora), progress=False)
    assert read_metadata(out)["base"]["path"] == "base.safetensors"  # relative: the pair can move together
    (moved / "base.safetensors").rename(moved / "elsewhere.safetensors")
    with pytest.raises(CheckpointError, match=r"a\.safetensors: adds to the checkpoint .*moved/base\.safetensors, "
                                              r"which is missing"):
        load_checkpoint(out)
    model, _ = load_checkpoint(moved / "elsewhere.safetensors")
    model.heads["people"].config.score_threshold = 0.9  # a rewritten base: same names, other bytes
    save_checkpoint(model, moved / "base.safetensors")
    with pytest.raises(CheckpointError, match=r"which has changed since \(sha256 \w+, expected \w+\): the adapter "
                                              r"was trained on other weights"):
        load_checkpoint(out)


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_unfreezing_stages_reports_the_other_heads_before_and_after(kind, bases, tmp_path, capsys):
    base = bases(kind)
    out = tmp_path / "ft.safetensors"
    assert cli_main(["train", "--from", str(base), "--out", str(out), "--head", "bikes=bicycle",
                     "--unfreeze-stages", "2", "--input-size", "64x96", "--steps", "2", "--batch-size", "2",
                     "--lr", "0.05", "--eval-scenes", "1", "--eval-frames", "3", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    before, _ = load_checkpoint(base)
    after, training = load_checkpoint(out)
    record = training["history"][-1]
    assert record["unfrozen_stages"] == 2 and record["heads"] == ["bikes"]
    small = EvalConfig(scenes=1, frames_per_scene=3)
    assert record["other_heads_map50"] == {"before": {"people": evaluate(before, small)["heads"]["people"]["map50"]},
                                           "after": {"people": evaluate(after, small)["heads"]["people"]["map50"]}}
    assert "the other heads, not trained" in printed and "people" in printed and " -> " in printed
    # what the report is for: the people head's outputs changed although it was not trained
    old, new = before.state_dict(), after.state_dict()
    assert all(torch.equal(v, new[k]) for k, v in old.items() if k.startswith("heads.people."))
    stages = before.backbone.num_stages
    frozen = set(before.backbone.stage_parameters(0)) - set(before.backbone.stage_parameters(stages - 2))
    assert all(torch.equal(old[f"backbone.{k}"], new[f"backbone.{k}"]) for k in frozen)
    assert any(not torch.equal(old[f"backbone.{k}"], new[f"backbone.{k}"])
               for k in before.backbone.stage_parameters(stages - 1))
    x = images()
    assert not torch.equal(before.detect(x, score_threshold=0.0)[0]["people"].scores,
                           after.detect(x, [["people"]] * 3, score_threshold=0.0)[0]["people"].scores)


@pytest.mark.parametrize("options, message", [
    ({"freeze_shared": True, "lora": {"rank": 2}}, "choose one fine-tuning mode"),
    ({"unfreeze_stages": 1, "lora": {"rank": 2}}, "choose one fine-tuning mode"),
    ({"unfreeze_stages": 1, "init": None}, "need an init checkpoint"),
    ({"lora": {"rank": 2}, "init": None}, "need an init checkpoint"),
])
def test_fine_tuning_modes_are_checked(options, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        TrainConfig(out=tmp_path / "x.safetensors", heads={"bikes": ["bicycle"]}, **{"init": tmp_path / "b", **options})


@pytest.mark.parametrize("options, message", [
    ({"unfreeze_stages": 9}, r"unfreeze_stages 9: the backbone \(\w+\) has \d stages"),
    ({"lora": {"rank": 2, "stages": 9}}, "lora stages must be at most the backbone's"),
    ({"lora": {"rank": 0}}, "lora rank must be >= 1"),
])
def test_fine_tuning_settings_that_do_not_fit_the_model_are_refused(options, message, base, tmp_path):
    heads = {"bikes": ["bicycle"]}
    with pytest.raises(ConfigError, match=message):
        train(TrainConfig(out=tmp_path / "x.safetensors", heads=heads, init=base, steps=1, **options, **TINY),
              progress=False)


def test_lora_refuses_heads_the_model_already_has(base, tmp_path):
    with pytest.raises(ConfigError, match=r"lora trains new heads only"):
        train(TrainConfig(out=tmp_path / "x.safetensors", heads={"people": ["person"]}, init=base,
                          lora={"rank": 2}, steps=1, **TINY), progress=False)


def test_attributes_on_adapter_heads_and_onnx_export_are_refused(base):
    from models.export import export_onnx

    model, _ = load_checkpoint(base)
    model.add_head("bikes", ["bicycle"])
    model.add_adapter("bikes", ["bikes"])
    with pytest.raises(ConfigError, match="attributes of adapted heads are not supported"):
        model.add_attribute("kind", ["a", "b"], on="bikes", of=["bicycle"])
    with pytest.raises(ConfigError, match="use the torch backend"):
        export_onnx(model, "never-written.onnx")


@pytest.mark.parametrize("model, message", [
    ({"backend": "onnxruntime"}, r"model\.backend: a\.safetensors has LoRA adapters"),
    # before anything starts (the replica refused it, its message pointing at the torch backend int8 is not)
    ({"precision": "int8"}, r"model\.precision: int8 runs the ONNX export in OpenVINO, which does not carry "
                            r"a\.safetensors's LoRA adapters"),
    ({"distribute": "object_store"}, r"model\.distribute: a\.safetensors is a LoRA adapter file that loads with its "
                                     r"base \(\.\./\w+/base\.safetensors\)"),
])
def test_the_service_refuses_adapter_files_where_it_cannot_run_them(model, message, base, tmp_path):
    from pipeline.app import App
    from pipeline.config import ConfigError as ServiceConfigError, parse_config

    out = train(TrainConfig(out=tmp_path / "a.safetensors", heads={"bikes": ["bicycle"]}, init=base,
                            lora={"rank": 2}, steps=1, **TINY), progress=False)
    def config(**options):
        return parse_config({"model": {"checkpoint": str(out), **options},
                             "cameras": [{"id": "c", "url": "synthetic://street", "heads": ["bikes"]}]})

    assert App(config(), say=lambda m: None).check_model()["heads"]["bikes"] == ["bicycle"]  # path, torch: fine
    with pytest.raises(ServiceConfigError, match=message):
        App(config(**model), say=lambda m: None).check_model()
