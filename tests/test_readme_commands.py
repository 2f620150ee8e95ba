"""README.md as a newcomer follows it, checked mechanically: its `hydravision` commands parse, the options and
config keys it names exist, its examples validate, its Redis table names every key the service writes, and
what it says of `PYTHON=... ./dev.sh` holds. No service runs here (the commands themselves were run by hand)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from pipeline.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PROSE = re.sub(r"\s*\n\s*", " ", re.sub(r"```.*?```", "", README, flags=re.S))  # inline code may wrap lines


def _section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def _block_commands() -> list[str]:
    """Every `hydravision ...` line of the README's bash blocks, continuations joined, comments cut."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\$\([^)]*\)", "X", line)  # "$(grep ... .env | cut ...)": a value, not our business
            words = shlex.split(line, comments=True)
            for i, word in enumerate(words):
                if word == "hydravision" or word.endswith("/hydravision"):
                    rest = words[i + 1:]
                    commands.append(rest[:rest.index(">")] if ">" in rest else rest)
                    break
    return commands


def _subparser(name: str):
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices[name]


@pytest.mark.parametrize("args", _block_commands(), ids=" ".join)
def test_every_hydravision_command_in_the_readme_parses(args):
    """The COCO example's `train --from coco.safetensors ... --data ...` had no --out: argparse refused it
    ("the following arguments are required: --out") where a newcomer copied it."""
    try:
        build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"README command does not parse: hydravision {' '.join(args)}")


def test_the_readme_shows_many_commands():
    """The extraction above found the README's commands (an empty list would pass every parse test)."""
    subcommands = {args[0] for args in _block_commands()}
    assert {"tail", "status", "cameras", "dashboard", "run", "demo", "train", "eval", "import-detector"} <= subcommands


def test_inline_hydravision_options_exist():
    """`hydravision SUB --flag ...` in the prose names flags that SUB has."""
    spans = [s for s in re.findall(r"`([^`]+)`", PROSE) if s.startswith("hydravision ")]
    assert len(spans) >= 5
    for span in spans:
        words = span.split()
        parser = _subparser(words[1])
        for flag in (w for w in words[2:] if w.startswith("--")):
            assert flag in parser._option_string_actions, f"README: `{span}`: hydravision {words[1]} has no {flag}"


def test_readme_lists_every_dashboard_option():
    """README's Dashboard section lists the command's options; --allowed-host, without which a proxy's requests
    to a loopback-bound page are refused (403), was missing."""
    section = re.sub(r"\s+", " ", _section("Dashboard"))
    for action in _subparser("dashboard")._actions:
        shared = ("--help", "--redis-url", "--verbose")  # --verbose: debug logging, an option of every command
        for flag in (f for f in action.option_strings if f.startswith("--") and f not in shared):
            assert f"`{flag}" in section, f"README, Dashboard: `hydravision dashboard {flag}` is not described"


def test_readme_redis_table_names_every_key_the_service_writes():
    """"What lands in Redis" left out `hv:publisher:{id}`: the service writes one per publisher, and a Redis ACL
    or a key count made from the table missed it."""
    from pipeline.control import control_key, results_key
    from workers.publish import keys
    from workers.stream import retired_track_ids_key

    table = _section("What lands in Redis (schema version 1)")
    k = keys("hv")
    written = [k.detections("{camera}"), k.live("{camera}"), k.events, k.cameras, k.counts("{camera}"),
               k.snapshot("{camera}"), k.publisher("{id}"), control_key("hv"), results_key("hv"),
               retired_track_ids_key("hv")]
    methods = {n for n in vars(type(k)) if not n.startswith("_")}
    assert methods == {"detections", "live", "events", "cameras", "counts", "snapshot", "publisher"}, \
        "workers.publish.Keys has a new key: add it here and to README's table"
    for key in written:
        assert f"`{key}`" in table, f"README's Redis table does not list {key}"


def test_readme_config_keys_and_camera_fields_exist():
    """Every `section.key` and per-camera field the README names is a real config field."""
    from pipeline.config import Config
    from workers.settings import CameraConfig

    checked = 0
    for dotted in set(re.findall(r"`([a-z_]+\.[a-z_]+)(?::[^`]*)?`", PROSE)):
        section, key = dotted.split(".")
        model = Config if section in Config.model_fields else CameraConfig  # `tracker.appearance` is per camera
        if section in model.model_fields:  # not `torch.compile`, `bench_pipeline.py`
            assert key in model.model_fields[section].annotation.model_fields, f"README names {dotted}: no such key"
            checked += 1
    assert checked >= 10
    fields = _section("Running on real cameras").split("Per camera:", 1)[1].split("See", 1)[0]
    named = set(re.findall(r"`([a-z_]+)`", re.sub(r"\([^()]*\)", "", fields)))  # not the values in (...)
    assert len(named) >= 10 and named <= set(CameraConfig.model_fields), named - set(CameraConfig.model_fields)


def test_readme_examples_validate():
    """The zones YAML is a valid config, and the detection message is valid against its JSON Schema."""
    from pipeline.config import Config

    config = Config.model_validate(yaml.safe_load(re.findall(r"```yaml\n(.*?)```", README, re.S)[0]))
    assert [z.name for z in config.cameras[0].zones] == ["crossing", "door"]
    schema = json.loads((ROOT / "workers" / "schemas" / "detection-v1.json").read_text())
    message = json.loads(re.findall(r"```json\n(.*?)```", README, re.S)[0])
    jsonschema.validators.validator_for(schema)(schema).validate(message)


def _stub(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_python_variable_picks_the_interpreter_of_a_new_venv_only(tmp_path):
    """README said `PYTHON=python3.12 ./dev.sh ...` picks another interpreter for .venv; with a .venv already
    there dev.sh updates it in place and never runs $PYTHON, so the run stayed on the old interpreter
    unannounced. dev.sh runs here on a copy, with stand-ins for .venv's python and for $PYTHON."""
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    for name in ("dev.sh", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    _stub(tmp_path / ".venv" / "bin" / "python", "#!/bin/sh\nexit 0\n")  # pip works: an existing .venv
    _stub(tmp_path / ".venv" / "bin" / "hydravision", "#!/bin/sh\nexit 0\n")
    _stub(tmp_path / "other-python", f"#!/bin/sh\ntouch {tmp_path}/other-python-ran\nexit 0\n")
    env = {**os.environ, "PYTHON": str(tmp_path / "other-python")}
    run = subprocess.run(["bash", "dev.sh", "setup"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert not (tmp_path / "other-python-ran").exists(), "dev.sh now uses $PYTHON for an existing .venv: fix README"
    said = re.search(r"`PYTHON=\S+ \./dev\.sh \.\.\.` (.*?)\. [A-Z]", PROSE).group(1)
    assert "new `.venv`" in said and "existing" in said, f"README: `PYTHON=... ./dev.sh ...` {said}"
