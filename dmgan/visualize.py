"""Image grids: each caption's stages side by side, with the caption written beside them."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor


def to_uint8(images: Tensor) -> np.ndarray:
    """B x 3 x H x W in [-1, 1] → B x H x W x 3 uint8."""
    scaled = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def stage_grid(
    stages: Sequence[Tensor], captions: Sequence[str], path: str | os.PathLike, text_width: int = 220
) -> Path:
    """One row per caption: the image of every stage (nearest-upsampled to the largest size, so
    the low-resolution pixels stay visible), then the caption. Writes a PNG and returns its path."""
    size = stages[-1].shape[-1]
    rows = torch.cat(
        [F.interpolate(s.detach().float(), size=(size, size), mode="nearest") for s in stages], dim=3
    )
    pixels = to_uint8(rows)  # B x S x (stages·S) x 3
    pad = 4
    width = pixels.shape[2] + text_width
    canvas = Image.new("RGB", (width, len(pixels) * (size + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (row, caption) in enumerate(zip(pixels, captions)):
        top = pad + i * (size + pad)
        canvas.paste(Image.fromarray(row), (0, top))
        draw.multiline_text((pixels.shape[2] + 6, top + 2), textwrap.fill(caption, 32), fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
