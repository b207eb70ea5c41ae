"""The ``"triton"`` backend of ``dmgan.ops``: the reference signatures over the fused ops.

``dmgan.ops`` loads this module; the kernels themselves live in ``kernels.memory_write`` and
``kernels.memory_read``.
"""

from __future__ import annotations

import torch

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


# The registered ops take the reference's arguments; dmgan.ops hands them contiguous tensors of one
# dtype and turns the empty attention tensor into None when it was not asked for.
memory_write = memory_write_op
memory_read = memory_read_op


__all__ = ["MAX_WORDS", "SUPPORTED_CHANNELS", "memory_read", "memory_write", "supports", "unsupported_reason"]
