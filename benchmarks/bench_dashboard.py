"""The dashboard's budgets (issue 15): the page loads in under 1 s with 32 cameras, and `hydravision dashboard`
uses under 5% of one core per 10 cameras at 1 snapshot/s.

Fake cameras (pipeline/testbed_dashboard.py) are written straight into a throwaway redis-server by this
process: statuses, detection messages, counts, a new annotated 480x270 JPEG per camera per second, events.
The dashboard runs as its own process (`hydravision dashboard`), as users run it; one headless Chromium page
(Debian's chromium, driven by Playwright) stays open on it during the CPU measurement, so the SSE pushes and
the JPEGs it fetches are counted.

    python benchmarks/bench_dashboard.py [--cameras 10 32] [--seconds 30] [--json out.json]

``--scale`` measures what grows with the number of cameras instead (``--cameras 500 2000``): one poll of the
Hub with every camera's picture new (the fake cameras rewritten before each), the hello a page opens on after
5 minutes of chart history, and the page's tick handler in Chromium (performance.now() around the ``tick``
listener). The pictures are 160x90 here, and the dashboard runs in this process (``DashboardServer``).
``--baseline DIR`` measures another copy of the code in the same run, in turns with this one, and prints
baseline / current (above 1: faster now): DIR holds a ``dashboard_hub.py`` and a ``dashboard_static/``
(e.g. ``git show REV:pipeline/dashboard_hub.py > DIR/dashboard_hub.py`` and the same for the page's files).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

import psutil
from playwright.sync_api import sync_playwright

from measure import cpu_seconds
from pipeline import dashboard, dashboard_hub
from pipeline.dashboard import DashboardServer
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


# each run of the page's tick listener, on the page's clock: wraps EventSource's listeners before the page adds them
TIMED_TICKS = """(() => {
    window.hvTicks = [];
    const add = EventSource.prototype.addEventListener;
    EventSource.prototype.addEventListener = function (type, listener, ...rest) {
        if (type !== "tick") return add.call(this, type, listener, ...rest);
        return add.call(this, type, (m) => {
            const t0 = performance.now();
            listener(m);
            window.hvTicks.push(performance.now() - t0);
        }, ...rest);
    };
})();"""


def copy_of_hub(folder: Path):
    """The ``dashboard_hub.py`` in ``folder``, imported as a module of its own."""
    spec = importlib.util.spec_from_file_location("baseline_dashboard_hub", folder / "dashboard_hub.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tick_ms(browser, redis_url: str, prefix: str, cameras: int, static: Path, ticks: int) -> list[float]:
    """The page's tick listener, ``ticks`` times, on ``cameras`` tiles, with the page's files from ``static``."""
    dashboard.STATIC = static  # read when the app is made
    with DashboardServer(redis_url, prefix=prefix, interval_s=1.0) as server:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.add_init_script(TIMED_TICKS)
        page.goto(server.url)
        page.wait_for_function(f"() => document.querySelectorAll('.tile').length === {cameras}", timeout=120_000)
        page.wait_for_function(f"() => window.hvTicks.length >= {ticks + 1}", timeout=60_000 + 5_000 * ticks)
        times = page.evaluate("() => window.hvTicks")[1:ticks + 1]  # the first may still draw the hello's pictures
        page.close()
    return times


def scale(browser, redis_url: str, cameras: int, rounds: int, baseline: Path | None) -> dict:
    prefix = f"scale{cameras}"
    copies = {"current": (dashboard_hub, dashboard.STATIC)}
    if baseline is not None:
        copies["baseline"] = (copy_of_hub(baseline), baseline / "dashboard_static")
    fake = FakeCameras(redis_url, cameras, prefix=prefix, size=(160, 90), names="cam-{:04d}")
    hubs = {name: module.Hub(redis_url, prefix) for name, (module, _) in copies.items()}
    clients = {name: hub._client() for name, hub in hubs.items()}
    polls, hellos, ticks = ({name: [] for name in copies} for _ in range(3))
    fake.write_all()
    for hub, client in zip(hubs.values(), clients.values()):
        hub.poll(client)
    for r in range(rounds):
        fake.write_all()  # every picture new
        for name in sorted(copies, reverse=r % 2 == 1):  # in turns: a busy machine weighs on both alike
            t0 = time.perf_counter()
            hubs[name].poll(clients[name])
            polls[name].append(time.perf_counter() - t0)
    tiles = hubs["current"].board.all()
    for hub in hubs.values():  # 5 minutes of chart points at 1 s, as a page opening on a running dashboard gets
        for k in range(300):
            hub.board.update(tiles, now=time.time() - 300 + k, clock=time.monotonic())
    for r in range(rounds):
        for name in sorted(copies, reverse=r % 2 == 1):
            t0 = time.perf_counter()
            hubs[name].hello_text()
            hellos[name].append(time.perf_counter() - t0)
    for r in range(2):
        fake.write_all()  # fresh heartbeats for the page's ticks
        for name in sorted(copies, reverse=r % 2 == 1):
            ticks[name] += tick_ms(browser, redis_url, prefix, cameras, copies[name][1], ticks=max(3, rounds))
    fake.client.close()
    for client in clients.values():
        client.close()
    dashboard.STATIC = copies["current"][1]
    out = {"cameras": cameras, "load_average": [round(v, 2) for v in os.getloadavg()]}
    for name in copies:
        runs = {"poll_s": [round(v, 3) for v in polls[name]], "hello_s": [round(v, 3) for v in hellos[name]],
                "tick_ms": [round(v, 1) for v in ticks[name]]}
        out[name] = {**{k: round(statistics.median(v), 3) for k, v in runs.items()}, "runs": runs}
    if baseline is not None:
        out["baseline/current"] = {k: round(out["baseline"][k] / out["current"][k], 2)
                                   for k in ("poll_s", "hello_s", "tick_ms")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cameras", type=int, nargs="+", default=[10, 32])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--loads", type=int, default=5, help="page loads timed per run")
    ap.add_argument("--json", default=None)
    ap.add_argument("--scale", action="store_true", help="poll, hello and the page's tick at --cameras (see above)")
    ap.add_argument("--rounds", type=int, default=5, help="--scale: polls, hellos and ticks timed per copy")
    ap.add_argument("--baseline", type=Path, default=None, help="--scale: folder with another copy (see above)")
    args = ap.parse_args()
    results = []
    with RedisServer() as redis_server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        for n in args.cameras:
            if args.scale:
                r = scale(browser, redis_server.url, n, args.rounds, args.baseline)
                results.append(r)
                for name in ("current", "baseline"):
                    if name in r:
                        print(f"{n:4d} cameras, {name:8s}: poll {r[name]['poll_s']:.3f} s (every picture new), hello "
                              f"{r[name]['hello_s']:.3f} s, page tick {r[name]['tick_ms']:.1f} ms (medians); "
                              f"{r[name]['runs']}", flush=True)
                if "baseline/current" in r:
                    print(f"{n:4d} cameras, baseline/current: {r['baseline/current']}; load average "
                          f"{r['load_average']}", flush=True)
                continue
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
