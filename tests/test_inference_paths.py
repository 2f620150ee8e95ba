"""The GPU-oriented inference paths, exercised as far as a CPU can: BN folding, autocast, staging copies, compile."""

import collections
import copy

import numpy as np
import pytest
import torch

from models.fuse import fuse_conv_bn
from models.hydranet import HydraNet, HydraNetConfig
from workers.model_runner import ModelRunner, pick_autocast, pick_device


def model_with_real_bn_stats(depth: int = 18, backbone: dict | None = None) -> HydraNet:
    cfg = HydraNetConfig(input_size=(64, 96), backbone=backbone or {"type": "resnet", "depth": depth, "width": 8},
                         neck={"type": "fpn", "channels": 16}, heads={"people": {"classes": ["person"]}})
    torch.manual_seed(0)
    m = HydraNet(cfg)
    for mod in m.modules():  # untrained BN is the identity; make the folding test meaningful
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.5, 0.5)
    return m.eval()


@pytest.mark.parametrize("depth, pairs", [(10, 12), (18, 20), (50, 53)])
def test_bn_folding_gives_the_same_features(depth, pairs):
    model = model_with_real_bn_stats(depth)
    fused = copy.deepcopy(model)
    assert fuse_conv_bn(fused.backbone) == pairs
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.backbone.modules())
    x = torch.randn(2, 3, 64, 96)
    with torch.inference_mode():
        for a, b in zip(model.features(x), fused.features(x)):
            # float32 rounding through 53 folded convs grows with the values (ResNet-50's maps reach ~175): the
            # two differ by ~1e-6 of a map's largest value, and how the kernels round depends on the CPU (measured
            # at depth 50: 1.5e-4 with AVX-512, 2.0e-4 with AVX2, 2.4e-4 with AVX-only oneDNN and ATen kernels,
            # which failed a fixed atol of 1e-4). 1e-5 of the largest value stays 8x above all of those; a fold
            # that drops BN's eps (1e-5 against variances of 0.5-2) is still over it at depths 18 and 50, and one
            # 1e-4 off its scale at every depth.
            atol = max(1e-4, 1e-5 * float(a.abs().max()))
            torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)


