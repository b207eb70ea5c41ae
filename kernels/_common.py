"""Shared launch helpers for the Triton kernels."""

from __future__ import annotations

import torch
import triton
from triton import knobs

MAX_WORDS = 64  # T above this is not supported by the fused kernels
SUPPORTED_CHANNELS = (32, 64, 128)  # N_r; N_m = 2 N_r

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


def word_block(num_words: int) -> int:
    """Words padded to a power of two of at least 16 (tl.dot needs K >= 16 for 16-bit inputs)."""
    return max(16, triton.next_power_of_2(num_words))


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Dots on fp32 operands (IEEE, not TF32) for fp32 inputs, and always under the interpreter,
    which computes bf16 dots wrongly; 16-bit inputs otherwise use tensor cores, fp32 accumulate."""
    return dtype == torch.float32 or interpreting()
