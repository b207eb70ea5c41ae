"""Sample images from a trained checkpoint: per-stage grids and word-attention maps.

    python -m dmgan.sample runs/shapes/checkpoints/latest.pt "a large red circle in the top left"
    python -m dmgan.sample CHECKPOINT captions.txt --samples 4 --truncation 1.5 --out samples/

For each caption it writes ``caption<i>_sample<j>.png`` (the 64/128/256, or preset, stages side by
side, then the memory's key-addressing map of every word over the image) and one ``grid.png``
with every caption's stages.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from dmgan.config import HelpFormatter
from dmgan.pipeline import TextToImage
from dmgan.visualize import attention_figure, stage_grid


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
    p.add_argument("checkpoint", help="training checkpoint (runs/<preset>/checkpoints/latest.pt)")
    p.add_argument("captions", help="a caption, or a .txt file with one caption per line")
    p.add_argument("--samples", type=int, default=1, help="images per caption")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--truncation", type=float, default=None, help="redraw noise entries with |z| above this")
    p.add_argument("--weights", default="ema", choices=["ema", "raw"], help="EMA or raw generator weights")
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: Sequence[str] | None = None) -> list[Path]:
    args = build_parser().parse_args(argv)
    if args.samples < 1:
        raise SystemExit("--samples must be at least 1")
    texts = read_captions(args.captions)
    pipe = TextToImage.load(args.checkpoint, args.device, args.weights)
    captions = pipe.tokenize([t for t in texts for _ in range(args.samples)])
    for text, missing in list(zip(captions.texts, captions.unknown))[:: args.samples]:
        if missing:
            print(f"unknown words skipped in {text!r}: {', '.join(missing)}")
    stages, attention = pipe.generate(
        captions, seed=args.seed, truncation=args.truncation, return_attention=True
    )
    out = Path(args.out)
    written = [stage_grid(stages, captions.texts, out / "grid.png")]
    for n in range(len(captions.texts)):
        words = [pipe.vocab.ixtoword[int(i)] for i in captions.indices[n, : captions.lengths[n]]]
        name = f"caption{n // args.samples:03d}_sample{n % args.samples:02d}.png"
        written.append(
            attention_figure([s[n] for s in stages], attention[-1][n], words, captions.texts[n], out / name)
        )
    (out / "captions.json").write_text(
        json.dumps(
            {
                "checkpoint": str(args.checkpoint),
                "weights": args.weights,
                "seed": args.seed,
                "truncation": args.truncation,
                "captions": texts,
                "unknown_words": captions.unknown[:: args.samples],
            },
            indent=2,
        )
    )
    print(f"wrote {len(written)} images to {out}")
    return written


if __name__ == "__main__":
    main()
