"""`hydravision train / train-demo / eval`: thin glue between the CLI and models/."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError

from models.checkpoint import (CheckpointError, import_backbone_weights, load_checkpoint, prepare_output, read_metadata,
                               read_tensors, save_checkpoint)
from models.datasets import DatasetError
from models.evaluate import EvalConfig, evaluate as evaluate_model
from models.hydranet import ConfigError as ModelConfigError, HydraNet, HydraNetConfig
from models.import_fcos import DEFAULT_INPUT_SIZE, import_torchvision_fcos
from models.train import TrainConfig, build_model, train as train_model
from models.train_attributes import AttributeTrainConfig, train_attribute as train_attribute_head
from models.train_reid import FIRST_TRAIN_SEED, ReIDTrainConfig, match_accuracy, train_reid as train_reid_head
from pipeline.errors import UserError
from workers.cores import usable_cores
from workers.settings import backend_problem

log = logging.getLogger(__name__)
DEMO_CHECKPOINT = Path(__file__).resolve().parent.parent / "models" / "checkpoints" / "demo.safetensors"
# What models/ raises for input the user gave (a file they named, their data, the architecture they asked
# for). models/ cannot import pipeline.errors, so these become UserErrors here. Not ValueError as such,
# nor FileNotFoundError: a bug raises those too, and every missing user file is a CheckpointError or
# DatasetError naming it.
MODEL_INPUT_ERRORS = (CheckpointError, DatasetError, ModelConfigError)

# The demo recipe, as a user would do it: a people detector trained with the backbone, then a
# vehicles head added on the frozen backbone (which leaves the people head bit-identical), then an
# attribute head that labels each car's body type, then a re-ID head that embeds every box for the tracker,
# both on the same frozen features.
DEMO_BASE_STEPS, DEMO_HEAD_STEPS, DEMO_ATTRIBUTE_STEPS, DEMO_REID_STEPS = 5000, 2500, 600, 600
DEMO_ATTRIBUTE = {"name": "kind", "labels": ["sedan", "hatch", "van"], "on": "vehicles", "of": ["car"]}
DEMO_REID = {"heads": ["people", "vehicles"], "seed": 3}
REID_CHECK_SEEDS = [FIRST_TRAIN_SEED - 1, FIRST_TRAIN_SEED - 2]  # scenes training never draws (nor the benchmark)
# Chosen with the tracker's defaults on the analytics tuning seeds (pipeline/analytics_eval.py TUNING_SEEDS):
# line-count error, zone occupancy and dwell against ground truth (docs/architecture.md, "Accuracy").
DEMO_SCORE_THRESHOLDS = {"people": 0.35, "vehicles": 0.4}


@contextmanager
def _user_input_errors() -> Iterator[None]:
    """Re-raises models/'s bad-input errors as UserError, the original chained (shown with -v)."""
    try:
        yield
    except MODEL_INPUT_ERRORS as e:
        raise UserError(str(e)) from e


def _progress(args: argparse.Namespace) -> bool:
    """The progress bar, on a terminal only: in a log file or a pipe (nohup, CI, the journal) it wrote ~10 redraws a
    second joined by carriage returns, in place of the step lines models/ logs there when the bar is off."""
    return not args.no_progress and sys.stderr.isatty()


def _write_errors(command):
    """A model file that cannot be written in --out's folder (a full disk, a file size limit) is one error line
    naming --out: safetensors raises SafetensorError and torch.save a RuntimeError of its zip writer for it, not an
    OSError, and an hour of training ended in "a bug in hydravision" and its traceback."""
    @functools.wraps(command)
    def wrapped(args: argparse.Namespace):
        try:
            return command(args)
        except (SafetensorError, RuntimeError) as e:
            text = f"{e} {e.__context__ or ''}"
            if not any(s in text for s in ("Error while serializing", "PytorchStreamWriter", "unexpected pos")):
                raise
            raise UserError(f"--out {args.out}: a file could not be written in its folder ({str(e).splitlines()[0]}); "
                            "is the disk full?") from e
    return wrapped


