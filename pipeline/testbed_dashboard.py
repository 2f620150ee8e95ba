"""Data for the dashboard without a pipeline, written straight into Redis in the layouts the pipeline writes:
camera statuses, detection messages, zone/line counts, annotated snapshots and events of synthetic street
cameras. The dashboard reads only Redis, so its tests and its benchmark (32 cameras, CPU per camera) use this
instead of 32 real cameras.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time

import cv2
import numpy as np
import redis

from pipeline.testbed import HOST, ManagedProcess
from synthetic.scene import CLASS_NAMES, StreetScene
from workers.publish import detection_message, encode, event_message, keys

HEAD_OF = {"person": "people", "car": "vehicles", "bicycle": "vehicles"}
ZONE = np.array([[0.05, 0.55], [0.45, 0.55], [0.45, 0.95], [0.05, 0.95]])  # fractions of width, height
LINE = np.array([[0.6, 0.45], [0.95, 0.75]])


def write_snapshot(client: redis.Redis, prefix: str, camera: str, jpeg: bytes, frame: int, ts: float,
                   size: tuple[int, int] = (0, 0)) -> None:
    """The snapshot hash as the pipeline writes it (schema snapshot-v1: jpeg, v, frame, pts, ts, ...)."""
    key = keys(prefix).snapshot(camera)
    pipe = client.pipeline(transaction=True)
    pipe.delete(key)
    pipe.hset(key, mapping={"jpeg": jpeg, "v": 1, "frame": frame, "pts": 0, "ts": round(ts, 3), "width": size[0],
                            "height": size[1], "bytes": len(jpeg), "quality": 80, "render_ms": 0})
    pipe.execute()


def annotate(rgb: np.ndarray, detections: list[dict], geometry: bool = False, caption: str = "") -> bytes:
    """A JPEG of the picture with the detections' boxes and labels (and the fake zone and line) drawn."""
    img = np.ascontiguousarray(rgb[:, :, ::-1])
    h, w = img.shape[:2]
    if geometry:
        cv2.polylines(img, [(ZONE * (w, h)).astype(np.int32)], True, (0, 215, 255), 2)
        a, b = (LINE * (w, h)).astype(int)
        cv2.line(img, tuple(a), tuple(b), (255, 255, 255), 2)
    for d in detections:
        x1, y1, x2, y2 = (int(v) for v in d["box"])
        colour = (80, 200, 80) if d["head"] == "people" else (230, 160, 60)
        cv2.rectangle(img, (x1, y1), (x2, y2), colour, 2)
        label = f"#{d['track_id']} {d['class']}" if d.get("track_id") is not None else d["class"]
        cv2.putText(img, label, (x1, max(10, y1 - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, 1, cv2.LINE_AA)
    if caption:
        cv2.putText(img, caption, (8, h - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 75])
    assert ok
    return buf.tobytes()


class _FakeCamera:
    def __init__(self, cid: str, seed: int, size: tuple[int, int]):
        self.id, self.seed, self.scene = cid, seed, StreetScene(seed, width=size[0], height=size[1])
        self.frame, self.published, self.ticks, self.started = 0, 0, 0, time.time()
        self.inside: set[int] = set()
        self.crossings = 0

    def detections(self, truth) -> list[dict]:
        out = []
        for box, cls, oid in zip(truth.boxes, truth.class_ids, truth.object_ids):
            name = CLASS_NAMES[int(cls)]
            out.append({"head": HEAD_OF.get(name, "people"), "track_id": int(oid), "class": name,
                        "class_id": int(cls), "conf": 0.9, "box": [float(v) for v in box]})
        return out


class FakeCameras:
    """``n`` synthetic street cameras written into Redis once per ``interval_s`` (status with heartbeat, a
    detection message, counts, a snapshot each ``snapshot_every`` ticks, a few events) by a thread.
    ``states`` sets a camera's state and last error, e.g. {"cam-03": ("reconnecting", "Connection refused")}."""

    def __init__(self, url: str, n: int, prefix: str = "hv", interval_s: float = 1.0, snapshot_every: int = 1,
                 size: tuple[int, int] = (480, 270), states: dict[str, tuple[str, str]] | None = None,
                 fps: float = 10.0, names: str = "cam-{:02d}"):
        self.client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
        self.prefix, self.interval_s, self.snapshot_every, self.fps = prefix, interval_s, snapshot_every, fps
        self.keys = keys(prefix)
        self.cameras = [_FakeCamera(names.format(i + 1), i + 1, size) for i in range(n)]
        self.states = states or {}
        self.ticks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-cameras", daemon=True)
        self._random = random.Random(0)

    def start(self) -> "FakeCameras":
        self.write_all()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.client.close()

    def __enter__(self) -> "FakeCameras":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.write_all()
            except (redis.RedisError, OSError):  # Redis restarting under a test: write again next tick
                pass

    def write_all(self) -> None:
        now = time.time()
        pipe = self.client.pipeline(transaction=False)
        snapshot = self.ticks % self.snapshot_every == 0
        for cam in self.cameras:
            self._write(pipe, cam, now, snapshot)
        pipe.execute()
        self.ticks += 1

    def _write(self, pipe, cam: _FakeCamera, now: float, snapshot: bool) -> None:
        state, error = self.states.get(cam.id, ("running", None))
        k = self.keys
        if state == "running":
            image, truth = cam.scene.step()
            # frames due by this tick at fps, rounded on the total: int() per tick (0 below one frame a tick)
            # left the frame number, and so the snapshot's version, standing still; each message a new frame
            cam.ticks += 1
            due = max(cam.frame + 1, round(cam.ticks * self.fps * self.interval_s))
            cam.published += due - cam.frame
            cam.frame = due
            dets = cam.detections(truth)
            size = (cam.scene.width, cam.scene.height)
            msg = detection_message(cam.id, cam.frame, cam.frame / self.fps, now - 0.05, 48.0, size, dets,
                                    ["people", "vehicles"])
            pipe.xadd(k.detections(cam.id), {"data": encode(msg)}, maxlen=100, approximate=True)
            self._counts_and_events(pipe, cam, dets, size, now)
            if snapshot:
                jpeg = annotate(image, dets, geometry=True, caption=f"{cam.id} frame {cam.frame}")
                write_snapshot(pipe, self.prefix, cam.id, jpeg, cam.frame, now, size)
        jitter = self._random.uniform(-0.4, 0.4)
        status = {"state": state, "url": f"synthetic://street?seed={cam.seed}",
                  "heads": ["people", "vehicles"], "fps": round(self.fps + jitter, 2) if state == "running" else 0.0,
                  "decode_fps": 25.0 if state == "running" else 0.0,
                  "latency_ms_p50": round(45 + 10 * jitter, 1), "latency_ms_p95": round(90 + 20 * jitter, 1),
                  "decoded": cam.published * 3, "published": cam.published,
                  "dropped": {"rate": cam.published * 2, "overload": cam.published // 50, "error": 0, "shutdown": 0},
                  "reconnects": 0 if state == "running" else 3, "last_frame_ts": now, "last_error": error,
                  "track_ids_next": {}, "redis_error": None, "redis_failing_since": None,
                  "heartbeat_ts": round(now, 3), "instance": "fake"}
        pipe.hset(k.cameras, cam.id, json.dumps(status))

    def _counts_and_events(self, pipe, cam: _FakeCamera, dets: list[dict], size: tuple[int, int],
                           now: float) -> None:
        w, h = size
        zone = (ZONE * (w, h)).astype(np.float32)
        inside = set()
        for d in dets:
            x, y = (d["box"][0] + d["box"][2]) / 2, d["box"][3]
            if cv2.pointPolygonTest(zone, (float(x), float(y)), False) >= 0:
                inside.add(d["track_id"])
        events = []
        for d in dets:
            if d["track_id"] in inside - cam.inside:
                events.append(event_message("zone_entered", cam.id, now, head=d["head"], track_id=d["track_id"],
                                            class_=d["class"], zone="crossing", frame=cam.frame, pts=0.0,
                                            entered_pts=0.0, occupancy=len(inside)))
        if self._random.random() < 0.2:
            cam.crossings += 1
            d = dets[0] if dets else {"head": "people", "track_id": 1, "class": "person"}
            events.append(event_message("line_crossed", cam.id, now, head=d["head"], track_id=d["track_id"],
                                        class_=d["class"], line="kerb", direction="in", frame=cam.frame, pts=0.0,
                                        count=cam.crossings))
        cam.inside = inside
        for e in events:
            pipe.xadd(self.keys.events, {"data": encode(e)}, maxlen=10_000, approximate=True)
        key = keys(self.prefix).counts(cam.id)
        people = sum(1 for d in dets if d["track_id"] in inside and d["class"] == "person")
        cars = sum(1 for d in dets if d["track_id"] in inside and d["class"] == "car")
        pipe.delete(key)
        pipe.hset(key, mapping={"v": 1, "frame": cam.frame, "pts": 0, "ts": round(now, 3), "since": cam.started,
                                "zone:crossing:people:person": people, "zone:crossing:vehicles:car": cars,
                                "line:kerb:people:person:in": cam.crossings, "line:kerb:people:person:out": 0})


class DashboardProcess(ManagedProcess):
    """`hydravision dashboard` in a process of its own, as users run it (its CPU can be measured alone)."""

    name = "dashboard"
    ready_timeout = 60.0  # a Python start on a busy machine

    def __init__(self, redis_url: str, prefix: str = "hv", interval_s: float = 1.0, port: int | None = None,
                 allow_control: bool = False):
        self.redis_url, self.prefix, self.interval_s, self.allow_control = redis_url, prefix, interval_s, allow_control
        super().__init__(port)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "pipeline.cli", "dashboard", "--redis-url", self.redis_url, "--prefix",
                self.prefix, "--host", HOST, "--port", str(self.port), "--interval", str(self.interval_s)] + \
            (["--allow-control"] if self.allow_control else [])

    def is_ready(self, log: str) -> bool:
        # printed once the socket listens: a request made from now on waits for the server, never fails (a
        # taken port ends the process with "Address already in use", and start() tries another port)
        return "Dashboard of " in log


class FakeController:
    """The service's own Redis control-stream reader (pipeline/control.py's ControlConsumer) in front of a
    stand-in for the App: ``add`` starts a FakeCameras for the camera, ``remove`` stops it, deletes its status
    and sends camera_removed, as the App does. Every command applied is kept in ``received``."""

    def __init__(self, url: str, prefix: str = "hv"):
        from pipeline.control import ControlConsumer

        self.url, self.prefix = url, prefix
        self.client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
        self.cameras: dict[str, FakeCameras] = {}
        self.received: list[tuple[str, object, str]] = []  # (op, camera dict or id, by)
        self.rejected: list[str] = []
        self.consumer = ControlConsumer(self, url, prefix)

    def __enter__(self) -> "FakeController":
        self.consumer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.consumer.stop()
        for cams in self.cameras.values():
            cams.stop()
        self.client.close()

    # --- what ControlConsumer calls on the App
    def add_camera(self, camera: dict, by: str) -> dict:
        from pipeline.admission import CommandRejected

        self.received.append(("add", camera, by))
        if camera["id"] in self.cameras:
            raise CommandRejected(f"camera.id: {camera['id']!r} exists already")
        self.cameras[camera["id"]] = FakeCameras(self.url, 1, prefix=self.prefix, names=camera["id"]).start()
        return {"id": camera["id"]}

    def remove_camera(self, camera_id: str, by: str) -> dict:
        from pipeline.admission import CommandRejected

        self.received.append(("remove", camera_id, by))
        if camera_id not in self.cameras:
            raise CommandRejected(f"id: no camera {camera_id!r}", status=404)
        self.cameras.pop(camera_id).stop()
        k = keys(self.prefix)
        self.client.hdel(k.cameras, camera_id)
        self.client.xadd(k.events, {"data": encode(event_message("camera_removed", camera_id))})
        return {"id": camera_id}

    def note_rejected(self, op: str, by: str, reason: str, camera=None) -> None:
        self.rejected.append(reason)