def test_bn_folding_covers_mobilenets_conv_bn_activation_blocks():
    model = model_with_real_bn_stats(backbone={"type": "mobilenet", "arch": "small", "width": 0.5})
    bns = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())
    fused = copy.deepcopy(model)
    assert fuse_conv_bn(fused.backbone) == bns == 34  # every BatchNorm of a MobileNetV3-small
    x = torch.randn(2, 3, 64, 96)
    with torch.inference_mode():
        for a, b in zip(model.features(x), fused.features(x)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_bn_folding_refuses_training_mode():
    with pytest.raises(ValueError, match="eval mode"):
        fuse_conv_bn(model_with_real_bn_stats().train().backbone)


@pytest.mark.parametrize(
    "precision, device, expected",
    [("auto", "cpu", None), ("fp32", "cuda", None), ("auto", "cuda", torch.float16), ("fp16", "cpu", torch.float16),
     ("bf16", "cpu", torch.bfloat16), ("bf16", "cuda", torch.bfloat16)],
)
def test_autocast_choice(precision, device, expected):
    assert pick_autocast(precision, torch.device(device)) == expected


def test_device_choice_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert pick_device("auto").type == "cpu"
    # a device asked for that is not there is named (torch failed deep inside the model's load)
    with pytest.raises(ValueError, match=r"model.device cuda:1: no such device on this node \(.*\); set model.device"):
        pick_device("cuda:1")


@pytest.fixture
def checkpoint(tmp_path):
    from models.checkpoint import save_checkpoint

    return save_checkpoint(model_with_real_bn_stats(), tmp_path / "m.safetensors")


def test_runner_bf16_autocast_on_cpu_close_to_fp32(checkpoint):
    """The mixed-precision path (fp16 on GPU) runs the same code; on CPU bf16 exercises it."""
    images = [np.random.default_rng(i).integers(0, 255, (3, 64, 96), dtype=np.uint8) for i in range(3)]
    full = ModelRunner(checkpoint, device="cpu", precision="fp32", score_threshold=0.01, backend="torch")
    half = ModelRunner(checkpoint, device="cpu", precision="bf16", score_threshold=0.01, backend="torch")
    x = torch.from_numpy(np.stack(images)).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        a = full.model(full.model.normalize(x))["people"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            b = half.model(half.model.normalize(x))["people"]
    for k in a:
        assert b[k].dtype == torch.bfloat16 or k == "box_ltrb"
        torch.testing.assert_close(b[k].float(), a[k], atol=0.15, rtol=0.1)
    out = half.run(images, [None] * 3)
    assert all(np.isfinite(r["people"]["boxes"]).all() and r["people"]["boxes"].dtype == np.float32 for r in out)


def test_autocast_runs_the_attribute_and_reid_heads_of_the_demo_model():
    """Under autocast the pyramid is half precision while grid_sample (the attribute head's box features) runs in
    fp32; the two met in one tensor and the call failed on the first detection (fp16 on a GPU, bf16 here)."""
    from pipeline.model_commands import DEMO_CHECKPOINT
    from tests.test_onnx_backend import frames

    images = frames((256, 448))
    full = ModelRunner(DEMO_CHECKPOINT, device="cpu", precision="fp32", backend="torch").run(images, [None] * 3)
    half = ModelRunner(DEMO_CHECKPOINT, device="cpu", precision="bf16", backend="torch").run(images, [None] * 3)
    assert sum(len(r["vehicles"]["boxes"]) for r in full) > 0
    for a, b in zip(full, half):
        assert abs(len(a["vehicles"]["boxes"]) - len(b["vehicles"]["boxes"])) <= 1
        assert "attr:kind" in b["vehicles"] and "embedding" in b["vehicles"]


def test_staging_buffer_copy_gives_the_same_results(checkpoint):
    """On CUDA frames go through a pinned staging buffer; the same copy code runs here unpinned."""
    images = [np.random.default_rng(i).integers(0, 255, (3, 64, 96), dtype=np.uint8) for i in range(4)]
    direct = ModelRunner(checkpoint, device="cpu", score_threshold=0.01, backend="torch")
    staged = ModelRunner(checkpoint, device="cpu", score_threshold=0.01, backend="torch")
    staged._staging = torch.empty((8, 3, 64, 96), dtype=torch.uint8)
    a, b = direct.run(images, [None] * 4), staged.run(images, [None] * 4)
    for ra, rb in zip(a, b):
        np.testing.assert_array_equal(ra["people"]["boxes"], rb["people"]["boxes"])


class SizesGrowingWhileRead(collections.Counter):
    """Batch sizes to which the model thread adds a new one while stats() iterates over them."""

    def items(self):
        for size, batches in super().items():
            self[size + 1] += 1
            yield size, batches


def test_stats_read_the_batch_sizes_while_the_model_thread_adds_one(checkpoint):
    """stats() runs on the event loop, ModelRunner.run on the model's thread: a batch size first seen between two
    steps of stats()' loop over the live Counter raised "dictionary changed size during iteration"."""
    from workers.inference import InferenceService

    service = InferenceService(checkpoint, device="cpu", backend="torch")
    service.runner.stats["batch_sizes"] = SizesGrowingWhileRead({4: 2})
    assert service.stats()["batch_sizes"] == {4: 2}
    service.batcher.close()


@pytest.mark.slow
def test_compiled_model_matches_eager(checkpoint):
    images = [np.random.default_rng(i).integers(0, 255, (3, 64, 96), dtype=np.uint8) for i in range(2)]
    eager = ModelRunner(checkpoint, device="cpu", score_threshold=0.01, backend="torch")
    compiled = ModelRunner(checkpoint, device="cpu", score_threshold=0.01, compile=True, backend="torch")
    for ra, rb in zip(eager.run(images, [None] * 2), compiled.run(images, [None] * 2)):
        np.testing.assert_allclose(ra["people"]["scores"], rb["people"]["scores"], atol=1e-3)


def test_heads_are_timed_in_torch_and_not_claimed_in_the_exported_runtimes(checkpoint):
    """hydravision_head_seconds comes from torch's forward hooks; ONNX Runtime and OpenVINO run the heads in one
    graph, so they leave the histogram empty rather than filling it with a guess."""
    images = [np.random.default_rng(i).integers(0, 255, (3, 64, 96), dtype=np.uint8) for i in range(2)]
    for backend, timed in (("torch", 1), ("onnxruntime", 0), ("openvino", 0)):
        runner = ModelRunner(checkpoint, device="cpu", backend=backend)
        runner.run(images, [None, ["people"]])
        assert sum(runner.histograms()["head_seconds"]["people"]["counts"]) == timed, backend


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "openvino"])
def test_a_one_thread_model_counts_its_own_cpu_not_its_neighbours(checkpoint, backend):
    """In a camera process the model shares the process with decoder threads. Its ``cpu_seconds`` (the model's
    CPU per frame in benchmarks/bench_pipeline.py) read the process's clock and so counted what the decoders
    burned during each call too; the benchmark then put more CPU in the model than the processes spent outside."""
    import hashlib
    import threading
    import time

    runner = ModelRunner(checkpoint, device="cpu", backend=backend, threads=1)
    images = [np.random.default_rng(i).integers(0, 255, (3, 64, 96), dtype=np.uint8) for i in range(8)]
    runner.run(images, [None] * 8)
    runner.stats["cpu_seconds"] = 0.0
    stop, burned = threading.Event(), []

    def neighbour():  # hashing a large buffer releases the GIL: it runs beside the model's calls, as a decoder does
        c0, data = time.thread_time(), b"x" * (1 << 22)
        while not stop.is_set():
            hashlib.sha256(data).digest()
        burned.append(time.thread_time() - c0)

    thread = threading.Thread(target=neighbour)
    p0 = time.process_time()
    thread.start()
    while time.process_time() - p0 < 1.5:
        runner.run(images, [None] * 8)
    stop.set()
    thread.join()
    total, own = time.process_time() - p0, runner.stats["cpu_seconds"]
    assert burned[0] > 0.2, "the neighbour thread never ran"
    assert own <= total - burned[0] + 0.05, (own, total, burned)
    # and the model's own CPU is counted: not all the rest, as a runtime's helper threads (OpenVINO's, spinning
    # longer on a machine busy with other test workers) take some of it (0.49 of it once, beside two workers)
    assert own >= 0.3 * (total - burned[0]), (own, total, burned)
