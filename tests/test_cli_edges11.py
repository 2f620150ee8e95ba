"""The command line as an operator meets it, round 11: -v after the command (as the bug message's "run with -v"
reads), --log-format json for a library's warnings and a thread's exception, and a model file that cannot be
written (a full disk) shown as the user's problem, not as a bug."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import build_parser, main as cli_main

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("argv", [["eval", "-v"], ["run", "my.yaml", "--verbose"], ["cameras", "list", "-v"]])
def test_verbose_is_taken_after_the_command_too(argv):
    """Refused with "unrecognized arguments: -v" (exit 2), where the bug message says "run with -v"."""
    assert build_parser().parse_args(argv).verbose is True


def test_verbose_before_the_command_still_counts_and_left_out_is_off():
    """Guard of the fix (passes on the original too): the commands' own -v must not reset the main parser's."""
    assert build_parser().parse_args(["-v", "status"]).verbose is True
    assert build_parser().parse_args(["-v", "cameras", "list"]).verbose is True
    assert build_parser().parse_args(["status"]).verbose is False


def test_json_logs_carry_library_warnings_and_thread_exceptions_as_json_lines():
    """Both were printed raw on stderr, over several lines, beside the JSON records on stdout."""
    script = ("import threading, warnings\n"
              "from pipeline.logs import setup_logging\n"
              "setup_logging(False, 'json')\n"
              "warnings.warn('deprecated: redis://u:pw-7731@h/0')\n"
              "t = threading.Thread(target=lambda: 1 / 0, name='reader-1')\n"
              "t.start(); t.join()\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, encoding="utf-8", cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["level"], r["logger"]) for r in records] == [("warning", "py.warnings"), ("error", "hydravision")]
    assert "deprecated: redis://***@h/0" in records[0]["msg"] and "pw-7731" not in proc.stdout
    assert "reader-1" in records[1]["msg"] and "ZeroDivisionError" in records[1]["exc"]


@contextlib.contextmanager
def _file_size_limit(limit: int):
    """Writes past ``limit`` bytes fail (EFBIG) as they do on a full disk; SIGXFSZ ignored, as it would kill us."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


@pytest.fixture
def tiny_import(monkeypatch):
    """import_torchvision_fcos stood in for by a tiny model with a 'coco' head (the real one is ResNet-50)."""
    from models.hydranet import HydraNet, HydraNetConfig
    from pipeline import model_commands

    cfg = HydraNetConfig(input_size=(64, 96), backbone={"type": "resnet", "depth": 10, "width": 8},
                         neck={"type": "fpn", "channels": 16}, heads={"coco": {"classes": ["person", "car"]}})
    monkeypatch.setattr(model_commands, "import_torchvision_fcos", lambda path, size: HydraNet(cfg))


