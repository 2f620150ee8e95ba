"""Waits that pytest-timeout cannot end (round 18): CI's run stopped at 96% with no failure until its 90 minutes
ran out."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def untimed_ray_waits(root: Path, folders: list[str]) -> list[str]:
    """Every ``ray.get(...)`` / ``ray.wait(...)`` call without a ``timeout=`` keyword, as "path:line: call"."""
    found = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "ray"
                        and node.func.attr in ("get", "wait")
                        and not any(k.arg == "timeout" for k in node.keywords)):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)[:100]}")
    return found


def test_every_ray_get_and_wait_has_a_timeout() -> None:
    """Ray's ray.get/ray.wait wait in C++ and look at signals once a second, but raise only KeyboardInterrupt and
    SystemExit from a handler (ray/_raylet.pyx, check_signals): pytest-timeout's SIGALRM handler raises
    pytest.fail, which Ray drops (tried: a handler raising at 3 s left ray.get of a task that never ends waiting
    at 25 s). So one actor that never answers held a test worker for good, with no F. In the service's own code a
    wait with no end is the same defect: a camera process or replica that never answers."""
    assert untimed_ray_waits(ROOT, ["pipeline", "workers", "tests"]) == []


def test_the_scan_finds_an_untimed_wait(tmp_path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("import ray\nray.get(ref)\nray.get(ref, timeout=5)\nray.wait([r])\n")
    assert untimed_ray_waits(tmp_path, ["pkg"]) == ["pkg/m.py:2: ray.get(ref)", "pkg/m.py:4: ray.wait([r])"]