@_write_errors
def train(args: argparse.Namespace) -> Path:
    names = [name for name, _ in args.heads]
    if repeated := sorted({name for name in names if names.count(name) > 1}):  # dict() would keep only the last
        raise UserError(f"--head {repeated[0]} is given more than once ("
                        f"{'; '.join(','.join(c) for n, c in args.heads if n == repeated[0])}): give each head once, "
                        "with all its classes, e.g. --head vehicles=car,bicycle")
    if args.lora is None and args.lora_stages is not None:
        raise UserError(f"--lora-stages {args.lora_stages} is for a LoRA adapter: it needs --lora RANK")
    given = {key for key in TRAIN_DEFAULTS if getattr(args, key) is not None}  # before the defaults fill them
    for key, value in TRAIN_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:  # TrainConfig's constructor only checks the arguments: any ValueError from it is about them
        cfg = TrainConfig(
            out=args.out, heads=dict(args.heads), data=args.data, init=args.init, freeze_shared=args.freeze_shared,
            unfreeze_stages=args.unfreeze_stages, eval_scenes=args.eval_scenes, eval_frames=args.eval_frames,
            lora=None if args.lora is None else {"rank": args.lora, "stages": args.lora_stages},
            input_size=args.input_size, backbone=backbone_spec(args),
            neck={"type": args.neck, "channels": args.neck_channels}, steps=args.steps, batch_size=args.batch_size,
            lr=args.lr, seed=args.seed,
        )
    except ValueError as e:
        raise UserError(str(e)) from e
    if args.import_backbone and args.out.resolve() == args.import_backbone.resolve():  # replaced at the end
        raise UserError(f"--out {args.out} is the --import-backbone file itself: the checkpoint would replace it; "
                        "name another file")
    with _user_input_errors():
        if cfg.init is not None:
            if args.import_backbone:
                raise UserError("--import-backbone starts a new model; it cannot be combined with --from")
            refuse_architecture_options(args, given, cfg.init)
        if args.import_backbone:
            if not args.out.is_file():  # a folder, or a file where its folder should be: refused before the imported
                prepare_output(args.out)  # start is written beside it (an existing --out: train_model warns, once)
            torch.manual_seed(cfg.seed)  # the new heads' initial weights, as train_model seeds them without it
            model, _, _ = build_model(cfg)
            loaded = import_backbone_weights(model, args.import_backbone)
            cfg.init = args.out.with_name(args.out.stem + ".imported.safetensors")
            save_checkpoint(model, cfg.init,
                            {"history": [{"imported_backbone": str(args.import_backbone), "keys": len(loaded)}]})
        try:
            return train_model(cfg, progress=_progress(args))
        except FloatingPointError as e:  # diverged: the learning rate given (or the data), not a bug
            raise UserError(f"the training diverged: {e}; try a lower --lr (it is {cfg.lr:g})") from e


# The train command's options that the parser leaves None (pipeline/cli.py), so that what the user gave is known.
TRAIN_DEFAULTS = {"input_size": (256, 448), "backbone": "resnet", "neck": "fpn", "neck_channels": 64, "lora_stages": 1}


def refuse_architecture_options(args: argparse.Namespace, given: set[str], init: Path) -> None:
    """With --from the model's architecture is the checkpoint's: an option that asks for another one would be
    silently ignored (a model trained at another input size or with another backbone than asked), so it is refused."""
    config = read_metadata(init)["config"]
    if not isinstance(config, dict):
        return  # a damaged file: loading it says so
    have_backbone, have_neck = (part if isinstance(part := config.get(key), dict) else {}
                                for key in ("backbone", "neck"))
    wrong = []
    have_size = config.get("input_size")
    if "input_size" in given and list(args.input_size) != have_size:
        shown = "x".join(map(str, have_size)) if isinstance(have_size, list) else have_size
        wrong.append(f"--input-size {args.input_size[0]}x{args.input_size[1]} (it has {shown})")
    if "backbone" in given and args.backbone != have_backbone.get("type"):
        wrong.append(f"--backbone {args.backbone} (it has {have_backbone.get('type')})")
    for key in ("depth", "width", "arch"):
        value = getattr(args, key)
        if value is not None and value != have_backbone.get(key):
            shown = f"{value:g}" if isinstance(value, float) else value
            wrong.append(f"--{key} {shown} (it has {have_backbone.get(key)})")
    if "neck" in given and args.neck != have_neck.get("type"):
        wrong.append(f"--neck {args.neck} (it has {have_neck.get('type')})")
    if "neck_channels" in given and args.neck_channels != have_neck.get("channels"):
        wrong.append(f"--neck-channels {args.neck_channels} (it has {have_neck.get('channels')})")
    if wrong:
        raise UserError(f"--from {init}: the model keeps that checkpoint's architecture, so {', '.join(wrong)} "
                        "would be ignored; leave these options out, or train a new model without --from")


