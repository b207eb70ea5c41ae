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

MIN_DISPLAY = 128  # smaller images are shown enlarged (nearest neighbour, pixels stay visible)


def to_uint8(images: Tensor) -> np.ndarray:
    """B x 3 x H x W in [-1, 1] → B x H x W x 3 uint8."""
    scaled = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def stage_grid(
    stages: Sequence[Tensor], captions: Sequence[str], path: str | os.PathLike, text_width: int = 220
) -> Path:
    """:func:`render_stage_grid`, written as a PNG; returns its path."""
    return _save(render_stage_grid(stages, captions, text_width), path)


def render_stage_grid(
    stages: Sequence[Tensor], captions: Sequence[str], text_width: int = 220
) -> Image.Image:
    """One row per caption: the image of every stage (nearest-upsampled to the largest size, at
    least ``MIN_DISPLAY``, so the low-resolution pixels stay visible), then the caption (none
    when ``text_width`` is 0)."""
    size = max(MIN_DISPLAY, stages[-1].shape[-1])
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
        if text_width:
            draw.multiline_text((pixels.shape[2] + 6, top + 2), textwrap.fill(caption, 32), fill=(0, 0, 0))
    return canvas


def _save(image: Image.Image, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def attention_figure(
    stages: Sequence[Tensor], attention: Tensor, words: Sequence[str], caption: str, path: str | os.PathLike
) -> Path:
    """:func:`render_attention`, written as a PNG; returns its path."""
    return _save(render_attention(stages, attention, words, caption), path)


def render_attention(
    stages: Sequence[Tensor], attention: Tensor, words: Sequence[str], caption: str
) -> Image.Image:
    """One sample: its stages side by side (top row), then, per word, the last image with the
    memory's key-addressing map for that word over it (which regions read the word).

    ``stages``: 3 x S_i x S_i images; ``attention``: T x s x s (T >= len(words)).
    """
    size = max(MIN_DISPLAY, stages[-1].shape[-1])
    top = to_uint8(
        torch.cat([F.interpolate(s[None].float(), size=(size, size), mode="nearest") for s in stages], dim=3)
    )[0]
    base = to_uint8(F.interpolate(stages[-1][None].float(), size=(size, size), mode="nearest"))[0].astype(
        np.float32
    )
    maps = F.interpolate(
        attention[None, : len(words)].float(), size=(size, size), mode="bilinear", align_corners=False
    )[0]
    maps = maps / maps.flatten(1).amax(1).clamp(min=1e-12)[:, None, None]
    tiles = []
    for m in maps.numpy():
        heat = np.stack([255 * m, 64 * m, 0 * m], axis=-1)  # red-orange where the word was read
        tiles.append((0.45 * base + 0.55 * heat).clip(0, 255).astype(np.uint8))
    label_h, pad = 14, 4
    per_row = max(1, top.shape[1] // (size + pad))
    rows = (len(tiles) + per_row - 1) // per_row
    width = max(top.shape[1], per_row * (size + pad))
    canvas = Image.new("RGB", (width, 18 + size + pad + rows * (size + label_h + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 2), caption[:120], fill=(0, 0, 0))
    canvas.paste(Image.fromarray(top), (0, 18))
    for i, (tile, word) in enumerate(zip(tiles, words)):
        x = (i % per_row) * (size + pad)
        y = 18 + size + pad + (i // per_row) * (size + label_h + pad)
        canvas.paste(Image.fromarray(tile), (x, y))
        draw.text((x + 2, y + size + 1), word, fill=(0, 0, 0))
    return canvas


def _display(images: Tensor) -> Tensor:
    """Images upsampled (nearest) to at least ``MIN_DISPLAY`` pixels, for looking at."""
    size = max(MIN_DISPLAY, images.shape[-1])
    return F.interpolate(images.detach().float(), size=(size, size), mode="nearest")


def strip(frames: Tensor, path: str | os.PathLike) -> Path:
    """An interpolation as one image: ``frames`` is rows x frames x 3 x S x S, one row each."""
    rows, count = frames.shape[:2]
    pixels = to_uint8(_display(frames.flatten(0, 1)))  # (rows·count) x S x S x 3
    size = pixels.shape[1]
    grid = (
        pixels.reshape(rows, count, size, size, 3)
        .transpose(0, 2, 1, 3, 4)
        .reshape(rows * size, count * size, 3)
    )
    return _save(Image.fromarray(grid), path)


def animation(frames: Tensor, path: str | os.PathLike, milliseconds: int = 150) -> Path:
    """An interpolation as an animated GIF that walks there and back; each frame stacks the rows."""
    rows, count = frames.shape[:2]
    pixels = to_uint8(_display(frames.flatten(0, 1)))
    size = pixels.shape[1]
    stacked = (
        pixels.reshape(rows, count, size, size, 3)
        .transpose(1, 0, 2, 3, 4)
        .reshape(count, rows * size, size, 3)
    )
    images = [Image.fromarray(f) for f in stacked]
    images += images[-2:0:-1]  # and back, so the loop has no jump
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=milliseconds, loop=0)
    return path


def save_images(images: Tensor, captions: Sequence[str], folder: str | os.PathLike) -> list[Path]:
    """Each image as ``00000.png``, ``00001.png``, ... at its own size, and ``captions.txt`` whose
    line k is the caption of image k: how generated images are written for scoring and sharing.
    A stream of batches writes the same folder with :func:`write_numbered_images` per batch and
    :func:`write_captions` once."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    paths = write_numbered_images(images, folder)
    write_captions(captions, folder)
    return paths


def write_numbered_images(images: Tensor, folder: str | os.PathLike, start: int = 0) -> list[Path]:
    """Images ``start``, ``start + 1``, ... of a folder as ``{number:05d}.png``, each at its own
    size: one batch of a stream, written as it comes, so no caller holds every image."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, pixels in enumerate(to_uint8(images), start=start):
        paths.append(folder / f"{k:05d}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def write_captions(captions: Sequence[str], folder: str | os.PathLike) -> Path:
    """``captions.txt`` of a folder of numbered images: line k is image k's caption."""
    path = Path(folder) / "captions.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(c.replace("\n", " ") + "\n" for c in captions))
    return path
