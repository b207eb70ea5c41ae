"""Sample images from a trained model: per-stage grids, word-attention maps, interpolations.

    python -m dmgan.sample runs/shapes/checkpoints/latest.pt "a large red circle" "a small blue square"
    python -m dmgan.sample CHECKPOINT captions.txt --samples 4 --truncation 1.5 --out samples/
    python -m dmgan.sample CHECKPOINT "a red circle" --seeds 0-99 --save-images generated/
    python -m dmgan.sample OWNER/NAME "a red circle" --seeds 0-3,7,10-12   # a model on the Hugging Face Hub
    python -m dmgan.sample CHECKPOINT "a red circle" --interpolate seeds --frames 8 --seed 0 --seed-to 1
    python -m dmgan.sample CHECKPOINT "a red circle" "a blue square" --interpolate captions

The model is a training checkpoint, an exported model folder or a Hub repo id
(:meth:`dmgan.pipeline.TextToImage.load`); one that is missing, cut off, of other content or of
another dmgan version ends the command with one line that names it. Each further argument is a
caption or a text file of captions (one a line). Every caption is drawn once per seed: ``--seeds``
takes numbers and inclusive ranges (``0-99``, ``0-3,7,10-12``, as stylegan3's tools do), and
``--samples N`` means the seeds ``--seed`` to ``--seed + N - 1``. An image is a function of its
caption and seed alone (the same in any batch, and what ``TextToImage(caption, seed=s)`` draws).
For each caption and seed it writes ``caption<i>_sample<j>.png`` (``caption<i>_seed<s>.png`` with
``--seeds``: the stages side by side, then the memory's key-addressing map of every word over the
image) and one ``grid.png`` with the stages of the first 32 images. Images are generated and
written batch by batch (``--batch-size``), so memory does not grow with their number.
``--interpolate`` walks from one noise vector to another (``seeds``: spherically, each caption) or
from one caption to another (``captions``: the sentence feature blended, the word features of the
nearer caption), and writes the walk as ``interpolation.png`` (a strip of frames) and
``interpolation.gif``. ``--save-images`` writes each final image as ``00000.png``, ... and
``captions.txt`` (line k is the caption of image k), as :func:`dmgan.visualize.save_images` writes
generated images.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from PIL import Image

from dmgan.cli import MODEL_HELP, HelpFormatter, add_shared_flags, one_line_errors
from dmgan.pipeline import Captions, TextToImage, truncated_noise
from dmgan.progress import progress
from dmgan.visualize import animation, attention_figure, stage_grid, strip, to_uint8

GRID_ROWS = 32  # grid.png shows the first images only: a grid of thousands is unreadable and big
SEED_PART = re.compile(r"(\d+)(?:-(\d+))?")
T = TypeVar("T")


def parse_seeds(text: str) -> list[range]:
    """A seed list as stylegan3's tools take it: comma-separated numbers and inclusive ranges,
    ``0-3,7,10-12``. Ranges stay ranges, so ``0-9999999`` costs no memory."""
    seeds = []
    for part in text.split(","):
        match = SEED_PART.fullmatch(part.strip())
        if match is None:
            raise argparse.ArgumentTypeError(
                f"{part.strip()!r} is neither a seed nor a range A-B (e.g. 0-3,7,10-12)"
            )
        low, high = int(match[1]), int(match[2] or match[1])
        if high < low:
            raise argparse.ArgumentTypeError(f"the range {part.strip()} runs backwards")
        seeds.append(range(low, high + 1))
    return seeds


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of ``size`` items (the last may be shorter), drawn lazily (itertools.batched is 3.12)."""
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


