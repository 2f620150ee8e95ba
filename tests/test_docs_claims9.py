"""README.md and docs/architecture.md against the code, round 9: the statements today's code changes left behind,
a claim one document makes and the other (or the same one) denies, and mechanical checks that every code
reference, command flag and config key docs/architecture.md names exists. No service runs here."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
ARCH = (ROOT / "docs" / "architecture.md").read_text()


def _flat(text: str) -> str:
    """Prose on one line, code blocks out: a claim may wrap anywhere."""
    return re.sub(r"\s+", " ", re.sub(r"```.*?```", "", text, flags=re.S))


def _paragraph(text: str, start: str) -> str:
    """The paragraph (or list item) of ``text`` that begins with ``start``."""
    return _flat(text.split(start, 1)[1].split("\n\n", 1)[0].split("\n- ", 1)[0])


def test_the_controllers_threads_say_where_http_commands_run():
    """architecture.md said uvicorn runs each request in its worker pool; since 6bbe42f add, update and remove
    run in threads of their own (at most COMMANDS_AT_ONCE), as 40 adds waiting on Ray held that whole pool."""
    from pipeline.api import COMMANDS_AT_ONCE
    from pipeline.control import MAX_AT_ONCE, MAX_READ

    threads = _paragraph(ARCH, "**The threads of the controller.**")
    assert "runs each request in its worker pool" not in threads
    assert "COMMANDS_AT_ONCE" in threads and f"at most {COMMANDS_AT_ONCE} at once" in threads, threads[:400]
    assert f"at most {MAX_AT_ONCE} cameras' commands at once, and {MAX_READ} read and unanswered" in threads


def test_readme_backends_agree_with_pick_backend_and_this_readme(monkeypatch):
    """README's Backends said the CPUs of this project's machines run bf16 natively, where its own test timings
    name a host without AVX512-BF16 (this machine kind has none); and it left out that bf16 asked for on such a
    CPU keeps torch (pick_backend), which docs/architecture.md says."""
    from workers import model_runner

    monkeypatch.setattr(model_runner, "native_bf16", lambda: False)
    model = SimpleNamespace(adapters={})
    cpu = torch.device("cpu")
    assert model_runner.pick_backend("auto", cpu, torch.bfloat16, False, model, "bf16") == "torch"
    assert model_runner.pick_backend("auto", cpu, None, False, model, "auto") == "onnxruntime"
    prose = _flat(README)
    assert "a host without AVX512-BF16" in prose  # the test timings' host
    backends = _paragraph(README, "**Backends.**")
    assert "as this project's machines do;" not in backends, "README: which machines run bf16 natively?"
    assert "bf16 on a CPU without native bf16" in backends, backends[:500]


def test_every_refusal_of_strict_json_is_documented():
    """architecture.md's list of what every way in refuses (strict_json) missed the lone UTF-16 surrogate, refused
    since 6bbe42f (a camera URL with one made every later list fail)."""
    from pipeline.admission import strict_json

    refused = {"twice": '{"a": 1, "a": 2}', "NaN": '{"a": NaN}', "nesting": "[" * 100_000 + "]" * 100_000,
               "surrogate": '{"url": "rtsp://x/\\ud800"}'}
    bullet = _paragraph(ARCH, "- Every way in reads a command with")
    for word, text in refused.items():
        with pytest.raises(ValueError):
            strict_json(text)
        assert word in bullet, f"architecture.md: strict_json refuses {word!r} input, not said: {bullet}"


def test_budget_fairness_says_camera_processes_give_way_unalike():
    """architecture.md's Fairness said cameras over budget on one machine give up alike; README measured that
    they do not where each camera process runs its own model (the CPU default): 5.6, 5.6 and 10 frames/s."""
    assert "not alike: each camera process runs its own model" in _flat(README)
    fairness = _paragraph(ARCH, "**Fairness.**")
    assert "give up alike" in fairness
    assert "camera processes" in fairness and "5.6, 5.6 and 10 frames/s" in fairness, fairness[-500:]


# -- mechanical: what architecture.md names exists ------------------------------------------------------------

def _code_refs(text: str) -> list[str]:
    """`path.py:Name` references whose file or name does not exist."""
    problems = []
    for path, name in set(re.findall(r"`((?:pipeline|workers|models|benchmarks|synthetic)/[\w/]+\.py):(\w+)", text)):
        source = ROOT / path
        if not source.is_file():
            problems.append(f"{path}: no such file")
        elif not re.search(rf"^\s*(?:async def|def|class)\s+{name}\b|^\s*{name}\s*[:=]|\bself\.{name}\s*[:=]",
                           source.read_text(), re.M):
            problems.append(f"{path}:{name}: no such name")
    return problems


def _cli_flags(text: str) -> list[str]:
    """`hydravision SUB [SUBSUB] --flag` spans whose flag SUB does not take."""
    from pipeline.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    problems = []
    for span in re.findall(r"`hydravision ([^`]+)`", _flat(text)):
        words = span.split()
        parser = commands.get(words[0])
        if parser is None:
            problems.append(f"hydravision {span}: no command {words[0]}")
            continue
        nested = [a for a in parser._actions if a.dest == "action" and getattr(a, "choices", None)]
        for word in words[1:]:
            if nested and word in nested[0].choices:
                parser = nested[0].choices[word]
            elif word.startswith("--") and word.split("=")[0] not in parser._option_string_actions:
                problems.append(f"hydravision {span}: no {word}")
    return problems


# a key of results-split-2core.json, named as such; Ray's own functions (`ray` is also a config section)
NOT_CONFIG = {"model.split", "ray.get", "ray.init", "ray.put", "ray.shutdown", "ray.wait"}


def _config_keys(text: str) -> list[str]:
    """`section.key` spans, where section is a config section (or a camera field), whose key does not exist.
    Module functions named so (`placement.group_cameras`: pipeline/placement.py) are not config keys."""
    from pipeline.config import Config
    from workers.settings import CameraConfig

    problems = []
    for dotted in set(re.findall(r"`([a-z_]+\.[a-z_]+)(?::[^`]*)?`", _flat(text))) - NOT_CONFIG:
        section, key = dotted.split(".")
        model = Config if section in Config.model_fields else CameraConfig
        if section not in model.model_fields:
            continue  # `ray.init`, `torch.compile`: not ours
        module = ROOT / "pipeline" / f"{section}.py"
        if module.is_file() and re.search(rf"^def {key}\b", module.read_text(), re.M):
            continue
        annotation = model.model_fields[section].annotation
        fields = getattr(annotation, "model_fields", None)
        if fields is not None and key not in fields:
            problems.append(f"{dotted}: no such config key")
    return problems


@pytest.mark.parametrize("check", [_code_refs, _cli_flags, _config_keys])
def test_what_architecture_md_names_exists(check):
    assert check(ARCH) == []


def test_the_mechanical_checks_catch_a_broken_copy():
    """Each check above finds a deliberately broken reference (so they cannot pass by finding nothing)."""
    assert _code_refs(ARCH.replace("`pipeline/admission.py:strict_json`", "`pipeline/admission.py:strict_jsn`"))
    assert _cli_flags(ARCH + "\n`hydravision dashboard --allowed-hosts NAME`\n")
    assert _config_keys(ARCH + "\n`inference.max_batches`\n")
    assert len(re.findall(r"`(?:pipeline|workers|models)/[\w/]+\.py:\w+", ARCH)) >= 20  # it reads many