def format_fine_tune(path: Path) -> str:
    """What the last training run of a checkpoint did to the heads it did not train ('' if nothing to say)."""
    record = (read_metadata(path)["training"].get("history") or [{}])[-1]
    lines = []
    if "other_heads_map50" in record:
        scores = record["other_heads_map50"]
        lines.append(f"the backbone's last {record['unfrozen_stages']} stage(s) changed; the other heads, not "
                     "trained, on held-out synthetic scenes (mAP@0.5; attribute accuracy):")
        for head, before in scores["before"].items():
            # a score or why there is none ("not scored: ...") on either side (an attribute head can score
            # objects before and none after); the same reason on both sides is said once
            shown = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in (before, scores["after"].get(head))]
            change = shown[0] if shown[0] == shown[1] and not isinstance(before, float) else " -> ".join(shown)
            lines.append(f"  {head:<12} {change}")
    if "lora" in record:
        lines.append(f"adapter {record['lora']['adapter']!r} (rank {record['lora']['rank']}) for heads "
                     f"{record['heads']}; the other heads are unchanged. {path} holds only the adapter and those "
                     f"heads: it loads together with {record['init']}, which must stay unchanged where it is now.")
    return "".join(line + "\n" for line in lines)


def backbone_spec(args: argparse.Namespace) -> dict:
    """The model config's ``backbone`` from the train command's options (only the ones given, so each
    backbone keeps its own defaults, except ResNet's CLI defaults: depth 18, width 16)."""
    spec: dict = {"type": args.backbone}
    if args.backbone == "resnet":
        spec.update(depth=18, width=16)
    for key, value in (("depth", args.depth), ("width", args.width), ("arch", args.arch)):
        if value is None:
            continue
        if key == "width" and args.backbone != "mobilenet" and float(value).is_integer():
            value = int(value)  # channels; the multiplier of a MobileNet stays a float
        spec[key] = value
    return spec


@_write_errors
@_user_input_errors()
def train_demo(args: argparse.Namespace) -> dict:
    base_steps, head_steps, attribute_steps, reid_steps = args.steps or (
        DEMO_BASE_STEPS, DEMO_HEAD_STEPS, DEMO_ATTRIBUTE_STEPS, DEMO_REID_STEPS)
    out = prepare_output(args.out)  # a folder or an unwritable name fails now, not after three stages (an hour)
    base = out.with_name(out.stem + ".base.safetensors")
    heads = out.with_name(out.stem + ".heads.safetensors")
    attribute = out.with_name(out.stem + ".attribute.safetensors")
    progress = _progress(args)
    t0 = time.time()
    # Each stage with what its file's last history record says of it: a run killed in a later stage (an hour
    # in) reuses the stages it finished, unless ``args.fresh`` (--fresh) redoes all.
    stages = [
        (base, {"heads": ["people"], "steps": base_steps, "seed": 0, "data": "synthetic", "frozen_shared": False,
                "init": None},
         lambda: train_model(TrainConfig(out=base, heads={"people": ["person"]}, steps=base_steps, seed=0),
                             progress=progress)),
        (heads, {"heads": ["vehicles"], "steps": head_steps, "seed": 1, "data": "synthetic", "frozen_shared": True,
                 "init": str(base)},
         lambda: train_model(TrainConfig(out=heads, heads={"vehicles": ["car", "bicycle"]}, init=base,
                                         freeze_shared=True, steps=head_steps, seed=1), progress=progress)),
        (attribute, {"attribute": DEMO_ATTRIBUTE["name"], **{k: DEMO_ATTRIBUTE[k] for k in ("labels", "on", "of")},
                     "steps": attribute_steps, "seed": 2, "init": str(heads)},
         lambda: train_attribute_head(AttributeTrainConfig(init=heads, out=attribute, steps=attribute_steps, seed=2,
                                                           **DEMO_ATTRIBUTE), progress=progress)),
    ]
    redo, made_from = args.fresh, None
    for number, (path, settings, run) in enumerate(stages, 1):
        if not redo and stage_made_by(path, number, settings, made_from):
            log.info("stage %d of 4: reusing %s, made by the same settings (steps %d, seed %d)", number, path,
                     settings["steps"], settings["seed"])
        else:  # the stages after it start from its new weights
            redo = True
            log.info("stage %d of 4: training %s (steps %d, seed %d)", number, path, settings["steps"],
                     settings["seed"])
            run()
        made_from = path
    log.info("stage 4 of 4: training %s (steps %d, seed %d)", out, reid_steps, DEMO_REID["seed"])
    train_reid_head(ReIDTrainConfig(init=attribute, out=out, steps=reid_steps, **DEMO_REID), progress=progress)
    set_score_thresholds(out, DEMO_SCORE_THRESHOLDS)
    for stage in (base, heads, attribute):
        stage.unlink()
    model, _ = load_checkpoint(out)
    report = evaluate_model(model, EvalConfig(), progress=progress)
    report["checkpoint"] = str(out)
    report["train_minutes"] = round((time.time() - t0) / 60, 1)
    return report


