"""Cluster mode and the cameras CLI as an operator met them (round 14): a camera whose process, or whose replica, a
lost node left waiting for a node that can host it read only "still starting after its restart" (every tick) and
"unavailable: GetTimeoutError", and `hydravision cameras --api` pointed at a server that does not speak HTTP said
"a bug in hydravision". Ray's calls are fakes; no cluster is started."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from types import SimpleNamespace

import pytest
import ray

import pipeline.cluster as cluster
from pipeline.app import App, CameraHandle
from pipeline.cli import main
from pipeline.cluster import Placement, inference_name
from pipeline.config import parse_config
from pipeline.placement import Node, ReplicaAssigner, inference_options
from workers.settings import CameraConfig

HEAD, A, B = "h" * 56, "a" * 56, "b" * 56


class Call:
    """An ObjectRef of a call to ``actor``: ready once Ray has placed it (``node`` set; None: pending in Ray, no
    node can host it), then ``answer()``."""

    def __init__(self, actor: "Actor", answer):
        self.actor, self.answer = actor, answer

    def ready(self) -> bool:
        return self.actor.node is not None


class Never(Call):
    """A call that does not answer in time, placed or not: a camera's start waiting for its replica."""

    def ready(self) -> bool:
        return False


class Actor:
    """A StreamActor / InferenceActor handle on ``node``."""

    def __init__(self, node: str | None):
        self.node = node
        self.sent: list[str] = []  # the calls sent to it, by method
        self.where = SimpleNamespace(remote=lambda: Call(self, lambda: {"node": self.node}))
        self.start = SimpleNamespace(remote=lambda *a, **kw: Never(self, None))
        self.stats_many = SimpleNamespace(remote=lambda ids, model=False: self._sent("stats_many", lambda: {
            "cameras": {cid: {"camera": cid, "state": "running"} for cid in ids}, "model": None}))
        self.model_stats = SimpleNamespace(remote=lambda: self._sent("model_stats", lambda: {"pid": 1}))

    def _sent(self, method: str, answer) -> Call:
        self.sent.append(method)
        return Call(self, answer)


def _wait(refs, num_returns=1, timeout=None):
    refs = list(refs)
    return [r for r in refs if r.ready()], [r for r in refs if not r.ready()]


def _get(ref, timeout=None):
    if not ref.ready():
        raise ray.exceptions.GetTimeoutError("Get timed out: some object(s) not ready.")
    return ref.answer()


@pytest.fixture
def a_lost_node(monkeypatch):
    """A service on a head and node A, the only node with hydravision_inference and label site=z: replica 0 and
    cameras gate (label site=z) and lobby on A; then A dies. (app, its replica, what it said, set_alive)."""
    head = Node(HEAD, "10.0.0.1", {"CPU": 4})
    node_a = Node(A, "10.0.0.2", {"CPU": 4, "hydravision_inference": 1}, {"site": "z"})
    node_b = Node(B, "10.0.0.3", {"CPU": 4, "hydravision_inference": 1}, {"site": "z"})
    alive = {HEAD: True, A: True}

    def nodes():
        return [{"NodeID": n.id, "Alive": alive[n.id], "NodeManagerAddress": n.ip, "Resources": dict(n.resources),
                 "Labels": dict(n.labels)} for n in (head, node_a, node_b) if n.id in alive]

    monkeypatch.setattr(cluster.ray, "nodes", nodes)
    monkeypatch.setattr(cluster.ray, "wait", _wait)
    monkeypatch.setattr(cluster.ray, "get", _get)
    config = parse_config({"cameras": [], "ray": {"address": "HEAD:6380"}})
    said: list[str] = []
    app = App(config, say=said.append)
    placement = Placement.__new__(Placement)  # its rules without a Ray: the snapshot it took at the start
    placement.config, placement.nodes, placement.cores, placement.namespace = config, [head, node_a], 4, "ns"
    placement.assigner, placement.in_camera_process = ReplicaAssigner(1), False
    stand_in = SimpleNamespace(options=lambda **options: SimpleNamespace(remote=lambda *args: Actor(A)))
    replica = placement.spawn(stand_in, {**inference_options(config.ray, None, [head, node_a]),
                                         "name": inference_name(0)})
    cams = [CameraConfig(id="gate", url="synthetic://street", placement={"labels": {"site": "z"}}),
            CameraConfig(id="lobby", url="synthetic://street")]
    for cam in cams:
        [(_, options)] = placement.stream_processes([cam])
        placement.replica_index(cam.id, [c.id for c in cams])
        app.cameras[cam.id] = CameraHandle(cam.id, cam, placement.spawn(stand_in, options), options["name"])
    app.inference, app.placement = [replica], placement
    app.node_watch = placement.watch(app)
    app.node_watch.learn()
    alive[A] = False
    app.cameras["gate"].process.node = None  # no alive node has label site=z: Ray keeps it pending
    app.cameras["lobby"].process.node = HEAD  # restarted on the head, its start waiting for replica 0
    replica.node = None  # no alive node offers hydravision_inference

    def set_alive(node: str) -> None:
        alive[node] = True
        app.node_watch._last_poll = 0.0

    app.node_watch._last_poll = 0.0
    app.node_watch.tick()
    return app, replica, said, set_alive