class ImageFolder:
    """Writes images as ``00000.png``, ``00001.png``, ... and their captions as ``captions.txt``
    (line k: image k's caption) batch by batch, in the layout :func:`dmgan.visualize.save_images`
    writes at once (``dmgan.evaluate --images`` scores it)."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.count = folder, 0
        self.captions = open(folder / "captions.txt", "w")  # kept open: a line per image; close() ends it

    def add(self, images: torch.Tensor, captions: Sequence[str]) -> list[Path]:
        paths = []
        for pixels, caption in zip(to_uint8(images), captions, strict=True):
            paths.append(self.folder / f"{self.count:05d}.png")
            Image.fromarray(pixels).save(paths[-1])
            self.captions.write(caption.replace("\n", " ") + "\n")
            self.count += 1
        self.captions.flush()
        return paths

    def close(self) -> None:
        self.captions.close()


def read_captions(source: str) -> list[str]:
    """A caption, or a text file of captions (one per line, blank lines ignored)."""
    path = Path(source)
    if path.suffix == ".txt" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"caption file not found: {path}")
        captions = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not captions:
            raise ValueError(f"caption file {path} holds no caption")
        return captions
    if not source.strip():
        raise ValueError("empty caption")
    return [source]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("checkpoint", help=MODEL_HELP)
    p.add_argument("captions", nargs="+", help="captions, or .txt files with one caption per line")
    p.add_argument(
        "--samples",
        type=int,
        default=None,
        help="images per caption: seeds --seed, --seed + 1, ... (default 1)",
    )
    p.add_argument(
        "--seeds",
        type=parse_seeds,
        default=None,
        help="an image of each caption per seed: numbers and ranges, e.g. 0-99 or 0-3,7,10-12",
    )
    p.add_argument("--batch-size", type=int, default=32, help="images generated and written at a time")
    p.add_argument("--truncation", type=float, default=None, help="redraw noise entries with |z| above this")
    p.add_argument(
        "--interpolate", choices=["seeds", "captions"], help="walk between two seeds or two captions"
    )
    p.add_argument("--frames", type=int, default=8, help="frames of an interpolation")
    p.add_argument("--seed-to", type=int, default=None, help="the walk's last seed (default: --seed + 1)")
    p.add_argument(
        "--save-images", type=Path, default=None, help="also write every image and captions.txt here"
    )
    p.add_argument("--out", default="samples", help="output folder")
    add_shared_flags(p, "seed", "weights", "device", "memory-backend")
    return p


def slerp(a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between noise vectors a and b (z_dim each) at each weight."""
    cos = torch.dot(a, b) / (a.norm() * b.norm())
    omega = torch.arccos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
    w = weights[:, None]
    return (torch.sin((1 - w) * omega) * a + torch.sin(w * omega) * b) / torch.sin(omega)


def interpolation(pipe: TextToImage, texts: list[str], args: argparse.Namespace) -> list[torch.Tensor]:
    """The walk's frames: for ``seeds`` a row of frames per caption, for ``captions`` one row."""
    if args.frames < 2:
        raise SystemExit("--frames must be at least 2")
    weights = torch.linspace(0, 1, args.frames)
    z_dim = pipe.cfg.model.z_dim
    if args.interpolate == "seeds":
        start, end = (
            truncated_noise(1, z_dim, args.truncation, torch.Generator().manual_seed(s))[0]
            for s in (args.seed, args.seed + 1 if args.seed_to is None else args.seed_to)
        )
        noise = slerp(start, end, weights).repeat(len(texts), 1)
        captions = pipe.tokenize([t for t in texts for _ in range(args.frames)])
        return pipe.generate(captions, seed=args.seed, noise=noise)[0]
    if len(texts) != 2:
        raise SystemExit(f"--interpolate captions walks between two captions, got {len(texts)}")
    # The sentence feature walks from A's to B's; the word features are the nearer caption's.
    near = [texts[0] if w < 0.5 else texts[1] for w in weights.tolist()]
    far = [texts[1] if w < 0.5 else texts[0] for w in weights.tolist()]
    blend = torch.where(weights < 0.5, weights, 1 - weights)  # towards the far caption
    noise = truncated_noise(1, z_dim, args.truncation, torch.Generator().manual_seed(args.seed))
    mix = (pipe.tokenize(far), blend)
    return pipe.generate(
        pipe.tokenize(near), seed=args.seed, noise=noise.repeat(args.frames, 1), sentence_mix=mix
    )[0]


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.samples is not None and args.samples < 1:
        raise SystemExit("--samples must be at least 1")
    if args.seeds is not None and (args.samples is not None or args.interpolate):
        raise SystemExit("--seeds names every image's seed: leave out --samples and --interpolate")
    if args.batch_size < 1:
        raise SystemExit("--batch-size must be at least 1")
    with one_line_errors("dmgan.sample"):
        texts = [caption for source in args.captions for caption in read_captions(source)]
        pipe = TextToImage.load(args.checkpoint, args.device, args.weights, args.memory_backend)
        captions = pipe.tokenize(texts)  # a caption with no known word stops here, with its text
    out = Path(args.out)
    if args.interpolate:
        frames = interpolation(pipe, texts, args)
        rows = len(frames[-1]) // args.frames
        final = frames[-1].view(rows, args.frames, *frames[-1].shape[1:])
        written = [strip(final, out / "interpolation.png"), animation(final, out / "interpolation.gif")]
        print(f"wrote {out / 'interpolation.png'} and {out / 'interpolation.gif'} ({args.frames} frames)")
        return written
    for text, missing in zip(captions.texts, captions.unknown):
        if missing:
            print(f"unknown words skipped in {text!r}: {', '.join(missing)}")
    seeds = args.seeds or [range(args.seed, args.seed + (args.samples or 1))]
    written = sample(pipe, captions, seeds, args, out)
    (out / "captions.json").write_text(
        json.dumps(
            {
                "checkpoint": str(args.checkpoint),
                "weights": args.weights,
                "seeds": ",".join(f"{r.start}-{r.stop - 1}" if len(r) > 1 else str(r.start) for r in seeds),
                "truncation": args.truncation,
                "captions": texts,
                "unknown_words": captions.unknown,
            },
            indent=2,
        )
    )
    print(f"wrote {len(written)} images to {out}" + (f" and {args.save_images}" if args.save_images else ""))
    return written


