"""Edge cases of batching and the model runner found by an audit: each test failed before its fix."""

from __future__ import annotations

import asyncio

import pytest

from workers.batch_size import BatchSizer
from workers.inference import Batcher


def test_a_step_up_won_against_a_passing_load_burst_is_not_kept():
    """Batches of 8 cost 1.0 ms per frame and of 16 1.2 ms, but another process kept the machine busy (8 at
    2.0 ms) until the first probe began. The probe won against those slow timings and 16 was kept for good:
    the halving rule compared 16 with the same burst's timings of 8 ever after."""
    sizer = BatchSizer(ceiling=16)
    probed = False
    for _ in range(400):
        size = sizer.allowed()
        probed = probed or sizer.probing is not None
        cost = {8: 1.0 if probed else 2.0, 16: 1.2}[size]
        sizer.record(size, size * cost / 1000, full=True)
    assert probed and sizer.limit == 8, (sizer.changes, sizer.stats())


def test_a_probed_batch_size_that_fails_is_not_tried_again_and_again():
    """On a GPU a probe of a larger batch can run out of memory. The failed batch's callers got the error, but the
    BatchSizer never heard of it: the probe went on, and every batch of the larger size failed, for good."""
    sizer = BatchSizer(ceiling=32, probe_after=2)
    calls: list[int] = []

    def handler(items: list) -> list:
        calls.append(len(items))
        if len(items) > 8:
            raise RuntimeError("CUDA out of memory (a test's)")
        return items

    async def main() -> list[bool]:
        b: Batcher = Batcher(handler, max_batch=32, max_wait_ms=1, sizer=sizer)

        async def camera(cid: str) -> list[bool]:
            ok = []
            for i in range(20):
                try:
                    ok.append(await b.submit(i, cid) == i)
                except RuntimeError:
                    ok.append(False)
            return ok

        results = await asyncio.gather(*(camera(f"cam{c}") for c in range(24)))
        b.close()
        return [r for rs in results for r in rs]

    ok = asyncio.run(main())
    assert sizer.probing is None and sizer.allowed() == 8, (calls, sizer.stats())
    assert ok.count(False) <= 16 and sum(1 for n in calls if n > 8) == 1, calls


def test_info_names_torch_precisions_as_the_config_and_the_exported_runtimes_do(tiny_checkpoint):
    """`hydravision eval --backend torch --precision bf16` reported precision "torch.bfloat16", and the start line
    said "(torch, torch.float16)", where OpenVINO says "bf16" and the config's model.precision is "bf16"."""
    from workers.model_runner import ModelRunner

    assert [ModelRunner(tiny_checkpoint, "cpu", precision, backend="torch").info()["autocast"]
            for precision in ("bf16", "fp16", "fp32")] == ["bf16", "fp16", "fp32"]


def test_a_checkpoint_copy_that_fails_to_write_leaves_no_partial_file(tmp_path, monkeypatch):
    """A replica given the checkpoint's bytes writes them to the node's temp dir. On a full disk the write failed
    and left its ``.part`` file behind, one more at each of Ray's restarts of the replica."""
    import errno
    import os
    import tempfile

    from workers.inference import local_copy

    class FullDisk:
        def __init__(self, fd: int) -> None:
            self.fd = fd

        def __enter__(self) -> "FullDisk":
            return self

        def __exit__(self, *exc) -> None:
            os.close(self.fd)

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullDisk(fd))
    try:
        local_copy(b"weights")
    except OSError as e:
        assert e.errno == errno.ENOSPC
    else:
        raise AssertionError("the write was to fail")
    monkeypatch.setattr(os, "fdopen", fdopen)
    assert [p for p in tmp_path.rglob("*") if not p.is_dir()] == []  # in the user's folder of the temp dir
    assert local_copy(b"weights").read_bytes() == b"weights"  # a later try on a freed disk writes it whole


def test_settings_a_runtime_would_ignore_are_refused_naming_the_field(capsys):
    """ONNX Runtime runs fp32 only and compile is torch.compile's: asked of another runtime, both were ignored."""
    from pipeline.cli import main as cli_main
    from pipeline.config import ConfigError, parse_config

    cameras = [{"id": "a", "url": "synthetic://street"}]
    with pytest.raises(ConfigError, match=r"model: backend onnxruntime runs precision fp32, not bf16"):
        parse_config({"model": {"backend": "onnxruntime", "precision": "bf16"}, "cameras": cameras})
    for model in ({"backend": "openvino", "compile": True}, {"backend": "onnxruntime", "compile": True},
                  {"precision": "int8", "compile": True}):
        with pytest.raises(ConfigError, match=r"model: compile is torch.compile, for backend torch"):
            parse_config({"model": model, "cameras": cameras})
    parse_config({"model": {"backend": "torch", "precision": "bf16", "compile": True}, "cameras": cameras})
    parse_config({"model": {"backend": "onnxruntime", "precision": "fp32"}, "cameras": cameras})
    assert cli_main(["eval", "--backend", "onnxruntime", "--precision", "fp16", "--no-progress"]) == 2
    assert "backend onnxruntime runs precision fp32, not fp16" in capsys.readouterr().err