def test_a_restart_waiting_for_its_replica_says_what_node_the_replica_waits_for(a_lost_node, caplog):
    """Before: 'camera lobby: still starting after its restart', every tick, for as long as the replica waited
    (for ever, without a node offering hydravision_inference), and nothing said why."""
    app, replica, said, set_alive = a_lost_node
    assert any("inference replica 0 waits for a node with hydravision_inference=1" in s for s in said), said
    lobby = app.cameras["lobby"]
    with caplog.at_level(logging.INFO, logger="pipeline.app"):
        assert app._restart_camera(lobby, wait_s=0) is None
    assert [r.getMessage() for r in caplog.records if "still starting" in r.getMessage()] == [
        "camera lobby: still starting after its restart: inference replica 0, which it sends its frames to, waits "
        "for a node with hydravision_inference=1 to join"]
    # node B joins, Ray places the replica there: no longer said to wait
    set_alive(B)
    replica.node = B
    app.node_watch.tick()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipeline.app"):
        app._restart_camera(lobby, wait_s=0)
    assert [r.getMessage() for r in caplog.records if "still starting" in r.getMessage()] == [
        "camera lobby: still starting after its restart"]


def test_a_camera_whose_process_waits_for_a_node_reads_unavailable_with_what_that_node_needs(a_lost_node):
    """Before: its stats call, queued in Ray for the pending process, timed out: 'unavailable' with last_error
    "GetTimeoutError: Get timed out: some object(s) not ready." (the status line, /readyz, --summary-json)."""
    app, replica, said, set_alive = a_lost_node
    by_camera = {s["camera"]: s for s in app.stats(timeout=0)}
    assert by_camera["gate"]["state"] == "unavailable"
    assert by_camera["gate"]["last_error"] == "its process waits for a node with label site=z to join"
    assert by_camera["lobby"]["state"] == "running"
    # node B, with the label and hydravision_inference, joins and Ray places both there: nothing waits any more
    set_alive(B)
    app.cameras["gate"].process.node = replica.node = B
    app.node_watch.tick()
    assert app.node_watch.waits_for("gate") == app.node_watch.waits_for("lobby") == ""
    assert {s["camera"]: s["state"] for s in app.stats(timeout=0)} == {"gate": "running", "lobby": "running"}


def test_ticks_send_an_actor_that_does_not_answer_one_call_not_one_each(a_lost_node):
    """Ray queues each call to an actor it keeps pending (no node can host it) until it runs: every tick sent the
    camera process a stats call and the replica a model_stats call, ~4.4 KB each in the controller (measured with
    Ray 2.x), for as long as the node stayed away, and they all ran at once when it came back."""
    app, replica, said, set_alive = a_lost_node
    gate = app.cameras["gate"].process
    gate.sent.clear(), replica.sent.clear()
    for _ in range(5):
        by_camera = {s["camera"]: s for s in app.stats(timeout=0)}
        assert by_camera["gate"]["state"] == "unavailable" and by_camera["lobby"]["state"] == "running"
    assert gate.sent == ["stats_many"] and replica.sent == ["model_stats"]
    lobby = app.cameras["lobby"].process
    assert lobby.sent.count("stats_many") >= 5  # one that answers is asked at every tick, as before
    # once placed, the call held answers and the next ticks ask anew
    set_alive(B)
    gate.node = replica.node = B
    for _ in range(2):
        assert {s["camera"]: s["state"] for s in app.stats(timeout=0)} == {"gate": "running", "lobby": "running"}
    assert gate.sent == ["stats_many"] * 3 and replica.sent == ["model_stats"] * 3


