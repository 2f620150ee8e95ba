"""Redacting a long text takes time in proportion to it: a command of 1 MiB (a camera id of letters, refused with
its value in the message) held the controller's core for half an hour in two regular expressions."""

from __future__ import annotations

import re
import time

import pytest

from workers.redact import redact_text


def _seconds(text: str, urls: list[str]) -> float:
    t0 = time.perf_counter()
    redact_text(text, urls)
    return time.perf_counter() - t0


@pytest.mark.timeout(300)
@pytest.mark.parametrize("text, urls", [
    ("a" * 100_000, []),  # every letter began a scheme scanned to the word's end: 18 s
    ("a." * 10_000, ["rtsp://u:pw@cam/x"]),  # a short secret's "name=" pattern from every word start: ~45 s
    ("ab-" * 7_000, ["rtsp://u:pw@cam/x"]),
    ("=pw " * 25_000, ["rtsp://u:pw@cam/x"]),  # a name looked for before each of 25,000 "=pw"
    (("a." * 50 + "=pw ") * 1_000, ["rtsp://u:pw@cam/x"]),
])
def test_long_texts_are_redacted_in_linear_time(text, urls) -> None:
    assert _seconds(text, urls) < 2.0  # ~0.03 s here; a machine 3x slower and busy stays far below


def test_what_the_faster_patterns_still_hide() -> None:
    shown = redact_text("opening rtsp://admin:hunter2@cam/x: pwd=pw, token=pw&x=1, pw@cam, " + "s" * 60
                        + "://user:secret@host/x", ["rtsp://u:pw@cam/x"])
    assert "hunter2" not in shown and "secret" not in shown and "pw" not in shown.replace("pwd", "")
    assert "pwd=***" in shown and "token=***&x=1" in shown and "***@cam," in shown


def test_a_refused_value_of_a_mebibyte_is_cut_in_the_error() -> None:
    """The value came back whole in the answer to the command and in the log line (2 MiB for a remove's id)."""
    from pipeline.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as err:
        parse_config({"cameras": [{"id": "a" * 1_000_000, "url": "rtsp://u:pw@cam/x"}]})
    text = str(err.value)
    assert "cameras[0].id: must be 1-64 letters" in text and re.search(r"\.\.\. \(\d{7} characters\)$", text)
    assert len(text) < 3000


def test_a_short_secret_after_a_long_secret_looking_name_is_hidden() -> None:
    """However long the name before the keyword that ends it (the first rewrite looked 100 characters back only)."""
    for name in ("camera_" + "a" * 95 + "_token", "x" * 120 + "_password", "pwd", "my.TOKEN"):
        assert redact_text(f"{name}=pw", ["rtsp://u:pw@cam/x"]) == f"{name}=***"
    assert redact_text("tokenx=pw passw=pw", ["rtsp://u:pw@cam/x"]) == "tokenx=pw passw=pw"  # not such names
