"""The ``"triton"`` backend of ``dmgan.ops``: the reference signatures over the fused ops.

``dmgan.ops`` loads this module; the kernels themselves live in ``kernels.memory_write`` and
``kernels.memory_read``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels._common import MAX_WORDS, SUPPORTED_CHANNELS, interpreting
from kernels.memory_read import memory_read as memory_read_op
from kernels.memory_write import memory_write as memory_write_op

# Read once: the kernels were decorated for (or against) the interpreter when this package loaded,
# and a constant keeps supports() traceable by torch.compile.
_INTERPRETING = interpreting()


def supports(device: torch.device) -> bool:
    """CUDA devices; and the CPU when kernels run under the interpreter (TRITON_INTERPRET=1)."""
    return device.type == "cuda" or (device.type == "cpu" and _INTERPRETING)


def unsupported_reason(channels: int, num_words: int, device: torch.device | None = None) -> str | None:
    """Why the kernels cannot take this input, or None."""
    if channels not in SUPPORTED_CHANNELS:
        return f"N_r = {channels} (supported: {', '.join(map(str, SUPPORTED_CHANNELS))})"
    if num_words > MAX_WORDS:
        return f"T = {num_words} words (at most {MAX_WORDS})"
    return None


def _compute_dtype(reference: Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on (the kernels accumulate in fp32 regardless)."""
    device_type = reference.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return reference.dtype


def memory_write(words: Tensor, rbar: Tensor, *weights: Tensor) -> tuple[Tensor, Tensor]:
    dtype = _compute_dtype(words)
    return memory_write_op(*(t.to(dtype) for t in (words, rbar, *weights)))


def memory_read(
    img: Tensor,
    keys: Tensor,
    values: Tensor,
    pad_mask: Tensor,
    gate_w: Tensor,
    gate_b: Tensor,
    return_attention: bool = False,
    legacy_mask: bool = False,
) -> tuple[Tensor, Tensor | None]:
    dtype = _compute_dtype(img)
    img, keys, values, gate_w, gate_b = (t.to(dtype) for t in (img, keys, values, gate_w, gate_b))
    r_new, attention = memory_read_op(
        img, keys, values, pad_mask, gate_w, gate_b, return_attention, legacy_mask
    )
    return r_new, attention if return_attention else None


__all__ = ["MAX_WORDS", "SUPPORTED_CHANNELS", "memory_read", "memory_write", "supports", "unsupported_reason"]
