"""A tile's dropped frames are frames lost (overload, errors, ...), not those the camera's fps setting leaves out
by design (``dropped.rate``): the page summed every reason, and a 25 fps file at fps 10 read "8300 (rate 8280 ·
overload 16 · error 4)" where `hydravision status` said 20. Browser check in Debian's chromium (Playwright)."""
from __future__ import annotations

import json
import time

import test_dashboard_browser
from pipeline.dashboard import DashboardServer
from workers.publish import keys

browser = test_dashboard_browser.browser  # the chromium fixture


def test_frames_left_out_by_the_fps_setting_are_no_drops(redis_server, browser):
    status = {"state": "running", "heartbeat_ts": time.time() + 3600, "fps": 10.0,
              "dropped": {"rate": 8280, "overload": 16, "error": 4}}
    redis_server.client().hset(keys("hv").cameras, "cam-file", json.dumps(status))
    with DashboardServer(redis_server.url, interval_s=0.2) as server:
        page = browser.new_page()
        try:
            page.goto(server.url)
            page.wait_for_function("() => window.hvLoaded")
            cell = page.locator('.tile[data-camera="cam-file"] dd.drops')
            cell.wait_for()
            page.wait_for_function("() => document.querySelector('.tile[data-camera=\"cam-file\"] dd.drops')"
                                   ".textContent !== ''")
            text = cell.text_content()
            assert text.startswith("20 (") and "rate" not in text, text
        finally:
            page.close()
