"""Memory writing and reading: every implementation x forward / forward+backward x shape x dtype.

    .venv/bin/python -m pytest benchmarks --benchmark-enable --benchmark-group-by=param:read_shape,param:dtype,param:direction

Groups hold one shape, dtype and direction, so each backend's median and its ratio to the others
sit in one table. On a GPU each call ends with torch.cuda.synchronize(). Each case also records
the peak memory of one call (CUDA max allocated, or peak RSS on a CPU) in ``extra_info``.
"""

from __future__ import annotations

import functools

import pytest
import torch

from benchmarks import memory_impls
from benchmarks.peak_memory import peak_bytes
from dmgan import ops
from dmgan.ops.parity import read_case, write_case

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.bfloat16]


def _dmgan_backend(name):
    return functools.partial(lambda backend, **kw: ops.memory_read(**kw, backend=backend)[0], name)


@functools.cache
def _compiled_literal():
    return torch.compile(memory_impls.literal)


IMPLEMENTATIONS = {
    "eager-literal": lambda: memory_impls.literal,
    "eager-sdpa": lambda: memory_impls.sdpa,
    "eager-reference": lambda: _dmgan_backend("eager"),
    "compile-literal": _compiled_literal,
    "cpp": lambda: _dmgan_backend("cpp"),
    "triton": lambda: _dmgan_backend("triton"),
}


def _slow_if_compiled(name: str):
    """torch.compile's first call takes seconds even at the smoke sizes: such cases are slow."""
    return pytest.param(name, marks=pytest.mark.slow) if name.startswith("compile") else name


def _call(fn, case: dict, grads_for=None):
    """One timed call of ``fn(**case)``; with ``grads_for(out)``, also its backward (input
    gradients cleared after). Ends with a synchronisation on a GPU."""

    def step():
        out = fn(**case)
        if grads_for is not None:
            torch.autograd.backward(out, grads_for(out))
            for v in case.values():
                v.grad = None
        if ON_GPU:
            torch.cuda.synchronize()
        return out

    return step


def _available(name: str) -> bool:
    if name in ("cpp", "triton"):
        return name in ops.available_backends(DEVICE) and (name != "triton" or ON_GPU)
    return True


@pytest.mark.parametrize("direction", ["forward", "forward+backward"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("impl", [_slow_if_compiled(name) for name in IMPLEMENTATIONS])
def test_memory_read(benchmark, impl, dtype, direction, read_shape):
    if not _available(impl):
        pytest.skip(f"{impl} does not run on {DEVICE} here")
    case = read_case(read_shape, dtype, DEVICE)
    fn = IMPLEMENTATIONS[impl]()
    grad = None
    if direction == "forward+backward":
        case = {k: (v.requires_grad_() if v.is_floating_point() else v) for k, v in case.items()}
        grad = torch.randn(case["img"].shape, dtype=dtype, device=DEVICE)
    step = _call(fn, case, None if grad is None else lambda out: grad)
    out = step()  # warm-up: compiles, builds, autotunes
    assert out.shape == case["img"].shape and torch.isfinite(out).all()
    _record(benchmark, step, "memory_read", impl, read_shape, dtype, direction)


def _record(benchmark, step, kind, impl, shape, dtype, direction):
    benchmark.extra_info.update(
        kind=kind,
        impl=impl,
        shape=str(shape),
        dtype=str(dtype).removeprefix("torch."),
        direction=direction,
        device=torch.cuda.get_device_name() if ON_GPU else "cpu",
        torch=torch.__version__,
        peak_memory_bytes=peak_bytes(step, DEVICE),
    )
    benchmark.pedantic(step, rounds=10 if ON_GPU else 5, iterations=5 if ON_GPU else 1, warmup_rounds=2)


def _dmgan_write(name):
    return functools.partial(lambda backend, **kw: ops.memory_write(**kw, backend=backend), name)


@functools.cache
def _compiled_write():
    from dmgan.ops import reference

    return torch.compile(reference.memory_write)


WRITE_IMPLEMENTATIONS = {
    "eager-reference": lambda: _dmgan_write("eager"),  # the reference code's form, op for op
    "compile-reference": _compiled_write,
    "cpp": lambda: _dmgan_write("cpp"),
    "triton": lambda: _dmgan_write("triton"),
}


@pytest.mark.parametrize("direction", ["forward", "forward+backward"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("impl", [_slow_if_compiled(name) for name in WRITE_IMPLEMENTATIONS])
def test_memory_write(benchmark, impl, dtype, direction, write_shape):
    if not _available(impl):
        pytest.skip(f"{impl} does not run on {DEVICE} here")
    case = write_case(write_shape, dtype, DEVICE)
    fn = WRITE_IMPLEMENTATIONS[impl]()
    backward = direction == "forward+backward"
    if backward:
        case = {k: v.requires_grad_() for k, v in case.items()}
    step = _call(fn, case, (lambda out: tuple(map(torch.ones_like, out))) if backward else None)
    keys = step()[0]
    assert (
        keys.shape == (write_shape.batch, write_shape.channels, write_shape.num_words)
        and torch.isfinite(keys).all()
    )
    _record(benchmark, step, "memory_write", impl, write_shape, dtype, direction)