def stage_made_by(path: Path, number: int, settings: dict, made_from: Path | None) -> bool:
    """Whether a train-demo stage's file is whole and was made by ``settings`` (its last history record, the
    ``number``-th) from ``made_from`` as that file is now: the frozen weights it started from, unchanged in it."""
    if not path.is_file():
        return False
    try:
        model, training = load_checkpoint(path)
        history = training.get("history")
        if not (isinstance(history, list) and len(history) == number and isinstance(history[-1], dict)
                and all(history[-1].get(k) == v for k, v in settings.items())):
            log.info("stage %d of 4: %s was made by other settings: training it again", number, path)
            return False
        weights = model.state_dict()
        if made_from is not None and not all(k in weights and torch.equal(v, weights[k])
                                             for k, v in read_tensors(made_from).items()):
            log.info("stage %d of 4: %s was made from another %s: training it again", number, path, made_from)
            return False
        return True
    except CheckpointError as e:
        log.warning("stage %d of 4: %s cannot be reused (%s): training it again", number, path, e)
        return False


def set_score_thresholds(path: Path, thresholds: dict[str, float]) -> None:
    """Rewrites a checkpoint with new per-head score thresholds (weights unchanged), noted in its history."""
    model, training = load_checkpoint(path)
    config = model.config.to_dict()
    for head, value in thresholds.items():
        config["heads"][head]["score_threshold"] = value
    tuned = HydraNet(HydraNetConfig.from_dict(config))
    tuned.load_state_dict(model.state_dict())
    training.setdefault("history", []).append({"score_thresholds": thresholds})
    save_checkpoint(tuned, path, training)


@_write_errors
@_user_input_errors()
def train_attribute(args: argparse.Namespace) -> str:
    """``hydravision train-attribute``: the path written and what the training did (the CLI prints "wrote " and
    this): it printed the path alone, where train-reid says its time and loss."""
    (name, labels), (on, of) = args.attribute, args.on
    try:
        cfg = AttributeTrainConfig(init=args.init, out=args.out, name=name, labels=labels, on=on, of=of,
                                   steps=args.steps, seed=args.seed)
    except ValueError as e:
        raise UserError(str(e)) from e
    path = train_attribute_head(cfg, progress=_progress(args))
    record = read_metadata(path)["training"]["history"][-1]
    return (f"{path}: attribute head {name!r} ({', '.join(labels)}) on {on!r} boxes of {', '.join(of)} "
            f"({record['seconds']:.0f} s, {record['objects_seen']} objects, loss {record['first_loss']:.2f} -> "
            f"{record['final_loss']:.2f})")


