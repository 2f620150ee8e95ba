"""The dashboard, audit 14: what an operator meets over a long run: the dashboard stopped with control requests
waiting, the page's notices across restarts, a camera's pictures after it started again, a link with a stray '%'.
Browser checks in Debian's chromium through Playwright, as tests/test_dashboard_browser.py."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time

from pipeline import dashboard
from pipeline.dashboard import DashboardServer
from pipeline.testbed_dashboard import write_snapshot
import test_dashboard_browser
from workers.publish import keys

K = keys("hv")
NOWHERE = "redis://127.0.0.1:1/0"  # nothing listens on port 1
browser = test_dashboard_browser.browser  # the chromium fixture (Debian's chromium through Playwright)


def test_stopping_does_not_wait_out_control_requests_that_fill_the_executor(monkeypatch):
    """A control request waits for the controller's answer (30 s) in a thread of the server loop's default
    executor, and the Hub's stop ran in that executor too, after them: with as many requests waiting as it has
    threads (6 on 2 cores: an operator removing cameras while the controller is busy) the stop waited out their
    30 s, DashboardServer.stop gave up with the server still running, and Ctrl-C on `hydravision dashboard` took
    30 s. The requests are told the dashboard stops (the stop event they wait on) before the Hub is joined."""
    import httpx

    workers = concurrent.futures.ThreadPoolExecutor()._max_workers  # the size of asyncio's default executor
    waiting = threading.Semaphore(0)

    def send_command(client, prefix, command, timeout_s=30.0, stop=None):  # as the real one: ends when stop is set
        waiting.release()
        stopped = stop.wait(timeout_s)
        return {"status": "timeout", "reason": "stopped" if stopped else "no answer"}
    monkeypatch.setattr(dashboard, "send_command", send_command)
    server = DashboardServer(NOWHERE, interval_s=5, allow_control=True).start()

    def remove(i: int) -> None:
        try:
            httpx.delete(f"{server.url}api/cameras/cam-{i}", timeout=60)
        except httpx.HTTPError:  # the server went away under it: what it answers is not the point here
            pass
    requests = [threading.Thread(target=remove, args=(i,), daemon=True) for i in range(workers)]
    try:
        for r in requests:
            r.start()
        for _ in requests:  # every executor thread is taken by a request waiting for its answer
            assert waiting.acquire(timeout=30), "a control request did not reach the controller's stream"
        began = time.monotonic()
        server.stop(timeout=15)
        took = time.monotonic() - began
        assert not server._thread.is_alive() and took < 12, f"stopped after {took:.1f} s"
    finally:
        server.hub.stopping.set()  # a failed run: let the requests go
        server.stop()
        for r in requests:
            r.join(30)


def _status(**extra) -> str:
    return json.dumps({"state": "running", "heartbeat_ts": time.time() + 3600, "fps": 5.0, **extra})


def _loaded(page, url: str) -> None:
    page.goto(url)
    page.wait_for_function("() => window.hvLoaded")  # a function: the CSP refuses eval() of an expression


def _notice(page) -> tuple[str, bool]:
    """The notice's state and whether it is hidden."""
    return tuple(page.evaluate("() => [document.querySelector('#notice').dataset.state, "
                               "document.querySelector('#notice').hidden]"))


def test_the_dashboards_absence_stays_said_after_redis_came_back(redis_server, browser):
    """Redis back, the page says "Reconnected to Redis" and hides that notice 10 s later. Before: the timer hid
    whatever the notice said by then: the dashboard gone within those 10 s (a compose stack restarting Redis, then
    the dashboard), its "Lost the connection to the dashboard server" went away while the page was still cut off,
    its tiles greyed with no word why."""
    client = redis_server.client()
    client.hset(K.cameras, "cam", _status())
    server = DashboardServer(redis_server.url, interval_s=0.2).start()
    page = test_dashboard_browser.new_page(browser)
    try:
        page.clock.install()  # the page's timers: the 10 s are run at once below
        _loaded(page, server.url)
        redis_server.stop()
        page.wait_for_function("() => document.querySelector('#notice').dataset.state === 'down'", timeout=30_000)
        redis_server.start()
        page.wait_for_function("() => document.querySelector('#notice').dataset.state === 'reconnected'",
                               timeout=30_000)
        server.stop()
        page.wait_for_function("() => document.querySelector('#notice').dataset.state === 'offline'", timeout=30_000)
        page.clock.run_for(11_000)
        assert _notice(page) == ("offline", False), page.inner_text("#notice")
        assert page.evaluate("() => document.body.classList.contains('frozen')")
        assert not page.errors, page.errors
    finally:
        page.close()
        server.stop()


def _jpeg(width: int) -> bytes:
    """A real JPEG, told apart on the page by its width."""
    import cv2
    import numpy as np

    return cv2.imencode(".jpg", np.zeros((8, width, 3), np.uint8))[1].tobytes()


def test_a_camera_started_again_shows_its_new_pictures_not_the_last_runs(redis_server, browser):
    """A camera started again (the service restarted, or the camera removed and added again) numbers its frames
    from 0 again, and a picture's URL named its frame only (?v=f1): the browser showed a URL it had loaded before
    from its own copy, without asking the server (its list of available images): the page open across the
    restart showed the earlier run's pictures as the camera's live ones. The same frame as the picture shown
    (a new run's first picture) was taken for that one and not loaded at all."""
    client = redis_server.client()
    client.hset(K.cameras, "cam", _status())
    width = "() => document.querySelector('.tile[data-camera=\"cam\"] img.snap').naturalWidth"
    with DashboardServer(redis_server.url, interval_s=0.2) as server:
        page = test_dashboard_browser.new_page(browser)
        try:
            _loaded(page, server.url)
            ts = time.time()
            # frames 1 and 2 of the first run, then frame 1 of the next run, then a next run's frame 1 again
            for step, (frame, w) in enumerate(((1, 11), (2, 22), (1, 33), (1, 44))):
                write_snapshot(client, "hv", "cam", _jpeg(w), frame=frame, ts=ts + step)
                try:
                    page.wait_for_function(f"() => ({width})() === {w}", timeout=20_000)
                except Exception:
                    raise AssertionError(f"frame {frame} of step {step} shows the picture {page.evaluate(width)} "
                                         f"px wide, not its own {w}") from None
            assert not page.errors, page.errors
        finally:
            page.close()


def test_a_link_with_a_stray_percent_sign_still_opens_the_page(redis_server, browser):
    """A detail link cut short or written by hand ('#/camera/cam%', '%E0%A4%A'): decodeURIComponent threw at the
    page's start, before it opened its stream: a blank page (no tile, no event, 'connecting…' for good), and the
    same after '← all cameras'. Now the id as written: no camera has it, and the page says so."""
    client = redis_server.client()
    client.hset(K.cameras, "cam", _status())
    with DashboardServer(redis_server.url, interval_s=0.2) as server:
        page = test_dashboard_browser.new_page(browser)
        try:
            _loaded(page, server.url + "#/camera/cam%")
            assert page.inner_text("#detail .state") == "not in Redis (removed?)"
            page.click("#detail-view a[href='#']")
            page.wait_for_selector('.tile[data-camera="cam"][data-state="up"]', timeout=20_000)
            assert not page.errors, page.errors
        finally:
            page.close()
