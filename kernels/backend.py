"""The ``"triton"`` backend of ``dmgan.ops``: the reference signatures over the fused ops.

``dmgan.ops`` loads this module; the kernels themselves live in ``dmgan.kernels.memory_write``
and ``dmgan.kernels.memory_read``.
"""

from __future__ import annotations

import torch

from dmgan.kernels._common import SUPPORTED_CHANNELS, interpreting
from dmgan.kernels.memory_read import memory_read
from dmgan.kernels.memory_write import memory_write
from dmgan.ops.library import OpInput

# Read once: the kernels were decorated for (or against) the interpreter when this package loaded,
# and a constant keeps supports() traceable by torch.compile.
_INTERPRETING = interpreting()


def supports(device: torch.device) -> bool:
    """CUDA devices; and the CPU when kernels run under the interpreter (TRITON_INTERPRET=1)."""
    return device.type == "cuda" or (device.type == "cpu" and _INTERPRETING)


def unsupported_reason(call: OpInput) -> str | None:
    """Why the kernels cannot take this input, or None."""
    if call.channels not in SUPPORTED_CHANNELS:
        return f"N_r = {call.channels} (supported: {', '.join(map(str, SUPPORTED_CHANNELS))})"
    return call.common_gpu_limits()


__all__ = ["memory_read", "memory_write", "supports", "unsupported_reason"]
