"""Turn your own captioned images into the AttnGAN layout that training reads.

    python -m dmgan.data.build my_photos/ data/mine             # photo.jpg + photo.txt pairs
    python -m dmgan.data.build my_photos/ data/mine --test-fraction 0.1 --seed 0
    python train.py --preset custom --data-dir data/mine --set text.captions_per_image=1

The source is a folder of images (PNG / JPEG / WebP / BMP, in subfolders too) with, for each, a
same-named ``.txt`` file of captions (one a line), or a folder with a ``metadata.jsonl``
(``{"file_name": ..., "text": ...}`` rows, the Hugging Face image-folder convention) or a
``metadata.csv`` (columns ``file_name``/``file`` and ``text``/``caption``), where an image may have
several rows. The output has ``images/``, ``text/``, ``train|test/filenames.pickle``,
``train|test/class_info.pickle`` (every image its own class) and ``captions.pickle``, with a
seeded split. Images it cannot read, captions that are empty, and images with fewer than
``--captions-per-image`` captions are reported with their file names and left out, never silently.
"""

from __future__ import annotations

import argparse
import csv
import json
import pickle
import random
import re
import shutil
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dmgan.progress import progress

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class BuildReport:
    kept: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # "file: why"
    without_captions: list[str] = field(default_factory=list)
    too_few_captions: list[str] = field(default_factory=list)
    captions_per_image: int = 0


def _captions_by_file(source: Path) -> dict[Path, list[str]]:
    """Every image of the source and its caption lines (empty lines kept: they are reported)."""
    if (source / "metadata.jsonl").is_file() or (source / "metadata.csv").is_file():
        by_file: dict[Path, list[str]] = defaultdict(list)
        if (source / "metadata.jsonl").is_file():
            for number, line in enumerate((source / "metadata.jsonl").read_text().splitlines(), start=1):
                if line.strip():
                    try:
                        row = json.loads(line)
                        by_file[source / row["file_name"]].append(str(row.get("text", "")))
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise SystemExit(
                            f"{source / 'metadata.jsonl'}, line {number}: not a file_name/text row ({e})"
                        ) from None
        else:
            with open(source / "metadata.csv", newline="") as f:
                for row in csv.DictReader(f):
                    name = row.get("file_name") or row.get("file")
                    if not name:
                        raise SystemExit(f"{source / 'metadata.csv'}: needs a file_name (or file) column")
                    by_file[source / name].append(row.get("text") or row.get("caption") or "")
        return dict(by_file)
    images = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return {
        p: (
            p.with_suffix(".txt").read_text(errors="replace").splitlines()
            if p.with_suffix(".txt").is_file()
            else []
        )
        for p in images
    }


def _key(path: Path, source: Path, taken: set[str]) -> str:
    """A file-name-safe, unique key from the image's path below the source."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", str(path.relative_to(source).with_suffix("")))
    key, n = stem, 1
    while key in taken:
        key, n = f"{stem}_{n}", n + 1
    taken.add(key)
    return key


def build(
    source: str | Path,
    out: str | Path,
    test_fraction: float = 0.1,
    seed: int = 0,
    captions_per_image: int | None = None,
) -> BuildReport:
    """Write the AttnGAN layout of ``source`` into ``out``; returns what was kept and left out."""
    from PIL import Image, UnidentifiedImageError

    from dmgan.data.dataset import load_captions, tokenize

    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise SystemExit(f"{source} is not a folder")
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not empty: choose a new folder")
    report, candidates = BuildReport(), []
    for path, lines in sorted(_captions_by_file(source).items()):
        name = str(path.relative_to(source)) if path.is_relative_to(source) else str(path)
        try:
            with Image.open(path) as image:
                image.convert("RGB").load()  # decode it all: a truncated file fails here
        except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
            report.unreadable.append(f"{name}: {type(e).__name__}: {e}")
            continue
        captions = [" ".join(line.split()) for line in lines if tokenize(line)]  # a caption has a word
        if not captions:
            report.without_captions.append(name)
            continue
        candidates.append((path, name, captions))
    if not candidates:
        raise SystemExit(f"{source}: no readable image with a caption")
    report.captions_per_image = captions_per_image or min(len(c) for _, _, c in candidates)
    for _, name, captions in candidates:
        if len(captions) < report.captions_per_image:
            report.too_few_captions.append(f"{name} ({len(captions)})")
    candidates = [c for c in candidates if len(c[2]) >= report.captions_per_image]
    if len(candidates) < 2:
        raise SystemExit(
            f"{source}: {len(candidates)} usable images; a train and a test split need at least 2"
        )

    (out / "images").mkdir(parents=True)
    (out / "text").mkdir()
    taken: set[str] = set()
    keys = []
    for path, name, captions in progress(candidates, desc="copying images"):
        key = _key(path, source, taken)
        shutil.copyfile(path, out / "images" / f"{key}{path.suffix.lower()}")
        (out / "text" / f"{key}.txt").write_text("\n".join(captions) + "\n")
        keys.append(key)
        report.kept.append(name)
    order = keys[:]
    random.Random(seed).shuffle(order)
    test_count = min(len(order) - 1, max(1, round(len(order) * test_fraction)))
    splits = {"test": sorted(order[:test_count]), "train": sorted(order[test_count:])}
    class_of = {key: i for i, key in enumerate(keys)}  # every image its own class
    for split, split_keys in splits.items():
        (out / split).mkdir()
        with open(out / split / "filenames.pickle", "wb") as f:
            pickle.dump(split_keys, f, protocol=2)
        with open(out / split / "class_info.pickle", "wb") as f:
            pickle.dump([class_of[k] for k in split_keys], f, protocol=2)
    load_captions(out, report.captions_per_image)  # writes captions.pickle (the vocabulary)
    (out / "build_report.json").write_text(json.dumps(report.__dict__, indent=2) + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> BuildReport:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "source", type=Path, help="images with .txt captions, or a metadata.jsonl / metadata.csv folder"
    )
    p.add_argument("out", type=Path, help="the dataset folder to write (new or empty)")
    p.add_argument("--test-fraction", type=float, default=0.1, help="share of the images in the test split")
    p.add_argument("--seed", type=int, default=0, help="seed of the train / test split")
    p.add_argument(
        "--captions-per-image",
        type=int,
        default=None,
        help="captions each image needs (default: the fewest any image has)",
    )
    args = p.parse_args(argv)
    report = build(args.source, args.out, args.test_fraction, args.seed, args.captions_per_image)
    for what, names in (
        ("unreadable images", report.unreadable),
        ("images without a caption", report.without_captions),
        (f"images with fewer than {report.captions_per_image} captions", report.too_few_captions),
    ):
        if names:
            print(f"left out {len(names)} {what}:\n  " + "\n  ".join(names))
    print(
        f"wrote {len(report.kept)} images to {args.out} ({report.captions_per_image} captions each); train with:\n"
        f"  python train.py --preset custom --data-dir {args.out} --set text.captions_per_image={report.captions_per_image}"
    )
    return report


if __name__ == "__main__":
    main()
