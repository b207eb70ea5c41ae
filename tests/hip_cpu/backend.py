"""The CUDA kernels, built for the CPU with HIP-CPU (``tests/hip_cpu/build.py``), as a backend
of ``dmgan.ops`` for the tests: importing this module builds them."""

from __future__ import annotations

import torch

from dmgan.ops import library
from tests.hip_cpu import build

NAMESPACE = build.build()
library.register_memory_ops(NAMESPACE)
_ops = getattr(torch.ops, NAMESPACE)
memory_write = _ops.memory_write
memory_read = _ops.memory_read


def supports(device: torch.device) -> bool:
    return device.type == "cpu"  # the emulated device's memory is the host's


def unsupported_reason(call: library.OpInput) -> str | None:
    return call.common_gpu_limits()  # what the CUDA kernels refuse on a GPU, refused here too
