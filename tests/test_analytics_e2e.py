"""Analytics through the real pipeline (Ray, the demo checkpoint, a synthetic camera with a zone and two lines):
events, counts and snapshots land in Redis and validate against the schemas, in Python and in Node.js
(examples/node-consumer, with the `redis` and `ajv` npm packages)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from mot import read_stream
from pipeline.testbed import RedisServer
from running import RunningApp
from servers import require_binary, skip_or_fail
from workers.publish import keys, validate

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "checkpoints" / "demo.safetensors"
NODE_EXAMPLE = ROOT / "examples" / "node-consumer"
FRAMES = 100
CAMERA = {
    "id": "street", "url": f"synthetic://street?seed=21&fps=10&frames={FRAMES}", "realtime": False,
    "zones": [{"name": "middle", "polygon": [[0.3, 0.45], [0.7, 0.45], [0.7, 0.95], [0.3, 0.95]]}],
    "lines": [{"name": "west", "start": [0.35, 0.3], "end": [0.35, 1.0]},
              {"name": "east", "start": [0.65, 0.3], "end": [0.65, 1.0]}],
    "snapshot": {"fps": 1.0},
}


@pytest.fixture(scope="module")
def street(ray_local):
    """One run of the pipeline over a 10 s synthetic street; yields (Redis server, the camera's final stats)."""
    require_binary("redis-server")
    with RedisServer() as server:
        with RunningApp(server.url, DEMO, [CAMERA]) as app:
            assert app.join(120), "the camera's source did not end"
            finals = {f["camera"]: f for f in app.stop()}
        yield server, finals["street"]


@pytest.mark.timeout(180)
def test_events_counts_and_snapshot_through_the_pipeline_validate(street):
    server, final = street
    client = server.client()
    assert final["state"] == "ended" and final["published"] == FRAMES
    messages = read_stream(client, keys("hv").detections("street"))
    assert len(messages) == FRAMES
    for m in messages:
        validate(m, "detection")
    events = read_stream(client, keys("hv").events)
    for e in events:
        validate(e, "event")
    crossings = [e for e in events if e["type"] == "line_crossed"]
    print("crossings:", [(e["line"], e["direction"], e["class"]) for e in crossings])
    assert len(crossings) >= 3 and {e["line"] for e in crossings} == {"west", "east"}
    assert any(e["type"] == "zone_entered" for e in events) and any(e["type"] == "zone_left" for e in events)
    counts = {k.decode(): v.decode() for k, v in client.hgetall(keys("hv").counts("street")).items()}
    validate(counts, "counts")
    assert sum(int(v) for k, v in counts.items() if k.startswith("line:")) == len(crossings)
    snap = {k.decode(): v for k, v in client.hgetall(keys("hv").snapshot("street")).items()}
    validate({k: v.decode() for k, v in snap.items() if k != "jpeg"} | {"jpeg": ""}, "snapshot")
    assert cv2.imdecode(np.frombuffer(snap["jpeg"], np.uint8), cv2.IMREAD_COLOR).shape == (360, 640, 3)
    status = json.loads(client.hget(keys("hv").cameras, "street"))
    assert status["skipped"] == 0 and status["published"] == FRAMES


@pytest.mark.timeout(180)
def test_node_consumer_reads_and_validates_real_pipeline_output(street, tmp_path):
    server, _ = street
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            require_binary(tool)  # skips, or fails under CI=true
    install = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_EXAMPLE, capture_output=True,
                             encoding="utf-8", timeout=150)
    if install.returncode != 0:
        skip_or_fail(f"npm ci failed in {NODE_EXAMPLE} (no access to the npm registry?): {install.stderr[-500:]}")
    run = subprocess.run(["node", "index.js", "--redis-url", server.url, "--group", "node-test", "--from-start",
                          "--idle-exit-ms", "2000", "--counts"], cwd=NODE_EXAMPLE, capture_output=True,
                         encoding="utf-8", timeout=60)
    assert run.returncode == 0, run.stderr  # 1 would mean a message did not match the schemas
    printed = [json.loads(line) for line in run.stdout.splitlines()]
    crossings = [p for p in printed if "line" in p]
    client = server.client()
    expected = [(i.decode(), json.loads(f[b"data"])) for i, f in client.xrange(keys("hv").events)]
    expected = [(i, e) for i, e in expected if e["type"] == "line_crossed"]
    assert [(c["id"], c["line"], c["direction"], c["class"], c["track_id"]) for c in crossings] == [
        (i, e["line"], e["direction"], e["class"], e["track_id"]) for i, e in expected]
    assert {"counts": "street"} in [{k: v for k, v in p.items() if k == "counts"} for p in printed]
    assert client.xpending(keys("hv").events, "node-test")["pending"] == 0  # all acknowledged
