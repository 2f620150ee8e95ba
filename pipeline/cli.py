"""The `hydravision` command: run the pipeline, change its cameras live, tail its output, train and evaluate models."""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import math
import os
import re
import sys
import traceback
from pathlib import Path

from pipeline.errors import UserError
from pipeline.logs import FORMATS, setup_logging, worker_lines_apart
from workers.redact import redact_text

log = logging.getLogger("hydravision")


def parse_size(text: str) -> tuple[int, int]:
    """'192x320' -> (192, 320) as (height, width)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH like 192x320, got {text!r}") from None
    return h, w


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port 0-65535 (0: a free one), got {text!r}")
    return value


def checkpoint(text: str) -> Path:
    """A checkpoint file, or ``demo``: the bundled one (as ``model.checkpoint: demo`` in a config)."""
    if text != "demo":
        return Path(text)
    from pipeline.config import checkpoint_path  # only here: the other commands' start does not pay for pydantic

    return checkpoint_path(text)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def seconds(text: str) -> float:
    """A duration, a period or a timeout: a finite number above 0 (``--duration 0`` ran for ever, nan never
    stopped or never logged, a negative timeout was a bug's traceback)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {text!r}")
    return value


def prefix(text: str) -> str:
    """A --prefix a service can have: the config's redis.prefix pattern (`status --prefix ''` read ":cameras",
    and `cameras list --prefix 'a b'` left a stream "a b:control" behind)."""
    from workers.settings import RedisConfig  # the pattern's one home; imported by the CLI's parser already

    pattern = next(m.pattern for m in RedisConfig.model_fields["prefix"].metadata if getattr(m, "pattern", None))
    if not re.fullmatch(pattern, text):
        raise argparse.ArgumentTypeError(f"expected a redis.prefix (1-32 letters, digits, '_', '.' or '-', as the "
                                         f"config takes), got {text!r}")
    return text


def parse_head(text: str) -> tuple[str, list[str]]:
    """'vehicles=car,bicycle' -> ('vehicles', ['car', 'bicycle'])."""
    name, sep, classes = text.partition("=")
    names = [c.strip() for c in classes.split(",") if c.strip()]
    if not sep or not name.strip() or not names:
        raise argparse.ArgumentTypeError(f"expected NAME=CLASS[,CLASS...] like people=person, got {text!r}")
    return name.strip(), names


REDIS_URL_HELP = "the service's Redis (default: $HYDRAVISION_REDIS_URL, else redis://127.0.0.1:6379/0)"
PREFIX_HELP = "the service's redis.prefix (default hv)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hydravision", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a backbone with heads, or new heads on a frozen backbone")
    t.add_argument("--out", type=Path, required=True, help="checkpoint to write (.safetensors)")
    t.add_argument("--head", dest="heads", type=parse_head, action="append", required=True,
                   metavar="NAME=CLASSES", help="a head and its classes, e.g. people=person (repeatable)")
    t.add_argument("--data", default="synthetic", help="'synthetic', a YOLO folder with images/ and labels/, or a data.yaml (or its "
                   "folder) naming its splits, as Roboflow and Ultralytics write them (README)")
    t.add_argument("--from", dest="init", type=checkpoint, help="start from this checkpoint ('demo': the bundled one)")
    mode = t.add_mutually_exclusive_group()  # the fine-tuning modes (with --from)
    mode.add_argument("--freeze-shared", action="store_true",
                      help="train only the new heads; backbone, neck and other heads stay bit-identical")
    mode.add_argument("--unfreeze-stages", type=positive_int, default=0, metavar="N",
                      help="train the --head heads, the backbone's last N stages and the neck; the model's other "
                      "heads are scored on held-out scenes before and after (their features change)")
    mode.add_argument("--lora", type=positive_int, default=None, metavar="RANK",
                      help="train the new heads on a LoRA adapter of the frozen backbone: other heads stay "
                      "bit-identical; --out holds only the adapter and the new heads, and needs --from beside it")
    t.add_argument("--lora-stages", type=positive_int, default=None, metavar="N", help="with --lora: adapt the "
                   "backbone's last N stages (default 1; the adapter's heads run those stages a second time)")
    t.add_argument("--eval-scenes", type=positive_int, default=8, help="with --unfreeze-stages: held-out scenes")
    t.add_argument("--eval-frames", type=positive_int, default=40, help="with --unfreeze-stages: frames per scene")
    t.add_argument("--steps", type=positive_int, default=3000, help="training steps (default 3000)")
    t.add_argument("--batch-size", type=positive_int, default=16, help="images per step (default 16)")
    t.add_argument("--lr", type=float, default=2e-3, help="learning rate (default 2e-3)")
    t.add_argument("--seed", type=int, default=0, help="seed of the data and the initialisation (default 0)")
    # The architecture options default to None (TRAIN_DEFAULTS in pipeline/model_commands.py fills them): with
    # --from the checkpoint's architecture is kept, and an option the user gave that differs is refused.
    t.add_argument("--input-size", type=parse_size, default=None, metavar="HxW", help="a new model's input "
                   "(default 256x448)")
    t.add_argument("--backbone", choices=("resnet", "vit", "mobilenet"), default=None,
                   help="a new model's backbone (default resnet; docs/architecture.md, 'Backbones, necks, "
                   "fine-tuning')")
    t.add_argument("--depth", type=int, default=None, help="ResNet depth (10, 18, 34, 50, 101; default 18) or "
                   "ViT blocks (default 4)")
    t.add_argument("--width", type=float, default=None, help="ResNet base width (default 16; torchvision: 64), ViT "
                   "hidden size (default 128; vit_b_16: 768) or MobileNetV3 width multiplier (default 1.0)")
    t.add_argument("--arch", choices=("large", "small"), default=None, help="MobileNetV3 variant (default small)")
    t.add_argument("--neck", choices=("fpn", "pan"), default=None, help="a new model's neck: FPN (default), or "
                   "PAN (FPN then a bottom-up path)")
    t.add_argument("--neck-channels", "--fpn-channels", dest="neck_channels", type=int, default=None,
                   help="a new model's neck channels (default 64)")
    t.add_argument("--import-backbone", type=Path, help="initialise the backbone from a torchvision-style .pth "
                   "state dict (ImageNet resnet18..101, vit_b_16, mobilenet_v3_large/_small)")
    t.add_argument("--no-progress", action="store_true")

    a = sub.add_parser("train-attribute", help="add an attribute head (labels for one head's boxes, e.g. a car's "
                       "body type) to a model and train it on its frozen features")
    a.add_argument("--from", dest="init", type=checkpoint, required=True,
                   help="the model to add it to ('demo': the bundled one)")
    a.add_argument("--out", type=Path, required=True, help="checkpoint to write (.safetensors)")
    a.add_argument("--attribute", type=parse_head, required=True, metavar="NAME=LABELS",
                   help="e.g. kind=sedan,hatch,van (synthetic scenes know a car's 'kind')")
    a.add_argument("--on", type=parse_head, required=True, metavar="HEAD=CLASSES",
                   help="the detection head and its classes it labels, e.g. vehicles=car")
    a.add_argument("--steps", type=positive_int, default=600, help="training steps (default 600)")
    a.add_argument("--seed", type=int, default=0, help="default 0")
    a.add_argument("--no-progress", action="store_true")

    r = sub.add_parser("train-reid", help="add a re-ID head (an appearance embedding of some heads' boxes, which "
                       "the tracker uses to keep identities) to a model and train it on its frozen features")
    r.add_argument("--from", dest="init", type=checkpoint, required=True,
                   help="the model to add it to ('demo': the bundled one)")
    r.add_argument("--out", type=Path, required=True, help="checkpoint to write (.safetensors)")
    r.add_argument("--heads", type=lambda v: [h for h in v.split(",") if h], required=True, metavar="HEAD,...",
                   help="detection heads whose boxes it embeds, e.g. people,vehicles")
    r.add_argument("--steps", type=positive_int, default=600, help="training steps (default 600)")
    r.add_argument("--seed", type=int, default=0, help="default 0")
    r.add_argument("--no-progress", action="store_true")

    d = sub.add_parser("train-demo", help="reproduce the bundled demo checkpoint (four stages, seeded)")
    d.add_argument("--out", type=Path, default=Path("models/checkpoints/demo.safetensors"),
                   help="default: models/checkpoints/demo.safetensors under this directory (in a checkout: the "
                   "bundled one, replaced)")
    d.add_argument("--steps", type=positive_int, nargs=4, default=None, metavar=("BASE", "HEAD", "ATTRIBUTE", "REID"),
                   help="training steps of the four stages")
    d.add_argument("--fresh", action="store_true",
                   help="train every stage again, also those a stopped run finished (their files beside --out)")
    d.add_argument("--no-progress", action="store_true")

    m = sub.add_parser("import-detector", help="make a checkpoint from torchvision's COCO FCOS weights (a file you "
                       "downloaded: fcos_resnet50_fpn_coco-99b0c9b7.pth)")
    m.add_argument("weights", type=Path, help="torchvision's fcos_resnet50_fpn state dict (.pth)")
    m.add_argument("--out", type=Path, default=Path("models/checkpoints/coco-fcos.safetensors"),
                   help="default: models/checkpoints/coco-fcos.safetensors under this directory")
    m.add_argument("--input-size", type=parse_size, default=None, metavar="HxW",
                   help="model input, multiples of 128 (default 512x896; torchvision uses ~800 on the short side)")

    x = sub.add_parser("export", help="export a checkpoint to ONNX (what model.backend onnxruntime and openvino, "
                                      "and auto on a CPU, run)")
    x.add_argument("checkpoint", type=checkpoint, nargs="?", default=None, help="default ('demo'): the bundled checkpoint")
    x.add_argument("--out", type=Path, default=None,
                   help="the .onnx file to write (default: the cache the service reads, so its first start does "
                        "not pay the export)")

    def run_options(r: argparse.ArgumentParser) -> None:
        r.add_argument("--duration", type=seconds, default=None, metavar="S", help="stop after S seconds")
        r.add_argument("--redis-url", default=None,
                       help="Redis to publish to (overrides the config and $HYDRAVISION_REDIS_URL)")
        r.add_argument("--plain", action="store_true", help="log status lines instead of the live table")
        r.add_argument("--log-every", type=seconds, default=5.0, metavar="S",
                       help="with --plain: a status line every S seconds (default 5)")
        r.add_argument("--summary-json", type=Path, default=None,
                       help="write the final per-camera stats here (a camera's counts are the whole run's, over "
                       "the restarts of its process; 'restarts': how many times it was restarted)")
        r.add_argument("--log-format", choices=FORMATS, default="text",
                       help="json: one JSON object per line (log records, status lines, the final stats) on stdout")
        r.add_argument("--api-port", type=port, default=None, metavar="PORT",
                       help="serve the HTTP control API on this port (0: a free one); overrides api.port")

    r = sub.add_parser("run", help="run the pipeline described by a config file")
    r.add_argument("config", type=Path, help="the YAML file (configs/ has examples; README: 'Running on real "
                   "cameras'); relative paths in it are of the working directory")
    run_options(r)
    dm = sub.add_parser("demo", help="run configs/demo.yaml: synthetic cameras, embedded Redis, CPU")
    run_options(dm)

    tl = sub.add_parser("tail", help="print a camera's messages from Redis as they arrive")
    tl.add_argument("camera", nargs="?", default=None)
    tl.add_argument("--events", action="store_true", help="tail the events stream instead of a camera")
    tl.add_argument("--redis-url", default=None, help=REDIS_URL_HELP)
    tl.add_argument("--prefix", type=prefix, default="hv", help=PREFIX_HELP)
    tl.add_argument("--from-start", action="store_true", help="start at the oldest message kept")
    tl.add_argument("--count", type=positive_int, default=None, help="stop after N messages")
    tl.add_argument("--json", action="store_true", help="print raw JSON messages")
    tl.add_argument("--group", default=None, help="read as a member of this consumer group: each message goes to "
                    "one member, is acknowledged after it is printed, and one a killed member had not "
                    "acknowledged is taken over by another (pipeline/consumer.py)")
    tl.add_argument("--consumer", default=None, help="with --group: this member's name (default: host-pid; reuse "
                    "a name to resume its unacknowledged messages first)")
    tl.add_argument("--claim-idle-ms", type=positive_int, default=None, metavar="MS",
                    help="with --group: take over messages other members left unacknowledged this long "
                    "(default 30000)")

    st = sub.add_parser("status", help="the cameras table from Redis (stale entries marked), from any machine")
    st.add_argument("--redis-url", default=None, help=REDIS_URL_HELP)
    st.add_argument("--prefix", type=prefix, default="hv", help=PREFIX_HELP)
    st.add_argument("--json", action="store_true", help="print the statuses as JSON")

    from pipeline.camera_commands import add_parser as add_cameras_parser  # no heavy imports in there

    add_cameras_parser(sub)

    db = sub.add_parser("dashboard", help="a live web page of the cameras and events, read from Redis alone")
    db.add_argument("--redis-url", default=None, help=REDIS_URL_HELP)
    db.add_argument("--prefix", type=prefix, default="hv", help=PREFIX_HELP)
    db.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; the page has no login: "
                    "keep it local or behind a proxy that has one)")
    db.add_argument("--port", type=port, default=8765, help="default 8765; 0: a free one")
    db.add_argument("--interval", type=seconds, default=1.0, metavar="S",
                    help="read and push camera tiles every S seconds (default 1)")
    db.add_argument("--allow-control", action="store_true", help="let the page add and remove cameras (through "
                    "the service's Redis control stream; anyone who reaches the page can)")
    db.add_argument("--allowed-host", action="append", metavar="NAME", help="on loopback the page answers only "
                    "requests naming a loopback Host (against DNS rebinding): a proxy's name it also answers; "
                    "repeatable")

    e = sub.add_parser("eval", help="score every head on held-out synthetic scenes (mAP@0.5, mAP@0.5:0.95)")
    e.add_argument("--checkpoint", type=checkpoint, default=None, help="default ('demo'): the bundled checkpoint")
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    e.add_argument("--scenes", type=positive_int, default=8, help="held-out scenes (default 8)")
    e.add_argument("--frames", type=positive_int, default=40, help="frames scored per scene")
    e.add_argument("--backend", choices=["auto", "torch", "onnxruntime", "openvino"], default=None,
                   help="score through the service's model path on this backend (model.backend), to check a faster "
                        "one against the default: the checkpoint itself in torch, fp32")
    e.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16", "int8"], default="auto",
                   help="with --backend: model.precision")
    e.add_argument("--no-progress", action="store_true")
    _verbose_after_command(p)
    return p


