"""One parity harness for every dynamic-memory backend: case builders, the cases, comparisons.

A case is a dict of the op's keyword arguments on fresh random inputs; ``run`` evaluates an op on
it through a backend and returns its outputs and the gradients of every float input for a fixed
random output gradient. Fused backends are compared against the eager reference evaluated in
float64 (fp32 backends) or in float32 from the same 16-bit inputs (16-bit backends), with every
buffer the kernels allocate poisoned with NaN (:func:`poisoned_outputs`), so an element a kernel
forgets to write fails the comparison. The tests of every backend (``tests/test_ops_*.py``) run
:data:`READ_SHAPES` (contiguous images, and :data:`CHANNELS_LAST_SHAPES` channels-last) and
:data:`WRITE_SHAPES` through :func:`check_memory_read` and :func:`check_memory_write`; the
benchmarks build their inputs with the same builders, so what is timed is what is tested.
"""

from __future__ import annotations

import contextlib
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from dmgan import ops
from dmgan.ops.library import write_argument_shapes

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
    num_words: int | None = None  # T; by default the longest caption (at least 1)

    @property
    def words(self) -> int:
        return self.num_words or max((*self.lengths, 1))

    def __str__(self) -> str:
        lengths = "/".join(map(str, self.lengths)) if self.lengths else f"{self.words}-empty"
        return f"B{self.batch}-C{self.channels}-{self.height}x{self.width}-T{lengths}"


@dataclass(frozen=True)
class WriteShape:
    batch: int
    word_dim: int
    channels: int
    num_words: int

    def __str__(self) -> str:
        return f"B{self.batch}-Nw{self.word_dim}-Nr{self.channels}-T{self.num_words}"


def read_case(shape: ReadShape, dtype: torch.dtype = torch.float32, device: str = "cpu") -> dict:
    c, t = shape.channels, shape.words
    g = torch.Generator().manual_seed(zlib.crc32(str(shape).encode()))

    def rand(*size: int, scale: float = 1.0, positive: bool = False) -> Tensor:
        x = torch.rand(size, generator=g) if positive else torch.randn(size, generator=g)
        return (x * scale).to(device=device, dtype=dtype)

    return dict(
        # keys / values are ReLU outputs in the model: non-negative. Scales keep scores O(1).
        img=rand(shape.batch, c, shape.height, shape.width),
        keys=rand(shape.batch, c, t, scale=2.0 / c**0.5, positive=True),
        values=rand(shape.batch, c, t, positive=True),
        pad_mask=(torch.arange(t)[None, :] >= torch.tensor(shape.lengths, dtype=torch.long)[:, None]).to(
            device
        ),
        gate_w=rand(1, 2 * c, 1, 1, scale=0.2),
        gate_b=rand(1, scale=0.5),
    )


def write_case(shape: WriteShape, dtype: torch.dtype = torch.float32, device: str = "cpu") -> dict:
    nw, nr, nm = shape.word_dim, shape.channels, 2 * shape.channels
    g = torch.Generator().manual_seed(zlib.crc32(str(shape).encode()))
    sizes = write_argument_shapes(shape.batch, nw, nr, shape.num_words)
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
    # Only the differentiable outputs get a gradient (the attention map is for looking at), in
    # the output's own memory layout, as a network's next layer would hand it back.
    differentiable = outputs if op_name == "memory_write" else outputs[:1]
    grads_out = [torch.empty_like(o).copy_(torch.randn(o.shape, generator=g)) for o in differentiable]
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
        if want.numel() == 0:
            continue
        bound = tol * (want.abs() + want.abs().max() + 1e-3)
        excess = ((got - want).abs() - bound).max()
        assert excess <= 0, (
            f"{name}: max error {(got - want).abs().max():.3g} exceeds tolerance {tol} (normwise)"
        )


