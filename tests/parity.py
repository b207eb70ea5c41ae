"""One parity harness for every dynamic-memory backend: case builders and comparisons.

A case is a dict of the op's keyword arguments on fresh random inputs; ``run`` evaluates an op on
it through a backend and returns its outputs and the gradients of every float input for a fixed
random output gradient. Fused backends are compared against the eager reference evaluated in
float64 (fp32 backends) or in float32 from the same 16-bit inputs (16-bit backends). Benchmarks
import the same builders, so what is timed is what is tested.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import Tensor

from dmgan import ops

# Normwise tolerances: |a - b| <= tol * (|b| + max|b| + 1e-3) elementwise. The small absolute
# floor covers gradients that are zero in exact arithmetic (T = 1: the softmax gradient vanishes),
# where both sides hold rounding noise of the inputs' dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class ReadShape:
    batch: int
    channels: int
    height: int
    width: int
    lengths: tuple[int, ...]  # one per sample; 0 = fully padded caption

    def __str__(self) -> str:
        return (
            f"B{self.batch}-C{self.channels}-{self.height}x{self.width}-T{'/'.join(map(str, self.lengths))}"
        )


@dataclass(frozen=True)
class WriteShape:
    batch: int
    word_dim: int
    channels: int
    num_words: int

    def __str__(self) -> str:
        return f"B{self.batch}-Nw{self.word_dim}-Nr{self.channels}-T{self.num_words}"


def read_case(shape: ReadShape, dtype: torch.dtype = torch.float32, device: str = "cpu") -> dict:
    c, t = shape.channels, max(max(shape.lengths), 1)
    g = torch.Generator().manual_seed(zlib.crc32(str(shape).encode()))

    def rand(*size: int, scale: float = 1.0, positive: bool = False) -> Tensor:
        x = torch.rand(size, generator=g) if positive else torch.randn(size, generator=g)
        return (x * scale).to(device=device, dtype=dtype)

    return dict(
        # keys / values are ReLU outputs in the model: non-negative. Scales keep scores O(1).
        img=rand(shape.batch, c, shape.height, shape.width),
        keys=rand(shape.batch, c, t, scale=2.0 / c**0.5, positive=True),
        values=rand(shape.batch, c, t, positive=True),
        pad_mask=(torch.arange(t)[None, :] >= torch.tensor(shape.lengths)[:, None]).to(device),
        gate_w=rand(1, 2 * c, 1, 1, scale=0.2),
        gate_b=rand(1, scale=0.5),
    )


def write_case(shape: WriteShape, dtype: torch.dtype = torch.float32, device: str = "cpu") -> dict:
    nw, nr, nm = shape.word_dim, shape.channels, 2 * shape.channels
    g = torch.Generator().manual_seed(zlib.crc32(str(shape).encode()))
    sizes = dict(
        words=(shape.batch, nw, shape.num_words), rbar=(shape.batch, nr), A=(1, nw), B=(1, nr),
        M_w=(nm, nw, 1), M_w_b=(nm,), M_r=(nm, nr, 1), M_r_b=(nm,),
        key_w=(nr, nm, 1), key_b=(nr,), value_w=(nr, nm, 1), value_b=(nr,),
    )  # fmt: skip
    fan_in = dict(A=nw, B=nr, M_w=nw, M_r=nr, key_w=nm, value_w=nm)
    return {
        name: (torch.randn(size, generator=g) / fan_in.get(name, 1) ** 0.5).to(device=device, dtype=dtype)
        for name, size in sizes.items()
    }


def run(op_name: str, case: dict, backend: str, grad_seed: int = 1, **options) -> dict[str, Tensor]:
    """Outputs ("out0", "out1", ...) and input gradients ("grad_<name>") of ``ops.<op_name>``."""
    inputs = {
        k: (v.detach().clone().requires_grad_() if v.is_floating_point() else v) for k, v in case.items()
    }
    outputs = getattr(ops, op_name)(**inputs, backend=backend, **options)
    outputs = [o for o in outputs if o is not None]
    g = torch.Generator().manual_seed(grad_seed)
    # Only the differentiable outputs get a gradient (the attention map is for looking at).
    differentiable = outputs if op_name == "memory_write" else outputs[:1]
    grads_out = [torch.randn(o.shape, generator=g).to(o) for o in differentiable]
    float_inputs = {k: v for k, v in inputs.items() if v.is_floating_point()}
    grads = torch.autograd.grad(differentiable, list(float_inputs.values()), grads_out)
    result = {f"out{i}": o.detach() for i, o in enumerate(outputs)}
    result.update({f"grad_{k}": g for k, g in zip(float_inputs, grads)})
    return result


def reference_for(op_name: str, case: dict, dtype: torch.dtype, **options) -> dict[str, Tensor]:
    """The eager reference on the same inputs, in float64 (for fp32) or float32 (for 16-bit)."""
    wide = torch.float64 if dtype == torch.float32 else torch.float32
    upcast = {k: (v.to(wide) if v.is_floating_point() else v) for k, v in case.items()}
    return run(op_name, upcast, "eager", **options)


def assert_matches(actual: dict[str, Tensor], expected: dict[str, Tensor], dtype: torch.dtype) -> None:
    assert actual.keys() == expected.keys()
    tol = TOLERANCE[dtype]
    for name, want in expected.items():
        got = actual[name]
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten elements?)"
        got, want = got.double().cpu(), want.double().cpu()
        bound = tol * (want.abs() + want.abs().max() + 1e-3)
        excess = ((got - want).abs() - bound).max()
        assert excess <= 0, (
            f"{name}: max error {(got - want).abs().max():.3g} exceeds tolerance {tol} (normwise)"
        )
