"""What the Triton ops share: launches on the inputs' device, output buffers, dot products."""

from __future__ import annotations

import contextlib
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
        device = self.args[0].device
        # Triton launches on the current CUDA device and its current stream: make those the inputs'.
        guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        with guard:
            self.kernel[self.grid](*self.args, **self.options)


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