# The cases every backend runs: every word block (T 1..64 pads to 16, 32, 64), a fully padded
# caption, several pixel blocks with a partial last one (the CUDA kernels take 128 pixels a block,
# the Triton ones 16 to 64), each supported width, and empty batches and images.
READ_SHAPES = [
    ReadShape(2, 32, 5, 7, (6, 3)),  # odd H x W, mixed caption lengths
    ReadShape(1, 32, 4, 4, (1,)),  # B = 1, T = 1
    ReadShape(3, 32, 9, 7, (21, 3, 0)),  # two word blocks, a fully padded caption, several pixel tiles
    ReadShape(2, 64, 3, 11, (5, 5)),
    ReadShape(2, 128, 2, 3, (64, 17)),  # the widest supported: N_r 128, T 64
    ReadShape(1, 32, 11, 9, (7,)),  # several forward tiles, a partial last one
    ReadShape(2, 32, 17, 17, (9, 30)),  # 289 pixels: three CUDA blocks, the last one partial
    ReadShape(0, 32, 3, 3, (), num_words=4),  # no sample
    ReadShape(2, 32, 0, 3, (4, 2)),  # no pixel
]
# Channels-last images (every backend addresses both layouts): several tiles and blocks, the widest.
CHANNELS_LAST_SHAPES = [READ_SHAPES[0], READ_SHAPES[2], READ_SHAPES[4], READ_SHAPES[6]]
WRITE_SHAPES = [
    WriteShape(2, 40, 32, 6),  # N_w not a multiple of the chunk
    WriteShape(1, 32, 32, 1),
    WriteShape(3, 48, 64, 21),
    WriteShape(2, 24, 128, 64),
    WriteShape(0, 24, 32, 5),  # no sample
]


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Every buffer the C++ / CUDA kernels (``DMGAN_POISON_OUTPUTS``) and the Triton launchers
    allocate starts as NaN while this is active."""
    try:
        from dmgan.kernels import _common as triton_common
    except ImportError:  # no triton here
        triton_common = None
    previous_env = os.environ.get("DMGAN_POISON_OUTPUTS")
    previous_flag = triton_common.POISON_OUTPUTS if triton_common else False
    os.environ["DMGAN_POISON_OUTPUTS"] = "1"
    if triton_common:
        triton_common.POISON_OUTPUTS = True
    try:
        yield
    finally:
        if triton_common:
            triton_common.POISON_OUTPUTS = previous_flag
        if previous_env is None:
            del os.environ["DMGAN_POISON_OUTPUTS"]
        else:
            os.environ["DMGAN_POISON_OUTPUTS"] = previous_env


def check_memory_read(
    backend: str,
    dtype: torch.dtype,
    shape: ReadShape,
    legacy_mask: bool,
    device: str = "cpu",
    channels_last: bool = False,
) -> None:
    """``backend``'s memory_read (outputs, attention, every input gradient) matches the reference.
    With ``channels_last`` the image (and the output gradient) come channels-last, and r' and the
    image gradient must keep that layout."""
    case = read_case(shape, dtype, device)
    if channels_last:
        case["img"] = case["img"].contiguous(memory_format=torch.channels_last)
    options = dict(return_attention=True, legacy_mask=legacy_mask)
    with poisoned_outputs():
        got = run("memory_read", case, backend, **options)
    assert got["out0"].dtype == got["out1"].dtype == dtype
    if channels_last:
        for name in ("out0", "grad_img"):
            assert got[name].is_contiguous(memory_format=torch.channels_last), f"{name} lost the layout"
    assert_matches(got, reference_for("memory_read", case, dtype, **options), dtype)


def check_memory_write(backend: str, dtype: torch.dtype, shape: WriteShape, device: str = "cpu") -> None:
    """``backend``'s memory_write (keys, values, every input gradient) matches the reference."""
    case = write_case(shape, dtype, device)
    with poisoned_outputs():
        got = run("memory_write", case, backend)
    assert got["out0"].dtype == dtype
    assert_matches(got, reference_for("memory_write", case, dtype), dtype)
