"""Text-image datasets in the AttnGAN layout (CUB-200, COCO, and the built-in ``shapes``).

Layouts (those AttnGAN's ``code/datasets.py`` reads, which the DM-GAN reference code keeps)::

    CUB:    root/CUB_200_2011/images/<class>/<name>.jpg, images.txt, bounding_boxes.txt
    COCO:   root/images/<key>.jpg            (shapes: .png)
    both:   root/text/<key>.txt              >= captions_per_image non-empty lines
            root/{train,test}/filenames.pickle, optional {train,test}/class_info.pickle
            root/captions.pickle             [train_caps, test_caps, ixtoword, wordtoix];
                                             built once from text/ when missing

An item is (images per stage in [-1, 1], caption padded with 0 to ``words_num``, its length,
class id, key). The image pipeline is the reference's: CUB bounding-box crop, resize the shorter
side to ``size * 76 / 64``, random crop to ``size``, optional horizontal flip, then a bilinear
pyramid of ``image_sizes``. A caption longer than ``words_num`` is sub-sampled keeping word order.
An unreadable image makes its item ``None``; :func:`collate` drops it and counts it.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from dmgan.config import Config

EXPECTED_LAYOUT = """expected the AttnGAN layout:
  <root>/{train,test}/filenames.pickle      list of image keys per split
  <root>/{train,test}/class_info.pickle     (optional) class id per key
  <root>/text/<key>.txt                     captions, one per line
  <root>/images/<key>.jpg                   COCO-style images, or for CUB:
  <root>/CUB_200_2011/images/<key>.jpg, images.txt, bounding_boxes.txt
  <root>/captions.pickle                    (built from text/ when missing)"""

_TOKEN = re.compile(r"\w+")


class DatasetLayoutError(FileNotFoundError):
    """A dataset folder is missing or incomplete; the message lists the expected layout."""


def tokenize(caption: str) -> list[str]:
    """The reference's tokenisation: RegexpTokenizer(r'\\w+') on lower-cased ASCII text."""
    return _TOKEN.findall(caption.lower().encode("ascii", "ignore").decode("ascii"))


def subsample_caption(tokens: Sequence[int], words_num: int, rng: random.Random) -> tuple[list[int], int]:
    """Pad with 0 to ``words_num`` or, when longer, keep a random ordered subset of ``words_num``.

    >>> subsample_caption([5, 6], 4, random.Random(0))
    ([5, 6, 0, 0], 2)
    >>> kept, n = subsample_caption(list(range(1, 11)), 4, random.Random(0))
    >>> n, kept == sorted(kept)
    (4, True)
    """
    tokens = list(tokens)
    if len(tokens) <= words_num:
        return tokens + [0] * (words_num - len(tokens)), len(tokens)
    keep = sorted(rng.sample(range(len(tokens)), words_num))
    return [tokens[i] for i in keep], words_num


@dataclass
class Vocabulary:
    ixtoword: dict[int, str]
    wordtoix: dict[str, int]

    def __len__(self) -> int:
        return len(self.ixtoword)

    def encode(self, caption: str) -> tuple[list[int], list[str]]:
        """Word indices of a caption's known words, and the unknown words by name."""
        known, unknown = [], []
        for word in tokenize(caption):
            (known.append(self.wordtoix[word]) if word in self.wordtoix else unknown.append(word))
        return known, unknown

    def decode(self, indices: Sequence[int]) -> str:
        return " ".join(self.ixtoword[int(i)] for i in indices if int(i) != 0)

    def as_list(self) -> list[str]:
        """The words by index: the form checkpoints and exports store.

        >>> Vocabulary.from_list(["<end>", "red", "circle"]).as_list()
        ['<end>', 'red', 'circle']
        """
        return [self.ixtoword[i] for i in range(len(self.ixtoword))]

    @classmethod
    def from_list(cls, words: Sequence[str]) -> Vocabulary:
        """The vocabulary whose word of index i is ``words[i]``."""
        return cls(dict(enumerate(words)), {w: i for i, w in enumerate(words)})


