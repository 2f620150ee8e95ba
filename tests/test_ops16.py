"""Three defects an operator found running many low-rate cameras (ops16):

1. the API's (and the dashboard's) port was bound at the start but not listened on until the cameras ran: another
   program that took it in between made the start fail ("This is a bug in hydravision"), not refuse at once;
2. a camera analysed below ~0.4 fps read "0.0 fps", as a stalled one does, while it published every few seconds;
3. the snapshot's labels of unconfirmed detections (tracker id -1) were grey text on grey: blank boxes.

Unit level: sockets and uvicorn in this process, CameraPipeline on a simulated clock, Snapshotter's pixels."""

from __future__ import annotations

import errno
import http.server
import socket
from types import SimpleNamespace

import cv2
import httpx
import numpy as np
import pytest
import supervision as sv

from pipeline.api import ApiServer, bind, build_api
from pipeline.config import ConfigError, parse_config
from test_low_rate15 import Clock, pipeline_on, published
from workers.analytics_settings import SnapshotConfig
from workers.snapshots import LABEL_HEIGHT, LABEL_PADDING, LABEL_SCALE, Snapshotter

# -- 1. the port is held from the start's check on ------------------------------------------------------------------


def intruder(port: int) -> http.server.HTTPServer:
    """What the operator ran while the service started: ``python3 -m http.server PORT`` (SO_REUSEADDR, as ours)."""
    return http.server.HTTPServer(("127.0.0.1", port), http.server.BaseHTTPRequestHandler)


