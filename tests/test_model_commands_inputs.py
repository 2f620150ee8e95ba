"""The model commands a user runs by hand: bad arguments are one-line user errors (exit 2), outputs are never
left half-written, and resuming or fine-tuning does not silently ignore what the user asked for."""

from pathlib import Path

import pytest
import torch

import models.checkpoint as checkpoint_module
from models.checkpoint import load_checkpoint, read_tensors, save_checkpoint
from models.hydranet import ConfigError
from models.train import TrainConfig, train
from pipeline import model_commands
from pipeline.cli import main as cli_main

TINY = {"input_size": (64, 96), "backbone": {"type": "resnet", "depth": 10, "width": 8},
        "neck": {"type": "fpn", "channels": 16}, "batch_size": 2, "workers": 0, "warmup_steps": 1}
TINY_ARGS = ["--input-size", "64x96", "--depth", "10", "--width", "8", "--neck-channels", "16", "--batch-size", "1",
             "--steps", "1", "--no-progress"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("audit") / "base.safetensors"
    return train(TrainConfig(out=out, heads={"people": ["person"]}, steps=1, **TINY), progress=False)


def test_train_makes_the_output_folder_before_training_not_at_the_first_state_save(tmp_path):
    out = tmp_path / "new" / "deeper" / "o.safetensors"
    assert train(TrainConfig(out=out, heads={"people": ["person"]}, steps=1, **TINY), progress=False) == out
    assert out.is_file()


def test_train_out_whose_folder_cannot_be_made_is_a_user_error(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    rc = cli_main(["train", "--out", str(tmp_path / "a-file" / "o.safetensors"), "--head", "people=person", *TINY_ARGS])
    assert rc == 2
    assert "a-file/o.safetensors" in capsys.readouterr().err


def test_from_refuses_architecture_options_it_would_ignore(base, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    rc = cli_main(["train", "--from", str(base), "--freeze-shared", "--out", str(out), "--head", "vehicles=car",
                   "--input-size", "128x192", "--backbone", "vit", "--steps", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert "--input-size 128x192 (it has 64x96)" in err and "--backbone vit (it has resnet)" in err
    # a value given that happens to be the parser's default is the user's too (256x448 is a new model's default)
    rc = cli_main(["train", "--from", str(base), "--freeze-shared", "--out", str(out), "--head", "vehicles=car",
                   "--input-size", "256x448", "--steps", "1", "--no-progress"])
    assert rc == 2 and "--input-size 256x448 (it has 64x96)" in capsys.readouterr().err and not out.exists()
    # the same values as the checkpoint's are fine
    rc = cli_main(["train", "--from", str(base), "--freeze-shared", "--out", str(out), "--head", "vehicles=car",
                   *TINY_ARGS])
    assert rc == 0 and out.is_file()


def test_import_backbone_training_follows_its_seed(base, tmp_path):
    weights = tmp_path / "backbone.pth"
    torch.save(load_checkpoint(base)[0].backbone.state_dict(), weights)
    outs = []
    for i in range(2):
        outs.append(tmp_path / f"imp{i}.safetensors")
        assert cli_main(["train", "--import-backbone", str(weights), "--out", str(outs[-1]), "--head",
                         "people=person", "--seed", "3", *TINY_ARGS]) == 0
    a, b = read_tensors(outs[0]), read_tensors(outs[1])
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def _interrupt_at(step_to_stop: int):
    class Stop(Exception):
        pass

    def on_step(step, _):
        if step == step_to_stop:
            raise Stop

    return Stop, on_step


def test_resume_refuses_a_state_whose_from_checkpoint_changed_since(base, tmp_path):
    init = tmp_path / "base.safetensors"
    init.write_bytes(base.read_bytes())
    cfg = dict(out=tmp_path / "plus.safetensors", heads={"vehicles": ["car"]}, init=init,
               lora={"rank": 2, "stages": 1}, steps=4, checkpoint_every=2, **TINY)
    stop, on_step = _interrupt_at(2)  # after the state of step 2 is saved
    with pytest.raises(stop):
        train(TrainConfig(**cfg), progress=False, on_step=on_step)
    model, training = load_checkpoint(init)  # the user retrains the base in place
    with torch.no_grad():
        model.backbone.conv1.weight.add_(0.01)
    save_checkpoint(model, init, training)
    with pytest.raises(ConfigError, match="changed since"):
        train(TrainConfig(**cfg), progress=False)


def test_resume_after_import_backbone_still_resumes(base, tmp_path, monkeypatch):
    """The imported start file is written again by every run (other bytes, same weights): resuming still works."""
    weights = tmp_path / "backbone.pth"
    torch.save(load_checkpoint(base)[0].backbone.state_dict(), weights)
    def on_step(step, _):
        if step == 2:  # after the state of step 2 is saved: Ctrl-C
            raise KeyboardInterrupt

    real = model_commands.train_model

    def small_states(cfg, progress=True, interrupt=True):
        cfg.checkpoint_every = 2
        return real(cfg, progress=progress, on_step=on_step if interrupt else None)

    args = ["train", "--import-backbone", str(weights), "--out", str(tmp_path / "o.safetensors"),
            "--head", "people=person", *TINY_ARGS, "--steps", "4"]
    monkeypatch.setattr(model_commands, "train_model", small_states)
    assert cli_main(args) == 130
    monkeypatch.setattr(model_commands, "train_model", lambda cfg, progress: small_states(cfg, progress, False))
    assert cli_main(args) == 0
    assert load_checkpoint(tmp_path / "o.safetensors")[1]["history"][-1]["resumed_from_step"] == 2


def test_export_out_naming_the_checkpoint_is_refused_and_leaves_it(base, tmp_path, capsys):
    ckpt = tmp_path / "m.safetensors"
    ckpt.write_bytes(base.read_bytes())
    assert cli_main(["export", str(ckpt), "--out", str(ckpt)]) == 2
    assert "is the checkpoint itself" in capsys.readouterr().err
    assert ckpt.read_bytes() == base.read_bytes()


def test_export_out_a_folder_or_unwritable_is_a_user_error_and_leaves_nothing(base, tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    assert cli_main(["export", str(base), "--out", str(tmp_path / "folder")]) == 2
    assert "is a folder" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    assert cli_main(["export", str(base), "--out", str(tmp_path / "a-file" / "m.onnx")]) == 2
    assert "a-file/m.onnx: cannot write it" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "folder"]


def test_export_interrupted_mid_write_keeps_the_old_file_and_no_temporary(base, tmp_path, monkeypatch):
    from models.export import export_onnx

    out = tmp_path / "m.onnx"
    out.write_bytes(b"the good old export")

    def half_written(model, args, path, **kwargs):
        Path(path).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.onnx, "export", half_written)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(load_checkpoint(base)[0], out)
    assert out.read_bytes() == b"the good old export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_checkpoint_save_interrupted_keeps_the_old_file_and_no_temporary(base, tmp_path, monkeypatch):
    out = tmp_path / "m.safetensors"
    out.write_bytes(base.read_bytes())

    def half_written(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module, "save_file", half_written)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(load_checkpoint(base)[0], out)
    assert out.read_bytes() == base.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_unfreeze_stages_shows_progress_while_scoring_the_other_heads(base, tmp_path, capsys):
    train(TrainConfig(out=tmp_path / "ft.safetensors", heads={"vehicles": ["car"]}, init=base, unfreeze_stages=1,
                      eval_scenes=1, eval_frames=1, steps=1, **TINY), progress=True)
    assert capsys.readouterr().err.count("eval:") >= 2  # before and after


def test_a_head_named_twice_is_refused_not_trained_on_its_last_classes_only(tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    assert cli_main(["train", "--out", str(out), "--head", "people=person", "--head", "people=car", *TINY_ARGS]) == 2
    assert "--head people is given more than once (person; car)" in capsys.readouterr().err
    assert not out.exists()


def test_lora_stages_without_lora_is_refused(tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    assert cli_main(["train", "--out", str(out), "--head", "people=person", "--lora-stages", "2", *TINY_ARGS]) == 2
    assert "--lora-stages 2" in capsys.readouterr().err and not out.exists()


def test_training_interrupted_while_saving_its_state_keeps_the_last_state_and_no_temporary(tmp_path, monkeypatch):
    import models.train as train_module

    cfg = dict(out=tmp_path / "o.safetensors", heads={"people": ["person"]}, steps=4, checkpoint_every=2, **TINY)
    real_save, saves = torch.save, []

    def second_save_interrupted(obj, path):
        saves.append(path)
        if len(saves) == 2:
            Path(path).write_bytes(b"half")
            raise KeyboardInterrupt
        real_save(obj, path)

    monkeypatch.setattr(train_module.torch, "save", second_save_interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**cfg), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.safetensors.train-state.pt"]
    monkeypatch.setattr(train_module.torch, "save", real_save)
    train(TrainConfig(**cfg), progress=False)  # resumes from the state of step 2
    assert load_checkpoint(cfg["out"])[1]["history"][-1]["resumed_from_step"] == 2
