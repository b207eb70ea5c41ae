"""Sample images from a trained checkpoint: per-stage grids, word-attention maps, interpolations.

    python -m dmgan.sample runs/shapes/checkpoints/latest.pt "a large red circle" "a small blue square"
    python -m dmgan.sample CHECKPOINT captions.txt --samples 4 --truncation 1.5 --out samples/
    python -m dmgan.sample CHECKPOINT "a red circle" --interpolate seeds --frames 8 --seed 0 --seed-to 1
    python -m dmgan.sample CHECKPOINT "a red circle" "a blue square" --interpolate captions
    python -m dmgan.sample CHECKPOINT captions.txt --samples 10 --save-images generated/

Each argument is a caption or a text file of captions (one a line). For each caption and sample it
writes ``caption<i>_sample<j>.png`` (the stages side by side, then the memory's key-addressing map
of every word over the image) and one ``grid.png`` with every caption's stages. ``--interpolate``
walks from one noise vector to another (``seeds``: spherically, each caption) or from one caption
to another (``captions``: the sentence feature blended, the word features of the nearer caption),
and writes the walk as ``interpolation.png`` (a strip of frames) and ``interpolation.gif``.
``--save-images`` writes each final image as ``00000.png``, ... and ``captions.txt`` (line k is
the caption of image k), as :func:`dmgan.visualize.save_images` writes generated images.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from dmgan.cli import HelpFormatter, add_shared_flags
from dmgan.pipeline import TextToImage, truncated_noise
from dmgan.visualize import animation, attention_figure, save_images, stage_grid, strip


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
    p.add_argument("captions", nargs="+", help="captions, or .txt files with one caption per line")
    p.add_argument("--samples", type=int, default=1, help="images per caption")
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
    args = build_parser().parse_args(argv)
    if args.samples < 1:
        raise SystemExit("--samples must be at least 1")
    texts = [caption for source in args.captions for caption in read_captions(source)]
    pipe = TextToImage.load(args.checkpoint, args.device, args.weights, args.memory_backend)
    out = Path(args.out)
    if args.interpolate:
        frames = interpolation(pipe, texts, args)
        rows = len(frames[-1]) // args.frames
        final = frames[-1].view(rows, args.frames, *frames[-1].shape[1:])
        written = [strip(final, out / "interpolation.png"), animation(final, out / "interpolation.gif")]
        print(f"wrote {out / 'interpolation.png'} and {out / 'interpolation.gif'} ({args.frames} frames)")
        return written
    captions = pipe.tokenize([t for t in texts for _ in range(args.samples)])
    for text, missing in list(zip(captions.texts, captions.unknown))[:: args.samples]:
        if missing:
            print(f"unknown words skipped in {text!r}: {', '.join(missing)}")
    stages, attention = pipe.generate(
        captions, seed=args.seed, truncation=args.truncation, return_attention=True
    )
    written = [stage_grid(stages, captions.texts, out / "grid.png")]
    for n in range(len(captions.texts)):
        words = [pipe.vocab.ixtoword[int(i)] for i in captions.indices[n, : captions.lengths[n]]]
        name = f"caption{n // args.samples:03d}_sample{n % args.samples:02d}.png"
        written.append(
            attention_figure([s[n] for s in stages], attention[-1][n], words, captions.texts[n], out / name)
        )
    if args.save_images is not None:
        written += save_images(stages[-1], captions.texts, args.save_images)
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
    print(f"wrote {len(written)} images to {out}" + (f" and {args.save_images}" if args.save_images else ""))
    return written


if __name__ == "__main__":
    main()
