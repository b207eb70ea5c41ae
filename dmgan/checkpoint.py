"""Atomic checkpoints: a crash mid-write never leaves a broken or missing latest checkpoint.

``save`` writes to a temporary file in the same folder, flushes it to disk and renames it over the
target (``os.replace`` is atomic on POSIX); ``load`` reads with ``weights_only=True``, so a
checkpoint can hold tensors, numbers, strings and containers of them, never arbitrary objects.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def save(state: dict[str, Any], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


def all_finite(state_dict: dict[str, Any]) -> bool:
    """True when every floating-point tensor of a (nested) state dict is finite."""
    stack: list[Any] = [state_dict]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            if item.is_floating_point() and not torch.isfinite(item).all():
                return False
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return True