def test_a_camera_removed_while_it_waited_is_forgotten(a_lost_node):
    app, replica, said, set_alive = a_lost_node
    assert app.node_watch.waits_for("gate")
    del app.cameras["gate"]
    app.node_watch.tick()
    assert ("camera", "gate") not in app.node_watch.waiting


# -- `hydravision cameras --api` at a server that does not speak HTTP ------------------------------------------

def _answer(conn: socket.socket, data: bytes) -> None:
    """Sends ``data`` and ends the connection once the client has: closed with the request's body still unread, it
    was reset, and the client read ECONNRESET instead of the answer."""
    with conn:
        conn.settimeout(10)
        conn.recv(65536)
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            while conn.recv(65536):
                pass


@pytest.fixture
def not_http():
    """A TCP server that answers every connection with an SSH banner (the port of some other service)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            _answer(conn, b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


@pytest.mark.parametrize("argv", [["list"], ["add", "--id", "gate", "--url", "synthetic://street"],
                                  ["remove", "gate"]])
def test_an_api_url_where_no_http_server_answers_is_the_users_error(not_http, argv, capsys):
    """Before: exit 1, "error: BadStatusLine: SSH-2.0-... This is a bug in hydravision, not a problem with your
    input" and a traceback, for a --api URL naming another service's port."""
    assert main(["cameras", *argv, "--api", not_http, "--timeout", "5"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert lines == [f"error: {not_http}/cameras{'/gate' if argv[0] == 'remove' else ''} answered something that is "
                     "not hydravision's API (not HTTP: 'SSH-2.0-OpenSSH_9.2p1 Debian-2')"], err
    assert "bug in hydravision" not in err


def test_an_answer_cut_short_says_the_command_may_still_be_applied(capsys):
    """Before: exit 1, "IncompleteRead(...) This is a bug in hydravision": the API (or a proxy before it) closed the
    connection in the middle of its answer, after the add had reached it."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = server.accept()
        _answer(conn, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"sta")

    threading.Thread(target=serve, daemon=True).start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    try:
        assert main(["cameras", "add", "--api", url, "--id", "gate", "--url", "synthetic://street",
                     "--timeout", "5"]) == 2
    finally:
        server.close()
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [
        f"error: the HTTP API at {url} cut its answer short: the command may still be applied "
        "(see `cameras list`)"], err


# -- a Redis only this machine reaches --------------------------------------------------------------------------

def test_a_unix_socket_redis_on_a_multi_machine_cluster_is_pointed_out():
    """Before: no word (only a loopback host was looked at); the cameras on the other machines then retried a
    socket path their machine does not have, for ever, and published nothing."""
    from pipeline.cluster import redis_warning

    nodes = [Node(HEAD, "10.0.0.1", {"CPU": 4}), Node(A, "10.0.0.2", {"CPU": 4})]
    warning = redis_warning("unix:///run/redis/redis.sock?db=0", nodes)
    assert warning == ("Redis at unix:///run/redis/redis.sock?db=0 is a Unix socket of this machine, but the Ray "
                       "nodes are at 10.0.0.1, 10.0.0.2: actors on other machines cannot reach it; use an address "
                       "all nodes can reach")
    assert redis_warning("unix:///run/redis/redis.sock", nodes[:1]) is None  # one machine: a socket is right


# -- docs/scaling.md ---------------------------------------------------------------------------------------------

def test_scaling_doc_bounds_the_cameras_wait_for_room_as_the_controller_does():
    """docs/scaling.md said every wait for free capacity was bounded by ray.placement_timeout_s (120 s): an operator
    whose autoscaler adds nodes raised it, and the cameras' processes still gave up after 65 s, their start budget
    (pipeline/app.py start_budget_s), which no setting changes."""
    from pathlib import Path

    from pipeline.app import start_budget_s
    from pipeline.config import RayConfig

    text = (Path(__file__).parent.parent / "docs" / "scaling.md").read_text()
    bullet = " ".join(text[text.index("**Refused, not pending.**"):text.index("**Redis must be reachable")].split())
    assert "Waiting for free capacity is bounded by `ray.placement_timeout_s`" not in bullet
    assert "the inference replicas by `ray.placement_timeout_s` (120 s)" in bullet
    assert RayConfig().placement_timeout_s == 120
    assert "the cameras' processes by their start budget, 60 s + 5 s per camera started together" in bullet
    assert [start_budget_s(n) for n in (1, 2, 10)] == [65, 70, 110]