@_write_errors
@_user_input_errors()
def train_reid(args: argparse.Namespace) -> str:
    """``hydravision train-reid``: the head trained, saved, and checked on scenes training never saw."""
    try:
        cfg = ReIDTrainConfig(init=args.init, out=args.out, heads=args.heads, steps=args.steps, seed=args.seed)
    except ValueError as e:
        raise UserError(str(e)) from e
    path, _ = train_reid_head(cfg, progress=_progress(args))
    model, training = load_checkpoint(path)
    check = match_accuracy(model, REID_CHECK_SEEDS)
    record = training["history"][-1]
    checked = ("no object was seen twice among others of its class to compare" if check["accuracy"] is None else
               f"an object's nearest embedding 1 s later, among its class, is its own in {check['accuracy']:.1%} of "
               f"{check['scored']} cases (chance {check['chance']:.1%})")
    return (f"wrote {path}: re-ID head on {args.heads} ({record['seconds']:.0f} s, loss {record['first_loss']:.2f} -> "
            f"{record['final_loss']:.2f}); on unseen streets {checked}")


def _check_out(out: str | Path, source: str | Path, source_name: str, written: str, suffix: str) -> None:
    """Before any work: --out may be neither the file it is made from, nor a folder, nor named as the other kind of
    model file (an export written over another checkpoint replaced it, exit 0)."""
    if Path(out).resolve() == Path(source).resolve():
        raise UserError(f"--out {out} is {source_name} itself: {written} would replace it; name another file")
    if Path(out).is_dir():
        raise UserError(f"--out {out} is a folder: name the {suffix} file to write")
    other = ".safetensors" if suffix == ".onnx" else ".onnx"
    if Path(out).suffix.lower() == other:
        raise UserError(f"--out {out} is named as a {other} file, but {written} is written there; name a {suffix} file")


def _cannot_write(where: str, e: OSError) -> UserError:
    """The file named (or its folder) cannot be written: the user's to fix."""
    return UserError(f"{where}: cannot write it ({e.strerror or e}{f': {e.filename}' if e.filename else ''})")


@_user_input_errors()
def export(args: argparse.Namespace) -> str:
    from models.export import (cache_key, cache_path, cached_export, check_exportable, damaged,  # seconds of imports
                               export_onnx, fingerprint, mark_used, output_names)

    path = args.checkpoint or DEMO_CHECKPOINT
    up_to_date = "is up to date (exported before for this checkpoint, torch version and exporter)"
    whole = False  # the cached file was there and whole before the model was loaded
    if not args.out and Path(path).is_file():
        key = cache_key(path)
        cached = cache_path(path, key=key)
        whole = cached.is_file() and not damaged(cached)
        # no model to load only where its fingerprint is this checkpoint's key: one without (every export made before
        # fingerprints) can be another model's, judged against the loaded model (cached_export) as a start does
        if whole and fingerprint(cached) == key:
            mark_used(cached)
            return f"{cached} {up_to_date}"
    if args.out:
        _check_out(args.out, path, "the checkpoint", "the ONNX file", ".onnx")
    t0 = time.time()
    # on stderr, as the cache's own "exporting ... once" line: a large model's export is silent for tens of seconds
    log.info("loading %s", path)
    model, _ = load_checkpoint(path)
    check_exportable(model)  # a model the export refuses is refused before a line says it is being exported
    if args.out:
        log.info("exporting to ONNX (tracing the model, then writing %s; a large model takes a minute)", args.out)
    made: list[Path] = []
    try:
        out = export_onnx(model, args.out) if args.out else cached_export(model, path, made=made)
    except OSError as e:
        raise _cannot_write(f"--out {args.out}" if args.out else f"the export cache {cache_path(path).parent}",
                            e) from e
    if not args.out and not made:  # this checkpoint's without a fingerprint, or made meanwhile by another export
        return f"{out} {up_to_date}" if whole else \
            f"{out} is up to date (exported meanwhile by another process for this checkpoint)"
    return (f"wrote {out} in {time.time() - t0:.1f} s: input 'images' uint8 (batch, 3, "
            f"{model.config.input_size[0]}, {model.config.input_size[1]}); outputs {', '.join(output_names(model))}")