def check_vocabulary(vocab_size: int, encoder_vocab_size: int, source: str) -> None:
    """The reference's most reported failure: captions.pickle and the text encoder disagree."""
    if vocab_size != encoder_vocab_size:
        raise ValueError(
            f"vocabulary mismatch: {source} has {vocab_size} words but the text encoder was "
            f"trained with {encoder_vocab_size}. Use the captions.pickle shipped with that encoder "
            "(a captions.pickle rebuilt from the text files gets a different vocabulary)."
        )


def _read_pickle(path: Path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")  # the reference wrote protocol-2 (Python 2) pickles


def read_captions(path: Path, captions_per_image: int) -> list[list[str]]:
    """The first ``captions_per_image`` non-empty captions of a file, tokenized."""
    if not path.is_file():
        raise DatasetLayoutError(f"caption file missing: {path}\n{EXPECTED_LAYOUT}")
    lines = path.read_bytes().decode("utf8", errors="ignore").replace("\ufffd\ufffd", " ").splitlines()
    captions = [tokenize(line) for line in lines]
    captions = [c for c in captions if c][:captions_per_image]
    if len(captions) < captions_per_image:
        raise ValueError(f"{path} has {len(captions)} non-empty captions, {captions_per_image} are needed")
    return captions


def build_captions(root: Path, splits: dict[str, list[str]], captions_per_image: int) -> list:
    """[train_caps, test_caps, ixtoword, wordtoix] as the reference builds them (index 0 = <end>)."""
    tokens = {
        s: [c for key in keys for c in read_captions(root / "text" / f"{key}.txt", captions_per_image)]
        for s, keys in splits.items()
    }
    words = sorted({w for caps in tokens.values() for c in caps for w in c})
    ixtoword = {0: "<end>", **{i: w for i, w in enumerate(words, start=1)}}
    wordtoix = {w: i for i, w in ixtoword.items()}
    encoded = {s: [[wordtoix[w] for w in c] for c in caps] for s, caps in tokens.items()}
    return [encoded["train"], encoded["test"], ixtoword, wordtoix]


def load_captions(root: Path, captions_per_image: int) -> tuple[dict[str, list[list[int]]], Vocabulary]:
    """Read ``captions.pickle`` (or build and write it once) → captions per split, vocabulary."""
    splits = {s: list(_read_pickle(root / s / "filenames.pickle")) for s in ("train", "test")}
    path = root / "captions.pickle"
    if not path.is_file():
        data = build_captions(root, splits, captions_per_image)
        tmp = path.with_name(f"captions.{os.getpid()}.tmp")  # processes may race to build it
        with open(tmp, "wb") as f:
            pickle.dump(data, f, protocol=2)
        tmp.replace(path)
    train_caps, test_caps, ixtoword, wordtoix = _read_pickle(path)
    for split, caps in (("train", train_caps), ("test", test_caps)):
        if len(caps) != len(splits[split]) * captions_per_image:
            raise ValueError(
                f"{path}: {len(caps)} {split} captions for {len(splits[split])} images x "
                f"{captions_per_image} captions; the pickle does not match {split}/filenames.pickle"
            )
    vocab = Vocabulary({int(k): v for k, v in dict(ixtoword).items()}, dict(wordtoix))
    return {"train": train_caps, "test": test_caps}, vocab


def _read_bounding_boxes(cub: Path) -> dict[str, tuple[float, float, float, float]]:
    """key (``<class>/<name>``) → x, y, w, h from CUB's images.txt and bounding_boxes.txt."""
    names = dict(line.split() for line in (cub / "images.txt").read_text().splitlines() if line.strip())
    boxes = {}
    for line in (cub / "bounding_boxes.txt").read_text().splitlines():
        if line.strip():
            idx, *xywh = line.split()
            boxes[names[idx].rsplit(".", 1)[0]] = tuple(float(v) for v in xywh)
    return boxes


def crop_to_box(image: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
    """The reference's CUB crop: a square of side 1.5 max(w, h) centred on the box, clipped."""
    x, y, w, h = box
    r = int(np.maximum(w, h) * 0.75)
    cx, cy = int((2 * x + w) / 2), int((2 * y + h) / 2)
    width, height = image.size
    return image.crop((max(0, cx - r), max(0, cy - r), min(width, cx + r), min(height, cy + r)))


class TextImageDataset(Dataset):
    """One split of an AttnGAN-layout dataset; see the module docstring."""

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        image_sizes: Sequence[int],
        words_num: int,
        captions_per_image: int,
        *,
        flip: bool = True,
        random_crop: bool = True,
        seed: int = 0,
        cache_bytes: int = 256 * 2**20,
    ) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.root = Path(root)
        required = [self.root / s / "filenames.pickle" for s in ("train", "test")] + [self.root / "text"]
        missing = [str(p) for p in required if not p.exists()]
        if not self.root.is_dir() or missing:
            raise DatasetLayoutError(
                f"dataset folder {self.root} is missing or incomplete"
                + (f" (missing: {', '.join(missing)})" if missing else "")
                + f"\n{EXPECTED_LAYOUT}"
            )
        self.split = split
        self.image_sizes = tuple(image_sizes)
        self.words_num = words_num
        self.captions_per_image = captions_per_image
        self.flip = flip
        self.random_crop = random_crop
        self.seed = seed
        self.epoch = 0
        # Decoded, resized images by key, up to cache_bytes (the shapes data fits whole): decoding
        # and resizing were half of an item's time in a CPU run (0.59 -> 0.3 ms for shapes). Per
        # process, so with DataLoader workers each worker fills its own.
        self.cache_bytes = cache_bytes
        self._cache: dict[str, Image.Image] = {}
        self._cached_bytes = 0
        self.keys = list(_read_pickle(self.root / split / "filenames.pickle"))
        class_file = self.root / split / "class_info.pickle"
        self.class_ids = (
            [int(c) for c in _read_pickle(class_file)]
            if class_file.is_file()
            else list(range(len(self.keys)))
        )  # no class file: every image its own class (no same-class masking), as the reference
        captions, self.vocab = load_captions(self.root, captions_per_image)
        self.captions = captions[split]
        cub = self.root / "CUB_200_2011"
        self.image_dir = cub / "images" if cub.is_dir() else self.root / "images"
        self.boxes = _read_bounding_boxes(cub) if cub.is_dir() else None
        if not self.image_dir.is_dir():
            raise DatasetLayoutError(f"image folder missing: {self.image_dir}\n{EXPECTED_LAYOUT}")

    def __len__(self) -> int:
        return len(self.keys)

    def image_path(self, key: str) -> Path:
        for ext in (".jpg", ".png", ".jpeg"):
            path = self.image_dir / f"{key}{ext}"
            if path.is_file():
                return path
        return self.image_dir / f"{key}.jpg"

    def load_image(self, key: str) -> Image.Image:
        with Image.open(self.image_path(key)) as image:
            image = image.convert("RGB")
        if self.boxes is not None:
            image = crop_to_box(image, self.boxes[key])
        return image

    def set_epoch(self, epoch: int) -> None:
        """Item randomness (crop, flip, caption choice) is a function of (seed, epoch, index), so
        it is the same in any worker and after a resume."""
        self.epoch = epoch

    def item_rng(self, index: int) -> random.Random:
        return random.Random(f"{self.seed}/{self.epoch}/{index}")

    def resize_for_crop(self, image: Image.Image) -> Image.Image:
        """Shorter side to size·76/64, the reference's load size before its random crop."""
        load = int(self.image_sizes[-1] * 76 / 64)
        w, h = image.size
        scale = load / min(w, h)
        return image.resize((max(load, round(w * scale)), max(load, round(h * scale))), Image.BILINEAR)

    def resized_image(self, key: str) -> Image.Image:
        """:meth:`resize_for_crop` of :meth:`load_image`, memoised while the cache has room."""
        image = self._cache.get(key)
        if image is None:
            image = self.resize_for_crop(self.load_image(key))
            size = image.width * image.height * len(image.getbands())
            if self._cached_bytes + size <= self.cache_bytes:
                self._cache[key] = image
                self._cached_bytes += size
        return image

    def crop_and_pyramid(self, image: Image.Image, rng: random.Random) -> list[Tensor]:
        """A :meth:`resize_for_crop` image → crop to size (random or centre) → flip → pyramid in
        [-1, 1]."""
        size = self.image_sizes[-1]
        w, h = image.size
        if self.random_crop:
            left, top = rng.randint(0, w - size), rng.randint(0, h - size)
        else:
            left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
        if self.flip and rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        pyramid = []
        for s in self.image_sizes:
            scaled = image if s == size else image.resize((s, s), Image.BILINEAR)
            array = torch.from_numpy(np.asarray(scaled, dtype=np.float32).copy())
            pyramid.append(array.permute(2, 0, 1) / 127.5 - 1.0)
        return pyramid

    def caption(self, index: int, rng: random.Random, which: int | None = None) -> tuple[Tensor, int]:
        """Caption ``which`` (random when None) of image ``index``, sub-sampled/padded."""
        which = rng.randrange(self.captions_per_image) if which is None else which
        tokens = self.captions[index * self.captions_per_image + which]
        if not tokens:
            raise ValueError(f"empty caption {which} of {self.keys[index]}")
        padded, length = subsample_caption(tokens, self.words_num, rng)
        return torch.tensor(padded, dtype=torch.long), length

    def __getitem__(self, index: int):
        key, rng = self.keys[index], self.item_rng(index)
        try:
            images = self.crop_and_pyramid(self.resized_image(key), rng)
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            warnings.warn(f"skipping unreadable image {self.image_path(key)}: {e}", stacklevel=2)
            return None
        caption, length = self.caption(index, rng)
        return images, caption, length, self.class_ids[index], key


def dataset_for(
    cfg: Config,
    root: str | os.PathLike,
    split: str,
    *,
    train: bool,
    seed: int = 0,
    words_num: int | None = None,
) -> TextImageDataset:
    """A split as a config trains (``train``: random crop, flip) or evaluates it (centre crop).

    Flipping would swap left and right in the ``shapes`` captions, so only the real datasets flip
    (as the reference does). ``words_num`` defaults to the config's training caption length.
    """
    return TextImageDataset(
        root,
        split,
        cfg.model.image_sizes,
        words_num or cfg.text.words_num,
        cfg.text.captions_per_image,
        flip=train and cfg.name != "shapes",
        random_crop=train,
        seed=seed,
    )


@dataclass
class Batch:
    """Images per stage (each B x 3 x S x S in [-1, 1]), captions B x L, lengths B, classes B;
    ``skipped`` counts the unreadable images dropped from this batch. ``host_cap_lens`` keeps the
    lengths on the host after :meth:`to` moved the rest (the text encoder packs with them)."""

    images: list[Tensor]
    captions: Tensor
    cap_lens: Tensor
    class_ids: Tensor | None = None
    keys: list[str] | None = None
    skipped: int = 0
    host_cap_lens: Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        move = lambda t: t.to(device, non_blocking=True)
        return Batch(
            [move(i) for i in self.images],
            move(self.captions),
            move(self.cap_lens),
            None if self.class_ids is None else move(self.class_ids),
            self.keys,
            self.skipped,
            self.cap_lens.cpu() if self.host_cap_lens is None else self.host_cap_lens,
        )

    def split(self, parts: int) -> list[Batch]:
        """``parts`` micro-batches of equal size, in order."""
        size = len(self.captions)
        if parts < 1 or size % parts:
            raise ValueError(f"a batch of {size} does not split into {parts} equal micro-batches")
        n = size // parts
        cut = lambda t, i: None if t is None else t[i * n : (i + 1) * n]
        return [
            Batch(
                [image[i * n : (i + 1) * n] for image in self.images],
                cut(self.captions, i),
                cut(self.cap_lens, i),
                cut(self.class_ids, i),
                cut(self.keys, i),
                0,
                cut(self.host_cap_lens, i),
            )
            for i in range(parts)
        ]


def collate(items: list) -> Batch | None:
    """Stack items into a :class:`Batch`, dropping (and counting) unreadable ones."""
    good = [item for item in items if item is not None]
    if not good:
        return Batch(
            [], torch.empty(0, 0, dtype=torch.long), torch.empty(0, dtype=torch.long), skipped=len(items)
        )
    images, captions, lengths, classes, keys = zip(*good)
    return Batch(
        images=[torch.stack(stage) for stage in zip(*images)],
        captions=torch.stack(captions),
        cap_lens=torch.tensor(lengths, dtype=torch.long),
        class_ids=torch.tensor(classes, dtype=torch.long),
        keys=list(keys),
        skipped=len(items) - len(good),
    )
