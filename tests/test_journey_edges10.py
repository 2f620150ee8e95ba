"""What a user walking today's features hit: a refusal printed nothing with --json, train-demo trained stages
without a word, eval rendered scenes it could not score."""
from __future__ import annotations

import argparse
import json
import logging

import pytest

from pipeline import camera_commands, model_commands
from pipeline.cli import build_parser


def test_a_refused_command_with_json_prints_the_answer_code_included(monkeypatch, capsys):
    """`cameras remove nope --json` printed nothing on stdout: the code README promises never reached a script."""
    answer = {"status": "rejected", "code": 404, "reason": "camera.id: no camera 'nope' is running", "by": "cli"}

    class Channel:
        def send(self, op, camera_id=None, body=None):
            return answer

    monkeypatch.setattr(camera_commands, "_channel", lambda args: Channel())
    args = build_parser().parse_args(["cameras", "remove", "nope", "--api", "http://127.0.0.1:9", "--json"])
    with pytest.raises(camera_commands.UserError, match="rejected: camera.id: no camera 'nope'"):
        camera_commands.main(args)
    assert json.loads(capsys.readouterr().out) == answer


def test_train_demo_says_each_stage_it_trains(tmp_path, monkeypatch, caplog):
    """Reused stages were said, trained ones were not: with --no-progress a long stage ran in silence."""
    trained = []
    monkeypatch.setattr(model_commands, "train_model", lambda cfg, progress: trained.append(cfg.out))
    monkeypatch.setattr(model_commands, "train_attribute_head", lambda cfg, progress: trained.append(cfg.out))

    class Stop(Exception):
        pass

    def reid(cfg, progress):
        raise Stop  # the stages before it are what is checked

    monkeypatch.setattr(model_commands, "train_reid_head", reid)
    args = build_parser().parse_args(["train-demo", "--out", str(tmp_path / "demo.safetensors"), "--steps",
                                      "2", "2", "2", "2", "--no-progress"])
    with caplog.at_level(logging.INFO, logger="pipeline.model_commands"), pytest.raises(Stop):
        model_commands.train_demo(args)
    said = [r.getMessage() for r in caplog.records if "training" in r.getMessage()]
    # the fourth, the re-ID head, said too (it went unsaid: "stage 4 of 4" never logged)
    assert len(trained) == 3 and [m.split(":")[0] for m in said] == [f"stage {i} of 4" for i in (1, 2, 3, 4)], said


def test_eval_of_heads_the_scenes_cannot_score_answers_at_once(tmp_path, monkeypatch):
    """A head of one's own classes: eval rendered every held-out scene (10 s here) to report nothing."""
    from models import evaluate as evaluate_module
    from models.checkpoint import save_checkpoint
    from models.hydranet import HydraNet, HydraNetConfig

    path = tmp_path / "forklifts.safetensors"
    model = HydraNet(HydraNetConfig(heads={"forklifts": {"classes": ["forklift", "pallet"]}}, input_size=(64, 96)))
    save_checkpoint(model, path, {"history": []})
    monkeypatch.setattr(evaluate_module, "held_out_frames", lambda cfg: pytest.fail("rendered scenes for nothing"))
    args = argparse.Namespace(checkpoint=str(path), scenes=2, frames=2, backend=None, precision="auto",
                              no_progress=True, json=True)
    report = model_commands.evaluate(args)
    assert report["heads"] == {} and "forklifts" in report["skipped"] and report["frames"] == 0
    assert "not scored" in model_commands.format_report(report)


@pytest.mark.parametrize("command, op", [({"op": "remove", "camera": "nope"}, "remove"),
                                         ({"op": "update", "id": "a", "changes": "fps=5"}, "update"),
                                         ({"op": "drop", "id": "a"}, None)])
def test_a_command_refused_on_its_fields_is_answered_with_its_op(command, op):
    """A remove with `camera` for `id` was answered `"op": null`: its sender could not tell which of its commands
    the answer was for. The op is read leniently, as the request_id already was (an unknown op stays null)."""
    from pipeline.control import ControlConsumer

    class App:
        def note_rejected(self, op, by, reason, camera=None):
            self.noted = op

    app = App()
    consumer = ControlConsumer(app, "redis://127.0.0.1:1/0", "hv")  # _apply needs no Redis for these
    result = consumer._apply("1-0", {b"data": json.dumps(command).encode()}, redelivered=False)
    assert result["status"] == "rejected" and result["code"] == 422 and result["op"] == op
    assert app.noted == (op or "command")


def test_a_control_stream_command_larger_than_the_apis_body_limit_is_refused_unparsed(monkeypatch):
    """The HTTP API refuses a body over MAX_BODY_BYTES (413); the stream parsed any size (a 64 MB camera took the
    control loop's memory and time), and a URL inside it was then written into the camera's status every second."""
    from pipeline import control
    from pipeline.admission import MAX_BODY_BYTES
    from pipeline.control import ControlConsumer

    class App:
        def note_rejected(self, op, by, reason, camera=None):
            pass

    parsed = []
    monkeypatch.setattr(control, "strict_json", lambda raw: parsed.append(raw) or {})
    big = json.dumps({"op": "add", "camera": {"id": "x", "url": "synthetic://street#" + "a" * MAX_BODY_BYTES}})
    result = ControlConsumer(App(), "redis://127.0.0.1:1/0", "hv")._apply("1-0", {b"data": big.encode()}, False)
    assert result["status"] == "rejected" and result["code"] == 413 and "larger than" in result["reason"]
    assert parsed == [] and result["op"] is None  # not even read leniently (nor for its lane)


def test_an_export_put_back_lists_the_running_cameras_once(capsys):
    """Each 409 sent a `list` of every camera: 200 running cameras put back were 200 lists of 200 rows."""
    sent = []

    class Channel:
        def send(self, op, camera_id=None, body=None):
            sent.append(op)
            if op == "list":
                return {"status": "accepted", "code": 200, "result": [{"id": f"c{i}"} for i in range(200)]}
            return {"status": "rejected", "code": 409, "reason": "runs"}

    assert camera_commands._add_each(Channel(), [{"id": f"c{i}"} for i in range(200)]) == 0
    assert sent.count("list") == 1 and sent.count("add") == 200
    assert capsys.readouterr().out.count("already runs") == 200


def test_an_export_put_back_to_a_service_whose_answers_have_no_code_still_says_the_running_ones(capsys):
    """A CLI of this version against a service from before answers carried `code` (the Redis channel's answer has
    none): its running cameras were counted as refused (exit 2). Its reason's words decide there, as they did."""
    class Channel:
        def send(self, op, camera_id=None, body=None):
            if op == "list":
                return {"status": "accepted", "result": [{"id": "a"}]}
            return {"status": "rejected", "reason": f"camera.id: camera {body['id']!r} already exists"}

    assert camera_commands._add_each(Channel(), [{"id": "a"}]) == 0
    assert "camera a already runs" in capsys.readouterr().out
