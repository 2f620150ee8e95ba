"""What `hydravision run` prints where services run (issue 13, part 4): with --log-format json every stdout
line is one JSON object (messages, status lines with their stats, the final stats); the text output keeps
its long lines; Ray's start-up noise a user cannot act on shows in neither, unless -v."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.logs import RAY_TOKEN_LOGGER, RAY_TOKEN_NOTICE, JsonFormatter, quiet_ray

ROOT = Path(__file__).resolve().parent.parent
RAY_NOISE = (RAY_TOKEN_NOTICE, "constructor arguments in the object store")


@pytest.mark.timeout(150)
@pytest.mark.slow  # the whole service twice (~20 s each); its pieces are unit-tested below in the default run
@pytest.mark.parametrize("log_format", ["json", "text"])
def test_run_output_for_services(log_format, tmp_path, redis_url, tiny_checkpoint):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "redis": {"url": redis_url}, "model": {"checkpoint": str(tiny_checkpoint), "device": "cpu"},
        "cameras": [{"id": "cam", "url": "synthetic://street?seed=3&fps=8"}]}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_AUTH_MODE", None)  # Ray's default: token auth on, and its notice printed
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(config), "--plain", "--duration", "4",
                           "--log-every", "1", "--log-format", log_format],
                          capture_output=True, encoding="utf-8", env=env, cwd=ROOT, timeout=140)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for noise in RAY_NOISE:
        assert noise not in proc.stdout + proc.stderr
    if log_format == "text":
        rows = [line for line in proc.stdout.splitlines() if line.startswith("│ cam ")]
        assert rows and len(rows[-1]) > 100  # not cut to 80 columns although stdout is a pipe
        return
    records = [json.loads(line) for line in proc.stdout.splitlines()]  # every line is one JSON object
    assert all({"ts", "level", "logger", "msg"} <= r.keys() for r in records)
    assert proc.stderr.strip() == ""
    statuses = [r for r in records if r.get("event") == "status"]
    finals = [r for r in records if r.get("event") == "final"]
    assert statuses and all(s["cameras"][0]["camera"] == "cam" for s in statuses)
    assert len(finals) == 1 and finals[0]["cameras"][0]["published"] > 0
    assert any(r["msg"].startswith("Running 1 camera(s)") for r in records)


def test_ray_token_notice_is_held_back_unless_verbose():
    logger = logging.getLogger(RAY_TOKEN_LOGGER)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    filters = list(logger.filters)
    logger.filters[:] = []  # what an earlier in-process CLI run (tests/test_hostile.py) left on this global logger
    logger.addHandler(handler)
    try:
        quiet_ray(verbose=True)
        logger.warning(f"{RAY_TOKEN_NOTICE}. Set RAY_AUTH_MODE=disabled to opt out.")
        quiet_ray(verbose=False)
        logger.warning(f"{RAY_TOKEN_NOTICE}. Set RAY_AUTH_MODE=disabled to opt out.")
        logger.warning("Token authentication is disabled for this Ray cluster.")  # a real warning stays
    finally:
        logger.removeHandler(handler)
        logger.filters[:] = filters
    assert seen == [f"{RAY_TOKEN_NOTICE}. Set RAY_AUTH_MODE=disabled to opt out.",
                    "Token authentication is disabled for this Ray cluster."]


def test_json_records_hide_credentials_and_carry_fields():
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "cannot open %s", ("rtsp://u:pw-77@cam/x",), None)
    record.data = {"event": "status", "cameras": [{"camera": "a"}]}
    out = json.loads(JsonFormatter().format(record))
    assert out["msg"] == "cannot open rtsp://***@cam/x" and out["level"] == "warning"
    assert out["cameras"] == [{"camera": "a"}]