def _verbose_after_command(parser: argparse.ArgumentParser) -> None:
    """-v after the command too (`hydravision run my.yaml -v`, as the bug message's "run with -v" is read): argparse
    takes a main parser's option only before the command, and refused it after with "unrecognized arguments"."""
    for action in parser._actions:  # argparse keeps no public list of a parser's subcommands
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                # SUPPRESS: left out, it leaves the main parser's value (`hydravision -v run ...`) as it is
                command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                     help="debug logging")
                _verbose_after_command(command)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, getattr(args, "log_format", "text"))
    # basicConfig does nothing where logging is already set up (pytest, a program calling main()): -v must
    # still show this module's debug lines (a user error's traceback)
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        if args.command in ("run", "demo"):
            worker_lines_apart()
            from pipeline import run_commands  # imports Ray; keep `train`/`eval` start-up fast

            return run_commands.run(args) if args.command == "run" else run_commands.demo(args)
        if args.command == "tail":
            from pipeline import run_commands

            if not args.events and not args.camera:
                raise UserError("tail needs a CAMERA id, or --events")
            if not args.group and (alone := [f"--{k.replace('_', '-')}" for k in ("consumer", "claim_idle_ms")
                                             if getattr(args, k) is not None]):  # ignored, a plain tail ran
                raise UserError(f"{alone[0]} is for a member of a consumer group: it needs --group GROUP")
            return run_commands.tail(args)
        if args.command == "status":
            from pipeline import run_commands

            return run_commands.status(args)
        if args.command == "cameras":
            from pipeline import camera_commands

            return camera_commands.main(args)
        if args.command == "dashboard":
            from pipeline import dashboard  # no Ray in the dashboard's process

            return dashboard.command(args)
        # torch is imported here only: `dashboard`, `status` and `tail` run where it is not wanted
        from pipeline import model_commands

        if args.command == "train":
            path = model_commands.train(args)
            print(f"wrote {path}")
            print(model_commands.format_fine_tune(path), end="")
        elif args.command == "train-attribute":
            print(f"wrote {model_commands.train_attribute(args)}")
        elif args.command == "train-reid":
            print(model_commands.train_reid(args))
        elif args.command == "train-demo":
            print(json.dumps(model_commands.train_demo(args), indent=2))
        elif args.command == "export":
            print(model_commands.export(args))
        elif args.command == "import-detector":
            print(model_commands.import_detector(args))
        elif args.command == "eval":
            report = model_commands.evaluate(args)
            print(json.dumps(report, indent=2) if args.json else model_commands.format_report(report))
        return 0
    except KeyboardInterrupt:
        return _fatal(args, "interrupted", 130)
    except BrokenPipeError:  # `hydravision tail cam | head -1`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail again
        return 0
    except UserError as e:  # ConfigError and the model commands' translated errors among them
        log.debug("where the error was raised:\n%s", _traceback())
        return _fatal(args, f"error: {e}", 2)
    except Exception as e:  # a bug, whatever its type: a ValueError here is not the user's bad input
        log.error("%s failed:\n%s", args.command, _traceback())
        return _fatal(args, f"error: {redact_text(f'{type(e).__name__}: {e}', [])}\n"
                      "This is a bug in hydravision, not a problem with your input: the traceback is above "
                      "(run with -v for debug logs too); please report it.", 1)