def test_a_checkpoint_that_cannot_be_written_is_a_user_error_and_leaves_no_file(tmp_path, tiny_import, capsys):
    """safetensors raises SafetensorError ("I/O error: No space left on device"), not OSError: a traceback and
    "a bug in hydravision" (exit 1)."""
    weights = tmp_path / "fcos.pth"
    weights.write_bytes(b"never read: the import is stood in for")
    out = tmp_path / "coco.safetensors"
    with _file_size_limit(4096):
        code = cli_main(["import-detector", str(weights), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"error: --out {out}: a file could not be written in its folder" in err and "bug in hydravision" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fcos.pth"]


def test_training_state_that_cannot_be_written_is_a_user_error(tmp_path, monkeypatch, capsys):
    """torch.save raises a RuntimeError of its zip writer ("unexpected pos ..."): the same traceback. The training
    stood in for by its state's save alone (models/train.py saves it every checkpoint_every steps)."""
    import torch

    from pipeline import model_commands

    def save_state(cfg, progress):
        torch.save({"model": torch.zeros(10_000)}, cfg.state_path)

    monkeypatch.setattr(model_commands, "train_model", save_state)
    out = tmp_path / "m.safetensors"
    with _file_size_limit(4096):
        code = cli_main(["train", "--out", str(out), "--head", "people=person", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"error: --out {out}: a file could not be written in its folder" in err and "bug in hydravision" not in err


class StandInApp:
    """What `run` calls on the App, with no Ray, model or camera: final stats of many cameras (a large summary)."""

    def __init__(self, config, redis_url=None, say=print, on_ray_started=None) -> None:
        self.cameras: dict = {}

    def install_signal_handlers(self) -> None:
        pass

    def start(self) -> None:
        pass

    def run(self, duration=None, on_tick=None) -> list[dict]:
        return []

    def shutdown(self, drain: bool = True) -> list[dict]:
        return [{"camera": f"street-{i}", "state": "stopped", "published": 3} for i in range(200)]


def test_a_summary_json_that_cannot_be_written_whole_leaves_the_last_one(tmp_path, monkeypatch, capsys):
    """A full disk wrote half the JSON under --summary-json's name (over the last run's)."""
    monkeypatch.setattr("pipeline.run_commands.App", StandInApp)
    path = tmp_path / "s.json"
    path.write_text('[{"camera": "last-run"}]')
    with _file_size_limit(4096):
        code = cli_main(["run", str(ROOT / "configs/demo.yaml"), "--plain", "--summary-json", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and f"error: --summary-json {path}: cannot write: File too large" in err, err
    assert json.loads(path.read_text()) == [{"camera": "last-run"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]
    assert cli_main(["run", str(ROOT / "configs/demo.yaml"), "--plain", "--summary-json", str(path)]) == 0
    assert len(json.loads(path.read_text())) == 200


@pytest.mark.parametrize("option", [["--consumer", "alerts-1"], ["--claim-idle-ms", "5000"]])
def test_tail_refuses_group_options_without_a_group(option, capsys):
    """They were ignored: a plain tail ran, not the consumer group member the operator asked for."""
    code = cli_main(["tail", "--events", *option, "--redis-url", "redis://127.0.0.1:9/0"])
    err = capsys.readouterr().err
    assert code == 2 and f"error: {option[0]} is for a member of a consumer group: it needs --group GROUP" in err, err
    assert "cannot reach Redis" not in err  # refused before anything is read


class _Terminal:
    """A stderr that says it is a terminal (a pty costs a child process)."""

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def test_training_draws_its_progress_bar_only_on_a_terminal(tmp_path, monkeypatch, capsys):
    """`hydravision train ... > train.log 2>&1` filled the log with the bar's redraws (~10 a second, joined by
    carriage returns) and never wrote the step lines that models/ logs for logs and pipes when the bar is off."""
    from pipeline import model_commands

    asked = []
    monkeypatch.setattr(model_commands, "train_model", lambda cfg, progress: asked.append(progress) or cfg.out)
    monkeypatch.setattr(model_commands, "format_fine_tune", lambda path: "")
    argv = ["train", "--out", str(tmp_path / "m.safetensors"), "--head", "people=person"]
    assert cli_main(argv) == 0  # stderr captured by pytest: no terminal
    with monkeypatch.context() as m:
        m.setattr(sys, "stderr", _Terminal())
        assert cli_main(argv) == 0
        assert cli_main([*argv, "--no-progress"]) == 0
    assert asked == [False, True, False]


def test_a_summary_json_to_a_pipe_or_through_a_symlink_is_written_where_it_points(tmp_path, monkeypatch, capsys):
    """Written aside and renamed, a summary to /dev/fd/N (``--summary-json >(jq ...)``) failed ("cannot write": no
    file can be made beside it), and one through a symlink replaced the link with a file, the real one left stale."""
    monkeypatch.setattr("pipeline.run_commands.App", StandInApp)
    real, link = tmp_path / "real.json", tmp_path / "link.json"
    real.write_text("[]")
    link.symlink_to(real)
    assert cli_main(["run", str(ROOT / "configs/demo.yaml"), "--plain", "--summary-json", str(link)]) == 0
    assert link.is_symlink() and len(json.loads(real.read_text())) == 200
    read, write = os.pipe()
    with os.fdopen(read, "rb") as reader:
        code = cli_main(["run", str(ROOT / "configs/demo.yaml"), "--plain", "--summary-json", f"/dev/fd/{write}"])
        os.close(write)
        assert code == 0, capsys.readouterr().err
        assert len(json.loads(reader.read())) == 200
