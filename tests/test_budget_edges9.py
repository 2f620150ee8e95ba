"""Edges of the frame-age budget, the adaptive batch limit and the run-time admission of cameras, found in an
audit (2026-12-06), each failing on the code before. No Ray, no Redis, no network."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest

import pipeline.admission as admission_module
from pipeline.admission import Admission, CommandRejected
from pipeline.config import ApiConfig
from workers.settings import CameraConfig

HEADS = {"people": ["person"]}


def test_an_address_the_machine_gains_or_loses_after_the_start_counts_as_here_or_not(monkeypatch):
    """A service started before DHCP or a VPN gave the machine its address knew only loopback as "here": a
    camera at that address and the port of the service's own Redis was accepted; an address the machine has
    since given up stayed "here" and refused a camera elsewhere."""
    addresses = ["127.0.0.1", "192.0.2.45"]
    monkeypatch.setattr(admission_module.psutil, "net_if_addrs", lambda: {
        "eth0": [SimpleNamespace(family=socket.AF_INET, address=a) for a in addresses]})
    admission = Admission(ApiConfig(), HEADS, {"Redis": ("127.0.0.1", 6399)})
    addresses[1] = "192.0.2.44"  # the laptop moved networks: a new address here, the old one someone else's
    with pytest.raises(CommandRejected, match="own Redis") as refused:
        admission.check(CameraConfig(id="c", url="rtsp://192.0.2.44:6399/stream"))
    assert refused.value.status == 403
    elsewhere = CameraConfig(id="c", url="rtsp://192.0.2.45:6399/stream")
    accepted = admission.check(elsewhere)  # a copy, marked untrusted (CameraConfig.untrusted)
    assert accepted.model_dump() == elsewhere.model_dump() and accepted.untrusted


def test_an_empty_file_is_refused_as_empty_not_as_a_forbidden_text_file(tmp_path):
    """A recording not written yet (0 bytes) was refused with 403 as "a text file" (playlists, scripts)."""
    (tmp_path / "new.mp4").write_bytes(b"")
    admission = Admission(ApiConfig(media_roots=[str(tmp_path)]), HEADS)
    with pytest.raises(CommandRejected, match=r"is empty \(0 bytes\)") as refused:
        admission.check(CameraConfig(id="c", url=str(tmp_path / "new.mp4")))
    assert refused.value.status == 422


def test_a_wall_clock_step_forward_ages_no_frame(monkeypatch):
    """An NTP step (or a laptop resuming) moved the wall clock 30 s on while frames were in flight: their ages
    were measured on it, 30 s each, and the budget cut the camera's rate (budget_exceeded) for a calm stream."""
    from test_control_logic_edges import budgeted_pipeline

    from workers.capture import CapturedFrame

    pipe, clock, image = budgeted_pipeline(monkeypatch)
    in_flight: list = []
    for i in range(25 * 48):  # 48 s at 25 fps, each frame published five frames (0.2 s) after its decode
        clock["wall"] += 0.04
        clock["mono"] += 0.04
        if i == 25 * 40:  # later than the step itself: older "capture times" are from before the budget began
            clock["wall"] += 30.0  # the step, with five frames in flight
        in_flight.append(CapturedFrame(i, i * 0.04, clock["wall"], (360, 640), image, None))  # as the capture does
        if len(in_flight) > 5:
            pipe._publish_frame(in_flight.pop(0), {})
    assert pipe.budget is not None and not sum(pipe.budget.actions.values()), pipe.budget.actions
    assert pipe.frame_age.count == 25 * 48 - 5 and pipe.frame_age.sum < 25 * 48 * 0.25