def _fatal(args: argparse.Namespace, message: str, code: int) -> int:
    """Why the command ends, said last; returns ``code``. With ``--log-format json`` an error record on the JSON
    lines (``event: exit``, ``exit_code``) rather than plain text on stderr: a log collector parsing the output as
    JSON missed why the service ended."""
    if getattr(args, "log_format", "text") == "json":
        log.error(message, extra={"data": {"event": "exit", "exit_code": code}})
    else:
        print(message, file=sys.stderr)
    return code


def _traceback() -> str:
    """The exception being handled, formatted, with the credentials of any URL in it hidden."""
    return redact_text(traceback.format_exc().rstrip(), [])


def entry() -> None:
    """The `hydravision` command: ``main()``, then the process ends. One that imported Ray ends once its own
    clean-up is done (atexit hooks, log handlers, stdio), without the interpreter's finalization: beside the native
    threads Ray leaves in a driver whose ray.init a signal cut short, that finalization now and then aborted the
    process after it had stopped everything and said "interrupted" (exit -6 instead of 130, twice in loaded test
    runs; a native crash at exit, out of reach of Python)."""
    code = main()
    if "ray" not in sys.modules:
        sys.exit(code)
    atexit._run_exitfuncs()  # what the finalization would have run first: the embedded Redis's stop, Ray's shutdown
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader gone (`| head`), a closed stream: nothing more to say
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()
