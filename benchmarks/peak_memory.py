"""Peak memory of one call: CUDA max-allocated on a GPU, peak resident set size (RSS) on a CPU."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_bytes(fn: Callable[[], object], device: str) -> int | None:
    """Bytes the call adds at its peak over what was in use before it (None where unmeasurable)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    try:  # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) of this process
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kib("VmRSS")
        fn()
        return max(0, _status_kib("VmHWM") - before) * 1024
    except (OSError, KeyError):
        return None
