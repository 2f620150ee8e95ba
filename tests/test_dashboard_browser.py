"""The dashboard in a real browser (issue 15): Debian's headless Chromium driven by Playwright for Python.

One browser for the module. The first test runs a real pipeline (a synthetic camera, an RTSP camera, a camera
behind a password that never answers) against a Redis with a password; the page must show changing pictures
and fps > 0, a new event within 2 s, a camera added and removed from the page by the service's controller,
a stopped source as reconnecting/down, a Redis restart as a notice and then live data again, and no
credential anywhere. The second drives the page with fake cameras written
straight into Redis (the page reads nothing else): 1 and 12 cameras for screenshots, 32 for the load time,
cameras appearing and disappearing.

The pictures and the zone/line counts of the real cameras are the pipeline's own (workers/snapshots.py,
workers/analytics.py): street-1 counts a zone and a line, and its tile must show them.
Screenshots go to runs/test-artifacts/dashboard/ (or $HV_TEST_ARTIFACTS/dashboard/).
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote

import psutil
import pytest

from pipeline.dashboard import DashboardServer
from pipeline.testbed_dashboard import DashboardProcess, FakeCameras, FakeController
from running import RunningApp, wait_for
from servers import HOST, RedisServer, free_port, require_binary, skip_or_fail
from workers.publish import encode, event_message, keys

CHROMIUM = os.environ.get("HV_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("HV_TEST_ARTIFACTS") or Path(__file__).resolve().parent.parent / "runs" /
                 "test-artifacts") / "dashboard"
REDIS_SECRET = "rpw-Dash9Qm"
CAMERA_SECRET = "cam-Pw55vT@Kq:Zt%40Lx"
SECRETS = [REDIS_SECRET, CAMERA_SECRET, unquote(CAMERA_SECRET), "Kq:Zt%40Lx", "Kq:Zt@Lx"]
VIEWPORT = {"width": 1400, "height": 900}
# the demo model, not a random one: real detections and tracks on the pictures and in the tiles
DEMO = Path(__file__).resolve().parent.parent / "models" / "checkpoints" / "demo.safetensors"


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip_or_fail("Playwright for Python is not installed: pip install playwright "
                     "(never `playwright install`, which downloads browsers; Debian's chromium is used)")
    if not Path(CHROMIUM).exists():
        skip_or_fail(f"{CHROMIUM} not found; on Debian: sudo apt-get install chromium")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM)
        yield chromium
        chromium.close()


def new_page(browser):
    page = browser.new_page(viewport=VIEWPORT)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.errors = errors  # type: ignore[attr-defined]
    return page


def tile(page, camera: str) -> dict:
    """What the tile of ``camera`` shows: state, fps, the frame of its picture and whether it has one."""
    return page.evaluate("""(cam) => {
        const t = document.querySelector(`.tile[data-camera="${CSS.escape(cam)}"]`);
        if (!t) return null;
        const img = t.querySelector("img.snap");
        return {state: t.dataset.state, fps: Number(t.dataset.fps), frame: img.dataset.frame ?? null,
                picture: !img.hidden && img.complete && img.naturalWidth > 0,
                label: t.querySelector(".state").textContent, error: t.querySelector(".error").textContent};
    }""", camera)


def shows_picture_that_changes(page, camera: str, timeout: float) -> None:
    first = wait_for(lambda: (t := tile(page, camera)) and t["picture"] and t["fps"] > 0 and t, timeout,
                     f"a picture and fps > 0 on {camera}'s tile")
    wait_for(lambda: tile(page, camera)["frame"] not in (None, first["frame"]), timeout,
             f"{camera}'s picture to change (was frame {first['frame']})")


class StreamRecorder:
    """Everything the SSE stream sends, read by a plain HTTP client for the whole test (reconnecting as a
    page would), so the leak check sees every message, the ones sent while Redis was down included."""

    def __init__(self, url: str):
        self.url, self.chunks = url + "api/stream", []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=5) as resp:
                    while not self._stop.is_set():
                        line = resp.readline()
                        if not line:
                            break
                        self.chunks.append(line.decode())
            except OSError:
                self._stop.wait(0.5)

    def text(self) -> str:
        self._stop.set()
        self._thread.join(10)
        return "".join(self.chunks)


def assert_no_secret(where: str, text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{where} shows a credential ({secret!r})"


@pytest.mark.timeout(600)
def test_live_pipeline_in_the_browser(ray_local, rtsp_server, browser, machine):
    require_binary("redis-server")
    camera = rtsp_server("pattern", pattern_size=(320, 180), fps=10)
    fast = {"open_timeout_s": 2, "read_timeout_s": 2}
    fps = min(5, machine.live_fps(machine.demo, share=0.15))  # two cameras on the demo model, with headroom
    cameras = [{"id": "street-1", "url": f"synthetic://street?seed=3&fps={fps}",
                "zones": [{"name": "middle", "polygon": [[0.3, 0.45], [0.7, 0.45], [0.7, 0.95], [0.3, 0.95]]}],
                "lines": [{"name": "kerb", "start": [0.5, 0.3], "end": [0.5, 1.0]}]},
               {"id": "gate", "url": camera.url, "fps": fps, **fast},
               # a camera behind a password that never answers: its errors carry its URL
               {"id": "locked", "url": f"rtsp://admin:{CAMERA_SECRET}@{HOST}:{free_port()}/stream", **fast}]
    with RedisServer(password=REDIS_SECRET) as redis_server:
        url = redis_server.url
        with RunningApp(url, DEMO, cameras, interval=0.5), DashboardServer(url, allow_control=True) as dashboard:
            recorder = StreamRecorder(dashboard.url)
            page = new_page(browser)
            page.goto(dashboard.url)
            for cam in ("street-1", "gate"):
                shows_picture_that_changes(page, cam, machine.deadline(60))
            locked = wait_for(lambda: (t := tile(page, "locked")) and t["state"] != "up" and t["error"] and t,
                              machine.deadline(30), "the locked camera's error")
            assert not locked["picture"] and page.is_visible('.tile[data-camera="locked"] .placeholder')
            counts = page.locator('.tile[data-camera="street-1"] dd.counts')  # the pipeline's counts hash
            counts.wait_for(state="visible", timeout=machine.deadline(30) * 1000)
            assert "middle" in counts.inner_text() and "kerb" in counts.inner_text()
            assert not page.is_visible('.tile[data-camera="gate"] dd.counts')  # no zones, no counts row
            page.screenshot(path=ARTIFACTS / "pipeline-3-cameras.png")

            # an event reaches the feed within 2 s of its XADD
            event = event_message("line_crossed", "street-1", head="people", track_id=987654, class_="person",
                                  line="door", direction="in", frame=1, pts=0.0, count=1)
            t0 = time.monotonic()
            event_id = redis_server.client().xadd(keys("hv").events, {"data": encode(event)}).decode()
            page.wait_for_selector(f'#feed li[data-id="{event_id}"]', timeout=2000)
            print(f"event in the feed {1000 * (time.monotonic() - t0):.0f} ms after its XADD")
            page.select_option("#filter-camera", "gate")  # the filters hide it, and bring it back
            assert page.is_hidden(f'#feed li[data-id="{event_id}"]')
            page.select_option("#filter-camera", "")
            page.uncheck('#filter-types input[value="line"]')
            assert page.is_hidden(f'#feed li[data-id="{event_id}"]')
            page.check('#filter-types input[value="line"]')
            assert page.is_visible(f'#feed li[data-id="{event_id}"]')

            page.click('.tile[data-camera="street-1"] a.name')
            page.wait_for_selector('#detail[data-camera="street-1"] img.snap:not([hidden])', timeout=10_000)
            assert page.is_visible(f'#detail .recent li[data-id="{event_id}"]')
            assert "people" in page.inner_text("#detail table.heads")
            page.screenshot(path=ARTIFACTS / "pipeline-detail.png")
            page.go_back()
            page.wait_for_selector("#grid-view:not([hidden])")

            # the service's own controller adds a camera sent from the page, then removes it
            page.on("dialog", lambda dialog: dialog.accept())
            page.click("#add-open")
            page.fill('#add-camera input[name="id"]', "extra")
            page.fill('#add-camera input[name="url"]', "synthetic://street?seed=8&fps=2")
            page.click('#add-camera button[type="submit"]')
            page.wait_for_selector('#control-result[data-status="accepted"]', timeout=machine.deadline(60) * 1000)
            page.wait_for_selector('.tile[data-camera="extra"][data-state="up"]', timeout=machine.deadline(30) * 1000)
            page.goto(dashboard.url + "#/camera/extra")
            page.click("#detail button.remove")
            page.wait_for_selector('#detail .result[data-status="accepted"]', timeout=machine.deadline(60) * 1000)
            page.goto(dashboard.url)
            page.wait_for_selector('.tile[data-camera="gate"]')
            assert not page.locator('.tile[data-camera="extra"]').count()

            camera.kill()  # the RTSP camera's source stops
            wait_for(lambda: tile(page, "gate")["state"] in ("reconnecting", "down"), machine.deadline(30),
                     "gate reconnecting/down")
            page.screenshot(path=ARTIFACTS / "pipeline-source-stopped.png")

            before = tile(page, "street-1")["frame"]
            redis_server.stop()
            page.wait_for_selector('#notice[data-state="down"]', timeout=15_000)
            page.screenshot(path=ARTIFACTS / "pipeline-redis-down.png")
            redis_server.start()
            page.wait_for_selector('#notice[data-state="reconnected"]', timeout=15_000)
            wait_for(lambda: (t := tile(page, "street-1"))["fps"] > 0 and t["picture"] and t["frame"] is not None
                     and int(t["frame"]) > int(before), machine.deadline(60), "live data again after the Redis restart")
            assert page.errors == []

            pages = [page.content()]
            page.goto(dashboard.url + "#/camera/locked")
            page.wait_for_selector('#detail[data-camera="locked"]')
            pages.append(page.content())
            with urllib.request.urlopen(dashboard.url + "api/state", timeout=10) as resp:
                served = resp.read().decode()
            stream = recorder.text()
            page.close()
    assert '"locked"' in served and "rtsp://***@" in served  # the error is there, its credentials are not
    assert "event: redis" in stream and '"ok":false' in stream  # the outage went through the stream too
    for where, text in [("the page", "".join(pages)), ("/api/state", served), ("the SSE stream", stream)]:
        assert_no_secret(where, text)


def load_time(browser, url: str, cameras: int) -> float:
    """Seconds from navigation to every tile drawn with its state and its picture decoded (page's clock)."""
    page = new_page(browser)
    page.goto(url)
    page.wait_for_function("""(n) => {
        const tiles = document.querySelectorAll(".tile[data-state]");
        if (tiles.length !== n) return false;
        for (const t of tiles) { const i = t.querySelector("img.snap"); if (i.hidden || !i.naturalWidth) return false; }
        return window.hvDone = window.hvDone || performance.now();
    }""", arg=cameras, timeout=20_000)
    seconds = page.evaluate("window.hvDone") / 1000
    page.close()
    return seconds


# Slow (15 s; `-m slow`) since the default run neared 10 min: the default run keeps the live pipeline in
# the browser above and the hub's tiles built from what Redis holds (tests/test_dashboard_data.py); the
# 12- and 32-camera layouts and load times are checked only here.
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_fake_cameras_one_twelve_and_thirty_two(redis_server, browser, machine):
    url = redis_server.url
    states = {"cam-04": ("reconnecting", "SourceError: rtsp://***@10.0.0.4/live: Connection refused (attempt 3)"),
              "cam-09": ("failed", "SourceError: /data/missing.mp4: No such file or directory")}
    with FakeCameras(url, 1, prefix="one"), FakeCameras(url, 12, prefix="twelve", states=states), \
            FakeController(url, prefix="twelve") as controller, DashboardServer(url, prefix="one") as one, \
            DashboardServer(url, prefix="twelve", allow_control=True) as twelve:
        page = new_page(browser)
        page.goto(one.url)
        shows_picture_that_changes(page, "cam-01", 30)
        wait_for(lambda: page.inner_text("#feed").strip(), 15, "events in the feed")
        page.screenshot(path=ARTIFACTS / "one-camera.png")

        page.goto(twelve.url)
        wait_for(lambda: page.locator(".tile img.snap:not([hidden])").count() == 10, 30, "10 pictures of 12 tiles")
        assert tile(page, "cam-04")["state"] == "reconnecting" and tile(page, "cam-09")["state"] == "down"
        assert "No such file" in tile(page, "cam-09")["error"]
        assert page.is_visible('.tile[data-camera="cam-01"] dd.counts')
        page.screenshot(path=ARTIFACTS / "twelve-cameras.png", full_page=True)

        # a camera added from the page appears; removed from its detail view, it disappears
        secret_url = f"rtsp://viewer:{CAMERA_SECRET}@10.0.0.9/live"
        page.click("#add-open")
        page.fill('#add-camera input[name="id"]', "new-01")
        page.fill('#add-camera input[name="url"]', secret_url)
        page.fill('#add-camera input[name="fps"]', "5")
        page.click('#add-camera button[type="submit"]')
        page.wait_for_selector('#control-result[data-status="accepted"]', timeout=15_000)
        page.wait_for_selector('.tile[data-camera="new-01"]', timeout=10_000)
        assert controller.received[-1] == ("add", {"id": "new-01", "url": secret_url, "fps": 5}, "redis:dashboard")
        added_page = page.content()
        page.on("dialog", lambda dialog: dialog.accept())
        page.goto(twelve.url + "#/camera/new-01")
        page.click("#detail button.remove")
        page.wait_for_selector('#detail .result[data-status="accepted"]', timeout=15_000)
        page.goto(twelve.url)
        wait_for(lambda: page.locator(".tile").count() == 12, 10, "12 tiles again")
        assert not page.locator('.tile[data-camera="new-01"]').count()
        assert_no_secret("the page after adding a camera", added_page)
        try:  # the other dashboard was not started with --allow-control
            urllib.request.urlopen(urllib.request.Request(one.url + "api/cameras/cam-01", method="DELETE"),
                                   timeout=10)
            raise AssertionError("a dashboard without --allow-control removed a camera")
        except urllib.error.HTTPError as e:
            assert e.code == 403

        page.goto(twelve.url + "#/camera/cam-01")
        page.wait_for_selector('#detail[data-camera="cam-01"] img.snap:not([hidden])', timeout=10_000)
        assert "crossing" in page.inner_text("#detail table.zones")
        page.screenshot(path=ARTIFACTS / "detail.png")
        page.close()

    # 32 cameras, the dashboard in its own process as users run it (`hydravision dashboard`)
    with FakeCameras(url, 32, prefix="many"), DashboardProcess(url, prefix="many") as many:
        wait_for(lambda: len(state(many.url)["cameras"]) == 32, 20, "32 cameras read")
        times = [load_time(browser, many.url, 32) for _ in range(3)]
        print(f"page load with 32 cameras (to every tile with its picture): {', '.join(f'{t:.3f}' for t in times)} s")
        # The budget is 1 s (benchmarks/bench_dashboard.py measures it: 0.72 s median on 2 busy cores); the
        # test allows a machine 3x slower or busier, and still catches a page that stopped scaling.
        assert min(times) < max(3.0, machine.deadline(1.0))
        # CPU of the dashboard's process with a page open (budget: 5% of a core per 10 cameras at 1 picture/s)
        page = new_page(browser)
        page.goto(many.url)
        page.wait_for_selector(".tile img.snap:not([hidden])")
        proc = psutil.Process(many.process.pid)
        cpu0, t0 = sum(proc.cpu_times()[:2]), time.monotonic()
        page.wait_for_timeout(5_000)  # ~5 pictures per camera; CPU times tick in 10 ms, the budget is 800 ms here
        share = (sum(proc.cpu_times()[:2]) - cpu0) / (time.monotonic() - t0)
        page.close()
        print(f"dashboard CPU with 32 cameras and a page open: {100 * share:.2f}% of one core")
        assert share * 10 / 32 < 0.05


def state(url: str) -> dict:
    with urllib.request.urlopen(url + "api/state", timeout=10) as resp:
        return json.loads(resp.read())


def test_a_camera_removed_and_added_again_stays_on_a_page_opened_later(redis_server, browser):
    """A page applied the camera_removed events of its first backlog too: a camera removed and added again
    vanished, with its chart, until the next tick brought it back (for good only while Redis answered)."""
    url, client = redis_server.url, redis_server.client()
    for kind in ("camera_removed", "camera_added"):
        client.xadd(keys("again").events, {"data": encode(event_message(kind, "cam-01"))})
    with FakeCameras(url, 2, prefix="again"):
        wait_for(lambda: client.hlen(keys("again").cameras) == 2, 15, "both cameras' statuses")
        with DashboardServer(url, prefix="again", interval_s=30) as server:  # no tick during the check
            wait_for(lambda: len(server.hub.board.tiles) == 2, 15, "both cameras on the server's board")
            page = new_page(browser)
            page.goto(server.url)
            page.wait_for_function("() => window.hvLoaded")  # a function: the CSP refuses eval() of an expression
            shown = page.evaluate("() => [...document.querySelectorAll('.tile')].map(t => t.dataset.camera)")
            assert shown == ["cam-01", "cam-02"] and not page.errors
