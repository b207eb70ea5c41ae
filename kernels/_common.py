"""What the Triton ops share: launches on the inputs' device, output buffers, dot products, and
the one kernel that finishes a backward's per-program partial sums."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl
from triton import knobs

SUPPORTED_CHANNELS = (32, 64, 128)  # N_r (tl.arange needs powers of two); N_m = 2 N_r

# Tests set this to fill every buffer a launcher allocates with NaN before the kernels run, so an
# element a kernel forgets to write shows up as NaN instead of as stale memory that happens to pass.
POISON_OUTPUTS = False


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1)."""
    return bool(knobs.runtime.interpret)


def alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def alloc_like(t: torch.Tensor) -> torch.Tensor:
    """A buffer of ``t``'s shape, dtype, device and memory layout."""
    return torch.full_like(t, float("nan")) if POISON_OUTPUTS else torch.empty_like(t)


def word_block(num_words: int) -> int:
    """Words padded to a power of two of at least 16 (tl.dot needs K >= 16 for 16-bit inputs)."""
    return max(16, triton.next_power_of_2(num_words))


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Dots on fp32 operands for fp32 inputs, and always under the interpreter, which computes
    bf16 dots wrongly; 16-bit inputs otherwise use tensor cores, fp32 accumulate."""
    return dtype == torch.float32 or interpreting()


@dataclass
class Launch:
    """One kernel launch, planned: the kernel, its grid, its arguments and its launch options
    (constexprs, ``num_warps``, ``num_stages``). The ops run it; ``dmgan.kernels.compile_gate``
    compiles the same plan ahead of time, so what is gated is what is launched."""

    kernel: triton.JITFunction
    grid: tuple[int, ...]
    args: tuple
    options: dict[str, object] = field(default_factory=dict)

    def __call__(self) -> None:
        if 0 in self.grid:  # an empty batch or image: nothing to compute
            return
        device = next(a for a in _flat(self.args) if hasattr(a, "device")).device  # the first tensor
        # Triton launches on the current CUDA device and its current stream: make those the inputs'.
        guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        with guard:
            self.kernel[self.grid](*self.args, **self.options)


def _flat(args: Sequence) -> list:
    """Launch arguments with tuples (of segments) opened."""
    return [x for a in args for x in (_flat(a) if isinstance(a, tuple) else (a,))]


@triton.jit
def dot(a, b, DTYPE: tl.constexpr, DOT_FP32: tl.constexpr):
    """a @ b with fp32 accumulation: on fp32 operands in IEEE fp32 (FMAs; 3xTF32 on tensor cores
    needs about twice the registers and spills in the backward kernels at the presets' sizes, which
    ``python -m dmgan.kernels.compile_gate`` does not let through), else on DTYPE (bf16 / fp16)
    operands, on tensor cores."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(DTYPE), b.to(DTYPE))


@triton.jit
def load_tile(ptr, offs_c, offs_x, stride_c, stride_x, x_ok):
    """C x X tile of a strided C x X matrix, as fp32 (0 outside)."""
    return tl.load(
        ptr + offs_c[:, None] * stride_c + offs_x[None, :] * stride_x, mask=x_ok[None, :], other=0.0
    ).to(tl.float32)


FINISH_BLOCK = 512  # sums per program of the finishing kernel


@triton.jit
def finish_sums_kernel(partials, outs, groups, rows, widths, row_strides, BLOCK: tl.constexpr):
    """For each segment i: outs[i][g, w] = Σ_p partials[i][(g rows[i] + p) row_strides[i] + w]
    (g < groups[i], w < widths[i], p < rows[i]), added in the order of p and stored in the dtype
    of outs[i]. Program (j, i) finishes sums j BLOCK ... (j + 1) BLOCK - 1 of segment i."""
    segment = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    for i in tl.static_range(len(outs)):
        if segment == i:
            width = widths[i]
            if tl.program_id(0) * BLOCK < groups[i] * width:
                ok = offs < groups[i] * width
                group = (offs // width).to(tl.int64)
                ptrs = partials[i] + group * rows[i] * row_strides[i] + offs % width
                total = tl.zeros((BLOCK,), tl.float32)
                for _ in range(rows[i]):
                    total += tl.load(ptrs, mask=ok, other=0.0)
                    ptrs += row_strides[i]
                tl.store(outs[i] + offs, total.to(outs[i].dtype.element_ty), mask=ok)


def plan_finish_sums(segments: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Launch | None:
    """One launch that finishes every (partials, out) segment: ``partials`` a G x R x W view of
    fp32 partial sums (unit stride along W, groups R rows apart), ``out`` a contiguous tensor of
    G W elements that receives the sums over R in its own dtype. A backward's gradients of every
    size and dtype come out of this one small kernel instead of a sum and a cast each. None when
    there is no segment."""
    if not segments:
        return None
    for partials, out in segments:
        groups, rows, width = partials.shape
        assert partials.stride(2) == 1 or width <= 1, "partial sums need unit stride along W"
        assert groups <= 1 or partials.stride(0) == rows * partials.stride(1), "groups must follow rows"
        assert out.is_contiguous() and out.numel() == groups * width, "out holds the G x W sums"
    sizes = [p.shape[0] * p.shape[2] for p, _ in segments]
    return Launch(
        finish_sums_kernel,
        (triton.cdiv(max(sizes), FINISH_BLOCK), len(segments)),
        (
            tuple(p for p, _ in segments),
            tuple(out for _, out in segments),
            tuple(p.shape[0] for p, _ in segments),
            tuple(p.shape[1] for p, _ in segments),
            tuple(p.shape[2] for p, _ in segments),
            tuple(p.stride(1) for p, _ in segments),
        ),
        dict(BLOCK=FINISH_BLOCK, num_warps=4, num_stages=1),
    )
