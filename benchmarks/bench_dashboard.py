"""The dashboard's budgets (issue 15): the page loads in under 1 s with 32 cameras, and `hydravision dashboard`
uses under 5% of one core per 10 cameras at 1 snapshot/s.

Fake cameras (pipeline/testbed_dashboard.py) are written straight into a throwaway redis-server by this
process: statuses, detection messages, counts, a new annotated 480x270 JPEG per camera per second, events.
The dashboard runs as its own process (`hydravision dashboard`), as users run it; one headless Chromium page
(Debian's chromium, driven by Playwright) stays open on it during the CPU measurement, so the SSE pushes and
the JPEGs it fetches are counted.

    python benchmarks/bench_dashboard.py [--cameras 10 32] [--seconds 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import psutil
from playwright.sync_api import sync_playwright

from measure import cpu_seconds
from pipeline.testbed import RedisServer
from pipeline.testbed_dashboard import DashboardProcess, FakeCameras

CHROMIUM = os.environ.get("HV_CHROMIUM", "/usr/bin/chromium")
READY = """(n) => {
    const tiles = document.querySelectorAll(".tile[data-state]");
    if (tiles.length !== n) return false;
    for (const t of tiles) { const i = t.querySelector("img.snap"); if (i.hidden || !i.naturalWidth) return false; }
    return window.hvDone = window.hvDone || performance.now();
}"""


def page_load_s(browser, url: str, cameras: int) -> float:
    """Navigation start to every tile drawn with its state and its picture decoded, on the page's clock."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(url)
    page.wait_for_function(READY, arg=cameras, timeout=30_000)
    seconds = page.evaluate("window.hvDone") / 1000
    page.close()
    return seconds


def measure(browser, redis_url: str, cameras: int, seconds: float, loads: int) -> dict:
    prefix = f"bench{cameras}"
    with FakeCameras(redis_url, cameras, prefix=prefix, interval_s=1.0, snapshot_every=1) as fake, \
            DashboardProcess(redis_url, prefix=prefix) as dashboard:
        proc = psutil.Process(dashboard.process.pid)
        times = [page_load_s(browser, dashboard.url, cameras) for _ in range(loads)]
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        fetched = []
        page.on("response", lambda r: fetched.append(time.monotonic()) if "snapshot.jpg" in r.url else None)
        page.goto(dashboard.url)
        page.wait_for_function(READY, arg=cameras, timeout=30_000)
        page.wait_for_timeout(3000)  # past the page's first requests (sleeping so lets Playwright see responses)
        cpu0, wall0, ticks0 = cpu_seconds(proc), time.monotonic(), fake.ticks
        page.wait_for_timeout(seconds * 1000)
        cpu1, wall1, ticks1 = cpu_seconds(proc), time.monotonic(), fake.ticks
        pictures = sum(1 for t in fetched if wall0 <= t <= wall1)
        rss_mb = proc.memory_info().rss / 2**20
        page.close()
    share = (cpu1 - cpu0) / (wall1 - wall0)
    return {"cameras": cameras, "load_s": [round(t, 3) for t in times],
            "load_s_median": round(statistics.median(times), 3),
            "cpu_core_share": round(share, 4), "cpu_share_per_10_cameras": round(share * 10 / cameras, 4),
            "rss_mb": round(rss_mb, 1), "snapshots_written_per_camera_s": round((ticks1 - ticks0) / (wall1 - wall0), 2),
            "pictures_fetched_by_page_per_s": round(pictures / (wall1 - wall0), 1), "seconds": round(wall1 - wall0, 1),
            "load_average": [round(v, 2) for v in os.getloadavg()]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cameras", type=int, nargs="+", default=[10, 32])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--loads", type=int, default=5, help="page loads timed per run")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results = []
    with RedisServer() as redis_server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        for n in args.cameras:
            r = measure(browser, redis_server.url, n, args.seconds, args.loads)
            results.append(r)
            print(f"{n:3d} cameras: page load {r['load_s_median']:.3f} s median of {r['load_s']}; dashboard CPU "
                  f"{100 * r['cpu_core_share']:.2f}% of one core = {100 * r['cpu_share_per_10_cameras']:.2f}% per 10 "
                  f"cameras over {r['seconds']} s (new pictures: {r['snapshots_written_per_camera_s']}/s per camera "
                  f"written, {r['pictures_fetched_by_page_per_s']}/s fetched by the page); RSS {r['rss_mb']} MB; "
                  "load average "
                  f"{r['load_average']}", flush=True)
        browser.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