@pytest.mark.timeout(60)
def test_the_api_port_checked_at_the_start_is_held_until_the_api_serves_it(monkeypatch):
    """Between the check (before anything starts) and the API's start (once the cameras run: a minute later on a
    loaded machine) another program bound and listened on the port: the API's start then failed with EADDRINUSE
    in its thread, "did not start within 10 s" and "This is a bug". Now that program is refused, a request sent
    meanwhile waits and is answered once the API serves, and the API serves the socket the check took."""
    from pipeline.app import App

    monkeypatch.delenv("HYDRAVISION_API_TOKEN", raising=False)
    app = App(parse_config({"api": {"port": 0}}))
    app.check_api_settings()
    try:
        port = app._api_socket.getsockname()[1]
        with pytest.raises(OSError) as refused:
            intruder(port).server_close()  # closed at once in case it did take the port
        assert refused.value.errno == errno.EADDRINUSE
        early = socket.create_connection(("127.0.0.1", port), timeout=5)  # before the API serves: waits, not refused
        sock, app._api_socket = app._api_socket, None
        server = ApiServer(build_api(SimpleNamespace(list_cameras=lambda: [{"id": "slow-1"}]), {})).start(sock)
        try:
            early.sendall(f"GET /cameras HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
            answer = b""
            while chunk := early.recv(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200") and b'"slow-1"' in answer, answer[:200]
            assert httpx.get(f"{server.url}/cameras", timeout=10).json()["result"] == [{"id": "slow-1"}]
        finally:
            early.close()
            server.stop()
    finally:
        app.stop_control()


@pytest.mark.parametrize("what", ["api", "dashboard"])
def test_a_port_bound_for_the_api_or_the_dashboard_is_not_taken_by_another_program(what):
    """The dashboard's socket is bound by the same bind() at the start (App._start) and served later as well."""
    sock = bind("127.0.0.1", 0, what)
    try:
        port = sock.getsockname()[1]
        with pytest.raises(OSError) as refused:
            intruder(port).server_close()
        assert refused.value.errno == errno.EADDRINUSE
    finally:
        sock.close()
    intruder(port).server_close()  # once let go, the port is free again (nothing holds it after a failed start)


def test_a_port_another_program_listens_on_is_still_refused_before_anything_starts():
    """Taken before the start: refused with the reason (exit 2), as README says; unchanged."""
    server = intruder(0)  # listening; never served
    try:
        with pytest.raises(ConfigError, match=r"api: cannot listen on 127.0.0.1:\d+: Address already in use"):
            bind("127.0.0.1", server.server_address[1])
    finally:
        server.server_close()


# -- 2. a slow camera's fps ---------------------------------------------------------------------------------------


def fps_over(pipe, clock: Clock, seconds: int) -> list[float]:
    """The fps stats() reads each second for ``seconds`` of the simulated clock, nothing published meanwhile."""
    readings = []
    for _ in range(seconds):
        clock.t += 1
        readings.append(pipe.stats()["fps"])
    return readings


def publish_one(pipe, clock: Clock) -> None:
    """One frame (nothing detected) published now, 100 ms after its capture."""
    index = pipe.published
    item = SimpleNamespace(index=index, pts=float(index), wall=clock.time() - 0.1, mono=clock.t - 0.1,
                           size=(360, 640), letterbox=None, picture=None)
    pipe._publish_frame(item, {})


@pytest.mark.parametrize("gap", [5.0, 3.5, 10.0])
def test_a_camera_publishing_every_few_seconds_reads_its_rate_not_zero(monkeypatch, gap):
    """One frame every 5 s read "running 0.0 fps" (the rate needed 2 frames in the last 5 s), as a stalled camera
    does; 32 cameras at 0.3 msg/s read 0.0 too. Now its rate, whenever it is looked at between its frames."""
    clock = Clock()
    pipe = pipeline_on(clock, monkeypatch)
    readings, steps = [], round(gap / 0.5)
    for step in range(6 * steps):  # looked at every 0.5 s
        if step % steps == 0:
            publish_one(pipe, clock)
        readings.append(pipe.stats()["fps"])
        clock.t += 0.5
    assert set(readings[steps:]) == {round(1 / gap, 2)}, readings  # from its second frame on


def test_a_slow_camera_that_stops_reads_zero_within_a_bounded_time(monkeypatch):
    """Stopped, a camera reads 0 again: one of 0.2 fps falls once overdue, and reads 0 from 10 s (twice its gap)
    after its last frame on; one of 10 fps 5 s after, as before."""
    clock = Clock()
    pipe = pipeline_on(clock, monkeypatch)
    published(pipe, clock, 0.2, 60, 100)
    after = fps_over(pipe, clock, 40)
    assert after[:5] == [0.2] * 5, after  # 1 to 5 s after its last frame: not overdue yet
    assert all(a > b for a, b in zip(after[4:10], after[5:11])), after  # overdue: falling
    assert after[10:] == [0.0] * 30, after  # over 10 s after its last frame, and for good
    fast = pipeline_on(clock, monkeypatch)
    published(fast, clock, 10, 20, 100)
    after = fps_over(fast, clock, 40)
    assert after[:4] == sorted(after[:4], reverse=True) and after[0] > 1, after
    assert after[5:] == [0.0] * 35, after


# -- 3. readable labels ---------------------------------------------------------------------------------------------


def boxes(track_ids: list[int] | None) -> sv.Detections:
    """A person each 120 px apart, in rows of 5: label above each box's top-left corner."""
    n = len(track_ids) if track_ids is not None else 1
    xy = [(40 + 120 * (i % 5), 40 + 80 * (i // 5)) for i in range(n)]
    return sv.Detections(xyxy=np.array([[x, y, x + 60, y + 50] for x, y in xy], float), confidence=np.ones(n),
                         class_id=np.zeros(n, int), tracker_id=None if track_ids is None else np.array(track_ids),
                         data={"class_name": np.array(["person"] * n)})


def labels_drawn(det: sv.Detections, background: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each label's inside, as the JPEG in Redis shows it: (its background colour (BGR), the luma of its pixels)."""
    picture = np.full((420, 640, 3), background, np.uint8)
    fields = Snapshotter(SnapshotConfig()).render(picture, (640, 420), [det], None, 1, 0.0, 0.0)
    drawn = cv2.imdecode(np.frombuffer(fields["jpeg"], np.uint8), cv2.IMREAD_COLOR)
    luma = cv2.cvtColor(drawn, cv2.COLOR_BGR2GRAY).astype(int)
    width = cv2.getTextSize("person", cv2.FONT_HERSHEY_SIMPLEX, LABEL_SCALE, 1)[0][0] + 2 * LABEL_PADDING
    inside = []
    for x1, y1, _, _ in det.xyxy.astype(int):
        rows, cols = slice(y1 - LABEL_HEIGHT + 1, y1 - 1), slice(x1 + 1, x1 + width - 1)
        inside.append((np.median(drawn[rows, cols].reshape(-1, 3), axis=0), luma[rows, cols]))
    return inside


def text_pixels(luma: np.ndarray) -> int:
    """Pixels of a label that stand out of its background (its median) by over a fifth of the scale (cv2's thin,
    anti-aliased strokes, through JPEG, keep about 100 of the 128 levels between black and a mid colour)."""
    return int((np.abs(luma - np.median(luma)) > 50).sum())


@pytest.mark.parametrize("tracks", [[-1], None], ids=["unconfirmed", "untracked"])
@pytest.mark.parametrize("background", [120, 0, 255])
def test_the_label_of_an_unconfirmed_detection_is_readable(tracks, background):
    """3669 of 4232 labels at 1-2 fps were unconfirmed detections (tracker id -1): supervision drew their text in
    the same grey as their background, a blank box. Their box and label stay grey (unconfirmed), the text reads."""
    ((colour, luma),) = labels_drawn(boxes(tracks), background)
    assert np.abs(colour - 128).max() <= 8, colour  # grey, as its box
    assert text_pixels(luma) >= 40, (text_pixels(luma), luma)


def test_every_label_colour_has_text_that_reads_on_it():
    """Each track colour of the palette (its box's), and the grey of an unconfirmed one: text that stands out."""
    ids = list(range(len(sv.ColorPalette.DEFAULT.colors))) + [-1]
    drawn = labels_drawn(boxes(ids), 120)
    palette = [c.as_bgr() for c in sv.ColorPalette.DEFAULT.colors] + [sv.Color.GREY.as_bgr()]
    for track, (colour, luma), expected in zip(ids, drawn, palette):
        # the box's colour, as before (JPEG's halved chroma blurs a saturated colour by up to ~20 levels)
        assert np.abs(colour - expected).max() <= 32, (track, colour, expected)
        assert text_pixels(luma) >= 40, (track, text_pixels(luma))
