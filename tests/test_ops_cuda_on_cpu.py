"""The CUDA kernels of csrc/memory_cuda.cu, run on the CPU through HIP-CPU, against the eager
reference: the parity cases of every backend (dmgan/ops/parity.py) in fp32, fp16 and bf16,
forward and backward, with poisoned outputs. Built from the source file itself on first use
(tests/hip_cpu/build.py; about a minute on two cores); skipped, with the reason, where HIP-CPU or
TBB is missing. HIP-CPU checks results, not races: racecheck on a GPU is the race detector."""

from __future__ import annotations

import pytest
import torch

from dmgan import ops
from dmgan.ops.parity import (
    CHANNELS_LAST_SHAPES,
    READ_SHAPES,
    WRITE_SHAPES,
    ReadShape,
    check_memory_read,
    check_memory_write,
    read_case,
    run,
)
from tests.hip_cpu import build

pytestmark = [pytest.mark.slow, pytest.mark.skipif(build.missing() is not None, reason=str(build.missing()))]
BACKEND = "cuda-on-cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
dtype_ids = [str(d).removeprefix("torch.") for d in DTYPES]


@pytest.fixture(scope="module", autouse=True)
def _emulated_backend():
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(ops.BACKEND_MODULES, BACKEND, "tests.hip_cpu.backend")
        assert BACKEND in ops.available_backends("cpu"), ops._load_errors.get(BACKEND)
        yield


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("shape", READ_SHAPES, ids=str)
@pytest.mark.parametrize("legacy_mask", [False, True], ids=["mask", "legacy"])
def test_memory_read_matches_reference(dtype, shape, legacy_mask):
    check_memory_read(BACKEND, dtype, shape, legacy_mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("shape", CHANNELS_LAST_SHAPES, ids=str)
def test_memory_read_of_channels_last_images_matches_reference(dtype, shape):
    check_memory_read(BACKEND, dtype, shape, False, channels_last=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("shape", WRITE_SHAPES, ids=str)
def test_memory_write_matches_reference(dtype, shape):
    check_memory_write(BACKEND, dtype, shape)


def test_gradients_are_bitwise_reproducible():
    case = read_case(ReadShape(3, 32, 17, 9, (21, 3, 5)), torch.float32)
    first, second = run("memory_read", case, BACKEND), run("memory_read", case, BACKEND)
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_float64_is_refused_with_a_clear_error():
    case = read_case(ReadShape(1, 32, 3, 3, (2,)), torch.float64)
    namespace = getattr(torch.ops, build.NAMESPACE)
    with pytest.raises(RuntimeError, match="float64 is not supported on CUDA"):
        namespace.memory_read(*case.values(), False, False)