@_write_errors
@_user_input_errors()
def import_detector(args: argparse.Namespace) -> str:
    t0 = time.time()
    size = args.input_size or DEFAULT_INPUT_SIZE
    _check_out(args.out, args.weights, "the weights file", "the checkpoint", ".safetensors")
    model = import_torchvision_fcos(args.weights, size)
    try:
        save_checkpoint(model, args.out, {"history": [{"imported": "torchvision fcos_resnet50_fpn (COCO)",
                                                       "from": str(args.weights)}]})
    except OSError as e:
        raise _cannot_write(f"--out {args.out}", e) from e
    classes = model.head_classes("coco")
    return (f"wrote {args.out}: ResNet-50 + FPN (P3-P7) + head 'coco' with {len(classes)} classes "
            f"({', '.join(classes[:4])}, ...), input {size[0]}x{size[1]}, in {time.time() - t0:.1f} s. "
            f"Use it with model.checkpoint: {args.out}; add heads on its frozen backbone with "
            f"`hydravision train --from {args.out} --freeze-shared --head NAME=CLASSES`.")


@_user_input_errors()
def evaluate(args: argparse.Namespace) -> dict:
    """The checkpoint's scores; with --backend, through the serving path (ModelRunner) on that backend and
    --precision, the tolerance check of a faster backend against torch in fp32 (the default)."""
    path = args.checkpoint or DEMO_CHECKPOINT
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = EvalConfig(scenes=args.scenes, frames_per_scene=args.frames)
    if not args.backend and args.precision not in ("auto", "fp32"):  # the torch path scores in fp32 only
        raise UserError(f"--precision {args.precision} is for the service's model path: it needs --backend "
                        "(e.g. --backend auto); without it the checkpoint is scored in torch, fp32")
    if args.backend:
        from workers.model_runner import ModelRunner  # the serving path, and its backends' imports

        # 'auto' as the service's model.device: ModelRunner makes it the CPU for OpenVINO and int8, CUDA where there
        # is one otherwise; "cuda" refused those two on every GPU machine
        device = "auto"
        if why := backend_problem(args.backend, args.precision, device):
            raise UserError(f"--backend {args.backend} --precision {args.precision}: {why}")

        # its batches are the eval's (a TensorRT engine covers batches up to max_batch, no more)
        # its threads as the service's: the runtimes' own default took every core a container's quota does not allow
        runner = ModelRunner(path, device, args.precision, threads=usable_cores(), max_batch=max(1, cfg.batch_size),
                             backend=args.backend)
        report = runner.evaluate(cfg, progress=_progress(args))
        how = {"backend": runner.info()["backend"], "precision": runner.info()["autocast"]}
    else:
        model, _ = load_checkpoint(path, device=device)
        report = evaluate_model(model, cfg, progress=_progress(args))
        how = {"backend": "torch", "precision": "fp32"}
    report.update(checkpoint=str(path), **how)
    return report


def format_report(report: dict) -> str:
    how = f"{report.get('backend', 'torch')}, {report.get('precision', 'fp32')}"
    lines = [f"{report['checkpoint']} ({how}): {report['frames']} held-out frames from {report['scenes']} scenes"]
    lines.append(f"{'head':<12} {'mAP@0.5':>8} {'mAP@.5:.95':>10}  AP@0.5 per class")
    for name, r in report["heads"].items():
        per = ", ".join(f"{c} {v:.3f}" for c, v in r["ap50_per_class"].items())
        if missing := r.get("classes_without_targets"):  # not in the head's mAP: nothing to find in the frames
            per += f"; no targets of {', '.join(missing)}"
        lines.append(f"{name:<12} {r['map50']:>8.3f} {r['map50_95']:>10.3f}  {per}")
    for name, r in report.get("attributes", {}).items():
        if r["accuracy"] is None:  # not "accuracy 0.000 on 0": nothing was scored, not everything wrong
            lines.append(f"attribute {name}: not scored: no detected objects to score "
                         f"(of {r['objects']} in the frames)")
        else:
            lines.append(f"attribute {name}: accuracy {r['accuracy']:.3f} on {r['scored']} detected objects "
                         f"(of {r['objects']} in the frames)")
    for name, why in report.get("skipped", {}).items():
        lines.append(f"{name:<12} not scored: {why}")
    return "\n".join(lines)
