"""The adaptive batch size steps down when a batch runs out of memory; on a GPU, cuBLAS and cuDNN say so in their
own words (a RuntimeError 'CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)'), which was
not taken for it: every batch of that size failed again, all its cameras' frames with it."""
from __future__ import annotations

import pytest

from workers.batch_size import out_of_memory


@pytest.mark.parametrize("text", [
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
    "CUDA out of memory. Tried to allocate 20.00 MiB",
])
def test_gpu_libraries_running_out_of_memory_are_out_of_memory(text):
    assert out_of_memory(RuntimeError(text))


@pytest.mark.parametrize("text", ["CUDA error: CUBLAS_STATUS_EXECUTION_FAILED", "CUDNN_STATUS_BAD_PARAM",
                                  "device-side assert triggered"])
def test_other_gpu_errors_are_not(text):
    assert not out_of_memory(RuntimeError(text))