def sample(
    pipe: TextToImage, captions: Captions, seeds: list[range], args: argparse.Namespace, out: Path
) -> list[Path]:
    """Every (caption, seed) pair, caption by caption, generated and written ``--batch-size`` at
    a time: only the grid's first rows are kept between batches."""
    out.mkdir(parents=True, exist_ok=True)
    per_caption = sum(len(r) for r in seeds)
    pairs = (
        (c, j, seed)
        for c in range(len(captions))
        for j, seed in enumerate(itertools.chain.from_iterable(seeds))
    )
    grid: list[list[torch.Tensor]] = []
    grid_labels: list[str] = []
    written: list[Path] = []
    folder = ImageFolder(args.save_images) if args.save_images is not None else None
    bar = progress(total=len(captions) * per_caption, desc="sampling")
    try:
        for batch in batched(pairs, args.batch_size):
            part = captions.select([c for c, _, _ in batch])
            stages, attention = pipe.generate(
                part,
                truncation=args.truncation,
                return_attention=True,
                batch_size=len(batch),
                seeds=[seed for _, _, seed in batch],
            )
            if (room := GRID_ROWS - len(grid_labels)) > 0:
                grid.append([s[:room].clone() for s in stages])  # a copy: the batch is let go
                grid_labels += [f"{part.texts[n]} (seed {batch[n][2]})" for n in range(min(room, len(batch)))]
            for n, (c, j, seed) in enumerate(batch):
                words = [pipe.vocab.ixtoword[int(i)] for i in part.indices[n, : part.lengths[n]]]
                name = (
                    f"caption{c:03d}_seed{seed:04d}.png"
                    if args.seeds
                    else f"caption{c:03d}_sample{j:02d}.png"
                )
                written.append(
                    attention_figure(
                        [s[n] for s in stages], attention[-1][n], words, part.texts[n], out / name
                    )
                )
            if folder is not None:
                written += folder.add(stages[-1], part.texts)
            bar.update(len(batch))
    finally:
        bar.close()
        if folder is not None:
            folder.close()
    grid_stages = [torch.cat(rows) for rows in zip(*grid)]
    written.insert(0, stage_grid(grid_stages, grid_labels, out / "grid.png"))
    if len(captions) * per_caption > GRID_ROWS:
        print(f"grid.png shows the first {GRID_ROWS} of {len(captions) * per_caption} images")
    return written


if __name__ == "__main__":
    main()
