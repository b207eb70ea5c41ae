"""Evaluate a checkpoint, or a folder of images, under a named protocol.

    python -m dmgan.evaluate runs/shapes/checkpoints/latest.pt --num-images 2000
    python -m dmgan.evaluate netG.pt --data-dir data/birds --protocol dmgan-paper \
        --inception-weights inception_v3_google-1a9a5a14.pth --is-classifier cub_inception.pt
    python -m dmgan.evaluate CHECKPOINT --save-images generated/      # the images it scored, too
    python -m dmgan.evaluate --images other_model/ --data-dir data/birds --preset bird   # any folder

A checkpoint generates images cycling over the test images with a random caption each pass (the
reference's sampling); a folder's images (PNG / JPEG, any size) are scored as they are. The
protocol (:data:`PROTOCOLS`) fixes the image count, the feature network and its statistics file;
one JSON records every metric and every setting: FID, KID, precision / recall / density /
coverage, IS (with a classifier), R-precision, and on the built-in shapes data caption accuracy.
See :mod:`dmgan.metrics` for the networks and docs/evaluation.md for what each protocol's
numbers compare to.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dmgan import metrics
from dmgan.cli import HelpFormatter, add_shared_flags
from dmgan.config import Config
from dmgan.data import TextImageDataset, dataset_for
from dmgan.data.shapes import default_root, is_shapes_dataset
from dmgan.pipeline import Captions, TextToImage, report_path
from dmgan.progress import progress as progress_display
from dmgan.provenance import environment_record
from dmgan.visualize import write_captions, write_numbered_images

if TYPE_CHECKING:
    from dmgan.attributes import AttributeClassifier

BLOCK = 1024  # images whose captions are encoded at once when scoring (R-precision, retrieval)


@dataclass(frozen=True)
class Protocol:
    """How the image metrics are computed, so that two numbers under one protocol compare."""

    name: str
    network: str  # "tf-2015-inception" or "torchvision-inception-v3"
    resize: str  # to 299 x 299: "bilinear" (pytorch-fid's) or "pil-bicubic" (clean-fid's); metrics.RESIZES
    num_images: int | None  # None: --num-images chooses (default 2,000)
    comparable_to: str

    @property
    def features_tag(self) -> str:
        """What names its real-feature file: the network, and the resize unless bilinear (so the
        files written before protocols named their resize still serve)."""
        return self.network if self.resize == "bilinear" else f"{self.network}-{self.resize}"


# The names follow clean-fid's modes (legacy_pytorch, clean), which StudioGAN's --resize_fn
# echoes (legacy, clean); see docs/evaluation.md for why this one is not "legacy-tf".
PROTOCOLS = {
    "legacy-pytorch": Protocol(
        "legacy-pytorch",
        "tf-2015-inception",
        "bilinear",
        None,
        "FID of pytorch-fid and of clean-fid's mode='legacy_pytorch' (the same resize and the same "
        "2015 Inception weights), of TTUR's TensorFlow code up to its resize (TF1's bilinear op), "
        "and KID of torch-fidelity / clean-fid on that network; not clean-fid's default mode "
        "('clean-fid' here), nor the DM-GAN paper's FID column ('dmgan-paper')",
    ),
    "clean-fid": Protocol(
        "clean-fid",
        "tf-2015-inception",
        "pil-bicubic",
        None,
        "FID and KID of clean-fid's default mode='clean' (PIL's antialiased bicubic resize of the "
        "8-bit images, the same 2015 Inception) and of StudioGAN with --resize_fn clean; none of "
        "DM-GAN's published figures",
    ),
    "dmgan-paper": Protocol(
        "dmgan-paper",
        "torchvision-inception-v3",
        "bilinear",
        30_000,
        "the FID column of the DM-GAN paper (CVPR 2019) and of papers evaluated with the reference "
        "code's torchvision Inception-v3 pool3 features on 30,000 images",
    ),
}
DEFAULT_PROTOCOL = "legacy-pytorch"
# Old names, still accepted (commands and evaluation JSONs written before the rename) with a
# warning that names the new one. "clean" measured with the legacy resize, never clean-fid's: it
# keeps that meaning, so an old command gives the numbers it gave before.
RENAMED_PROTOCOLS = {"clean": "legacy-pytorch"}


def protocol_named(name: str, warn: bool = True) -> Protocol:
    """The protocol of this name, or of an old name (:data:`RENAMED_PROTOCOLS`, with a
    FutureWarning when ``warn``)."""
    if name in RENAMED_PROTOCOLS:
        new = RENAMED_PROTOCOLS[name]
        if warn:
            warnings.warn(
                f"--protocol {name} is deprecated: it is the pytorch-fid-style bilinear resize without "
                f"antialiasing, which clean-fid and StudioGAN call legacy, now named {new} (the same "
                "numbers); clean-fid's antialiased resize is --protocol clean-fid",
                FutureWarning,
                stacklevel=2,
            )
        name = new
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}: one of {', '.join(sorted(PROTOCOLS))}")
    return PROTOCOLS[name]


@dataclass(frozen=True)
class PublishedFigure:
    """A published number of DM-GAN's, and the protocol and image count that measure as it did."""

    source: str
    metric: str
    values: dict[str, float]  # per dataset
    protocol: str
    num_images: int
    note: str = ""


PUBLISHED_FIGURES = (
    PublishedFigure(
        "DM-GAN paper (Zhu et al., CVPR 2019), Table 1",
        "FID",
        {"CUB": 16.09, "COCO": 32.64},
        "dmgan-paper",
        30_000,
        "the reference's eval/FID/fid_score.py: torchvision's ImageNet Inception-v3",
    ),
    PublishedFigure(
        "reference README (github.com/MinfengZhu/DM-GAN), released models, 'Pytorch FID'",
        "FID",
        {"CUB": 15.34},
        "dmgan-paper",
        30_000,
    ),
    PublishedFigure(
        "reference README (github.com/MinfengZhu/DM-GAN), released models, 'TF FID'",
        "FID",
        {"CUB": 11.91, "COCO": 24.24},
        "legacy-pytorch",
        30_000,
        "TTUR's TensorFlow code: the same 2015 Inception, resized inside its graph by TF1's bilinear "
        "op (no half-pixel centres), which legacy-pytorch's bilinear resize approximates",
    ),
)

RESIZES = {
    "bilinear": "then to 299 x 299 with torch's bilinear interpolation on floats, no antialiasing "
    "(pytorch-fid's resize; clean-fid's legacy_pytorch)",
    "pil-bicubic": "then each channel of the 8-bit image to 299 x 299 as a float image with PIL's "
    "bicubic filter, antialiased, clipped to [0, 255] and not rounded (clean-fid's mode='clean')",
}
CAPTIONS = "the images cycle over the test images, one random caption of each image per pass"


def protocol_record(
    protocol: Protocol,
    num_images: int,
    features_file: Path | None,
    network_file: Path | None = None,
    requested_as: str | None = None,
) -> dict[str, Any]:
    """What the JSON says of the protocol the numbers follow: the network and its file's SHA-256
    (when the image metrics ran), how images are resized, the real features, and which published
    figures these numbers compare with (``published_figures``: each with the protocol and image
    count it needs, and whether this evaluation has them)."""
    record: dict[str, Any] = {
        "name": protocol.name,
        "network": protocol.network,
        "network_file": None if network_file is None else str(network_file),
        "network_sha256": None if network_file is None else network_sha256(network_file),
        "num_images": num_images,
        "split": "test",
        "captions": CAPTIONS,
        "resize": "images at the preset's last stage size (a folder's resized to it with PIL's bicubic "
        "filter, generated ones rounded to 8 bits as a saved PNG would be), " + RESIZES[protocol.resize],
        "real_features": None if features_file is None else str(features_file),
        "comparable_to": protocol.comparable_to,
        "published_figures": [
            {
                **asdict(figure),
                "comparable": figure.protocol == protocol.name and figure.num_images == num_images,
            }
            for figure in PUBLISHED_FIGURES
        ],
    }
    if requested_as is not None and requested_as != protocol.name:
        record["requested_as"] = requested_as  # an old name (RENAMED_PROTOCOLS)
    return record


def network_file(protocol: Protocol, inception_weights: str | os.PathLike | None) -> Path:
    """The file the protocol's feature network is loaded from."""
    if protocol.network == "tf-2015-inception":
        return metrics.fid_network_path()
    if inception_weights is None:
        raise SystemExit(
            f"--protocol {protocol.name} needs torchvision's ImageNet Inception-v3 weights: pass "
            "--inception-weights inception_v3_google-0cc3c7bd.pth (from torchvision; nothing is downloaded here)"
        )
    return Path(inception_weights)


def feature_network(protocol: Protocol, inception_weights: str | os.PathLike | None) -> torch.nn.Module:
    if protocol.network == "tf-2015-inception":
        return metrics.InceptionFeatures(protocol.resize)
    return metrics.TorchvisionInceptionFeatures(network_file(protocol, inception_weights))


def network_sha256(path: Path) -> str:
    """SHA-256 of a network file, hashed once per process while the file is unchanged (the
    trainer evaluates many times)."""
    stat = path.stat()
    return _sha256_of(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def quantized(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] rounded to the 256 levels a saved 8-bit image holds."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


# Images per forward of the feature network. Its activations, not the images, set a scoring run's
# peak memory: the TF Inception holds about 14 MB an image in its widest layers at 299 x 299.
FEATURE_BATCH = 8


@torch.no_grad()
def features_of(network: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The feature network's output for ``images`` (N x 3 x S x S -> N x F, float32 on the CPU),
    fed :data:`FEATURE_BATCH` images at a time and the heap's freed pages handed back after each
    forward, so that one forward's activations are all a batch of any size adds to the peak."""
    device = next(network.parameters()).device
    parts = []
    for part in images.split(FEATURE_BATCH):
        parts.append(network(part.to(device)).float().cpu())
        release_freed_memory()
    return torch.cat(parts)


def real_features(
    dataset: TextImageDataset,
    network: torch.nn.Module,
    path: Path,
    batch_size: int = 32,
    progress: bool = True,
    stamp: dict[str, str] | None = None,
) -> torch.Tensor:
    """The pool3 features of every real test image (N x 2048), computed once and kept in ``path``
    with ``stamp`` (what computed them: the protocol's resize, the network file's SHA-256). A file
    whose stamp differs is refused; one without a stamp (dmgan before 2026-12-03) is taken."""
    stamp = stamp or {}
    if path.is_file():
        with np.load(path) as data:
            if "features" not in data:
                raise SystemExit(f"{path} holds no 'features' (statistics of an older dmgan?): delete it")
            for key, value in stamp.items():
                if key in data and str(data[key]) != value:
                    raise SystemExit(
                        f"{path} holds real features computed with {key} {data[key]}, this protocol "
                        f"needs {value}: delete it or name another file with --real-features"
                    )
            return torch.from_numpy(data["features"])
    parts = [
        features_of(network, real_images(dataset, chunk.tolist()))
        for chunk in progress_display(
            torch.arange(len(dataset)).split(batch_size), desc="real features", enabled=progress
        )
    ]
    features = torch.cat(parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, features=features.numpy(), **{k: np.array(v) for k, v in stamp.items()})
    tmp.replace(path)
    return features


def real_features_for(
    protocol: Protocol,
    dataset: TextImageDataset,
    network: torch.nn.Module,
    network_path: Path,
    features_file: str | Path | None,
    batch_size: int,
    progress: bool,
) -> tuple[torch.Tensor, Path]:
    """:func:`real_features` under ``protocol``: in ``features_file``, else in the data folder
    as ``features_<network[-resize]>_test_<size>.npz``; and the file's path."""
    size = dataset.image_sizes[-1]
    path = (
        Path(features_file)
        if features_file
        else dataset.root / f"features_{protocol.features_tag}_test_{size}.npz"
    )
    stamp = {"resize": protocol.resize, "network_sha256": network_sha256(network_path)}
    return real_features(dataset, network, path, batch_size, progress, stamp), path


def image_metrics(real: torch.Tensor, fake: torch.Tensor, seed: int = 0) -> dict[str, Any]:
    """FID, KID and precision / recall / density / coverage of generated against real features."""
    return {
        "fid": metrics.fid_from_features(real, fake),
        "kid": metrics.kid_from_features(real, fake, seed=seed),
        **metrics.precision_recall(real, fake),
    }


def image_files(folder: Path) -> list[Path]:
    """Every PNG / JPEG of ``folder`` in name order. Each file's header is read here, so a file
    that is no image is named before any network runs (a damaged image body is named when its
    batch is read)."""
    from PIL import Image, UnidentifiedImageError

    if not folder.is_dir():
        raise SystemExit(f"--images: {folder} is not a folder")
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise SystemExit(f"--images: {folder} holds no PNG or JPEG image")
    for f in files:
        try:
            with Image.open(f):
                pass
        except (UnidentifiedImageError, OSError) as e:
            raise SystemExit(f"--images: {f} is not a readable image ({e})") from None
    return files


class FolderImages(torch.utils.data.Dataset):
    """The images of a folder, one at a time (in DataLoader workers): each as 3 x size x size
    uint8, resized with PIL's bicubic filter when it has another size, with ``""`` or why it could
    not be read. The reason travels as data, not as an exception, so the main process can stop
    with it as it is, from a worker or not."""

    def __init__(self, files: Sequence[Path], size: int) -> None:
        self.files, self.size = list(files), size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        from PIL import Image, UnidentifiedImageError

        path = self.files[index]
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            empty = torch.zeros(3, self.size, self.size, dtype=torch.uint8)
            return empty, f"--images: {path} is not a readable image ({e})"
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1), ""


def default_workers() -> int:
    """DataLoader workers that read a folder: a few, leaving one core to the feature network."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(0, min(4, cores - 1))


def folder_batches(
    files: Sequence[Path], size: int, batch_size: int = 32, workers: int | None = None
) -> Iterator[torch.Tensor]:
    """The images of ``files`` in order, ``batch_size`` at a time (B x 3 x size x size in
    [-1, 1]), read by ``workers`` DataLoader processes (None: :func:`default_workers`; 0: this
    one): no more than a few batches of a folder are in memory at once."""
    workers = default_workers() if workers is None else workers
    if workers < 0:
        raise SystemExit(f"--workers must be 0 or more, got {workers}")
    loader = torch.utils.data.DataLoader(
        FolderImages(files, size), batch_size=batch_size, shuffle=False, num_workers=workers
    )
    for pixels, errors in loader:
        failed = next((e for e in errors if e), None)
        if failed:
            raise SystemExit(failed)
        yield pixels.float() / 127.5 - 1


def evaluation_split(cfg: Config, root: Path) -> TextImageDataset:
    """The test split as evaluation reads it: centre crop, no flip, evaluation caption length."""
    return dataset_for(cfg, root, "test", train=False, words_num=cfg.text.eval_words_num)


def real_images(dataset: TextImageDataset, indices: Sequence[int] | None = None) -> torch.Tensor:
    """Last-stage real images (N x 3 x S x S in [-1, 1]) of a split, centre-cropped."""
    indices = range(len(dataset)) if indices is None else indices
    return torch.stack(
        [
            dataset.crop_and_pyramid(dataset.resized_image(dataset.keys[i]), dataset.item_rng(i))[-1]
            for i in indices
        ]
    )


def caption_plan(dataset: TextImageDataset, num_images: int, seed: int) -> tuple[list[int], Captions]:
    """Which test image each generated image belongs to, and its caption (random per pass)."""
    rng = random.Random(seed)
    owners = [i % len(dataset) for i in range(num_images)]
    return owners, Captions.from_pairs([dataset.caption(i, rng) for i in owners], dataset.vocab)


@torch.no_grad()
def all_sentence_codes(pipe: TextToImage, dataset: TextImageDataset, batch_size: int = 256) -> torch.Tensor:
    """Sentence code of every test caption (N_images x captions_per_image x D), for R-precision."""
    rng = random.Random(0)
    pairs = [
        dataset.caption(i, rng, which=j)
        for i in range(len(dataset))
        for j in range(dataset.captions_per_image)
    ]
    indices, lengths = torch.stack([c for c, _ in pairs]), torch.tensor([n for _, n in pairs])
    codes = [
        pipe.encode(indices[i : i + batch_size], lengths[i : i + batch_size])[1].cpu()
        for i in range(0, len(pairs), batch_size)
    ]
    return torch.cat(codes).view(len(dataset), dataset.captions_per_image, -1)


def mismatched_codes(
    codes: torch.Tensor, owners: list[int], class_ids: list[int], count: int, generator: torch.Generator
) -> torch.Tensor:
    """For each generated image, ``count`` sentence codes of captions of images of other classes."""
    classes = torch.tensor(class_ids)
    per_image = codes.shape[1]
    chosen = torch.empty(len(owners), count, dtype=torch.long)  # rows of codes.flatten(0, 1)
    for n, owner in enumerate(owners):
        others = (classes != classes[owner]).nonzero().view(-1)
        if len(others) == 0:
            raise ValueError("R-precision needs test images of more than one class")
        pick = others[torch.randint(len(others), (count,), generator=generator)]
        chosen[n] = pick * per_image + torch.randint(per_image, (count,), generator=generator)
    return codes.flatten(0, 1)[chosen]  # one allocation, not one piece per image and a stacked copy


def r_precision_hits(
    pipe: TextToImage,
    dataset: TextImageDataset,
    owners: list[int],
    captions: Captions,
    image_codes: torch.Tensor,
    generator: torch.Generator,
    block: int = BLOCK,
) -> torch.Tensor:
    """Per generated image, whether R-precision counts a hit (:func:`metrics.r_precision_hits`),
    ``block`` images at a time: the 99 mismatched codes of every image at once would be
    N x 99 x D (2.5 GB at 30,000 images of D 256). The mismatched captions are drawn from
    ``generator`` image by image in order, as when they were drawn all at once."""
    codes = all_sentence_codes(pipe, dataset)
    hits = []
    for start in range(0, len(owners), block):
        part = captions[start : start + block]
        true_codes = pipe.encode(part.indices, part.lengths)[1].float().cpu()
        mismatched = mismatched_codes(codes, owners[start : start + block], dataset.class_ids, 99, generator)
        hits.append(metrics.r_precision_hits(image_codes[start : start + block], true_codes, mismatched))
        del mismatched
        release_freed_memory()  # else each block (block x 99 x D floats) lands on a heap the last one left
    return torch.cat(hits)


@functools.cache
def _glibc(name: str) -> Callable[..., int] | None:
    """glibc's function ``name`` (``malloc_trim``, ``mallopt``), or None where the C library has
    none (musl, macOS)."""
    import ctypes

    try:
        return getattr(ctypes.CDLL(None), name)
    except (AttributeError, OSError):
        return None


def release_freed_memory() -> None:
    """Hand the heap pages that freed tensors left back to the OS. Between batches, glibc keeps
    them: scoring a folder with a DataLoader worker grew by 16 MB a batch of 32 (the Inception's
    freed activations; flat without the worker, or with this call), so a 10,000-image folder
    would have needed gigabytes. A few milliseconds a batch."""
    trim = _glibc("malloc_trim")
    if trim is not None:
        trim(0)


def map_large_blocks_apart(threshold: int = 4 << 20) -> None:
    """Have glibc give every block of ``threshold`` bytes or more a mapping of its own, unmapped
    when it is freed. By default glibc raises that threshold each time a mapped block is freed (up
    to 32 MB), and from then on the feature network's activations come from the heap, whose freed
    pages fragment and only go back at a trim: a scoring run's peak then creeps up batch after
    batch. The setting holds for the rest of the process: ``python -m dmgan.evaluate`` sets it once."""
    mallopt = _glibc("mallopt")
    if mallopt is not None:
        M_MMAP_THRESHOLD = -3
        mallopt(M_MMAP_THRESHOLD, threshold)


class Rows:
    """One per-image quantity (codes, features, probabilities, class indices) written a batch at a
    time into a single tensor, allocated when the first batch shows its shape: no list of
    per-batch pieces, each pinning heap pages between the freed images of its batch (the
    allocator then keeps them), and no concatenation into a second copy at the end."""

    def __init__(self, total: int) -> None:
        self.total, self.data = total, None

    def put(self, start: int, rows: torch.Tensor) -> None:
        if self.data is None:
            self.data = rows.new_empty((self.total, *rows.shape[1:]))
        self.data[start : start + len(rows)] = rows


@dataclass
class Generated:
    """What scoring needs of the images a model generated, a few numbers per image and never the
    images: per image, the test image it belongs to and its caption; the DAMSM image encoder's
    global codes; the feature network's features and the IS classifier's probabilities (when
    computed); on the shapes data, the attribute classifier's reading (when computed)."""

    owners: list[int]
    captions: Captions
    image_codes: torch.Tensor  # N x D
    features: torch.Tensor | None = None  # N x F
    probs: torch.Tensor | None = None  # N x classes
    attributes: dict[str, torch.Tensor] | None = None  # per attribute, N class indices
    layouts: list[dict[str, torch.Tensor]] | None = None  # per stage, attributes.read_layout


def generate_and_collect(
    pipe: TextToImage,
    dataset: TextImageDataset,
    num_images: int,
    *,
    network: torch.nn.Module | None = None,
    classifier: torch.nn.Module | None = None,
    attribute_classifier: AttributeClassifier | None = None,
    save_to: Path | None = None,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
) -> Generated:
    """Generate ``num_images`` images (cycling over the test images, a random caption each pass)
    a batch at a time, keeping of each batch only what the metrics read, and writing it to
    ``save_to`` (``00000.png``, ..., then ``captions.txt``) when given: memory does not grow
    with the images (30,000 x 256² in float32 would be 24 GB)."""
    from dmgan.attributes import ATTRIBUTES, read_layout

    owners, captions = caption_plan(dataset, num_images, seed)
    codes, features, probs = Rows(num_images), Rows(num_images), Rows(num_images)
    readings = {name: Rows(num_images) for name in ATTRIBUTES}
    layouts: list[dict[str, Rows]] = []
    for start in progress_display(range(0, num_images, batch_size), desc="generate", enabled=progress):
        stages, _ = pipe.generate(
            captions[start : start + batch_size], seed=seed * 1_000_003 + start, batch_size=batch_size
        )
        batch = quantized(stages[-1])  # what a saved image holds: a folder of them scores the same
        if attribute_classifier is not None:  # the shapes data: every stage's layout, for agreement
            for k, stage in enumerate(stages):
                if len(layouts) <= k:
                    layouts.append({})
                for key, value in read_layout(quantized(stage)).items():
                    layouts[k].setdefault(key, Rows(num_images)).put(start, value)
        del stages
        with torch.no_grad():
            codes.put(start, pipe.image_encoder(batch.to(pipe.device))[1].float().cpu())
        if network is not None:
            features.put(start, features_of(network, batch))
        if classifier is not None:
            probs.put(start, metrics.classifier_probs(classifier, batch))
        if attribute_classifier is not None:
            for name, predicted in attribute_classifier.predict(batch).items():
                readings[name].put(start, predicted)
        if save_to is not None:
            write_numbered_images(batch, save_to, start)
        release_freed_memory()
    if save_to is not None:  # last: a folder with captions.txt holds every image
        write_captions(captions.texts, save_to)
    attributes = None if attribute_classifier is None else {name: r.data for name, r in readings.items()}
    assert codes.data is not None  # num_images >= 1
    read = [{key: rows.data for key, rows in stage.items()} for stage in layouts] or None
    return Generated(owners, captions, codes.data, features.data, probs.data, attributes, read)  # type: ignore[arg-type]


def score(
    pipe: TextToImage,
    dataset: TextImageDataset,
    root: Path,
    generated: Generated,
    real: torch.Tensor | None = None,
    *,
    is_classifier: str | Path | None = None,
    attribute_classifier: AttributeClassifier | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Every metric of ``generated`` that this data supports: the image metrics against ``real``
    features (when given), IS (when a classifier was run), R-precision (test images of several
    classes), and on the shapes data caption accuracy (when ``attribute_classifier`` read the
    images) and the DAMSM encoders' attribute retrieval."""
    results: dict[str, Any] = {}
    if real is not None and generated.features is not None:
        results.update(image_metrics(real, generated.features, seed))
        results["real_images"] = len(real)
    if generated.probs is not None:
        mean, std = metrics.inception_score(generated.probs)
        results["inception_score"] = {"mean": mean, "std": std, "classifier": str(is_classifier)}
    else:
        results["inception_score"] = (
            "not computed: pass --is-classifier (2015 Inception or the CUB fine-tuned one)"
        )
    owners, captions = generated.owners, generated.captions
    if len(set(dataset.class_ids)) > 1:
        generator = torch.Generator().manual_seed(seed)
        hits = r_precision_hits(pipe, dataset, owners, captions, generated.image_codes, generator)
        mean, std = metrics.r_precision_of_hits(hits, generator=generator)
        results["r_precision"] = {
            "mean": mean,
            "std": std,
            "candidates": 100,
            "folds": 10,
            "protocol": "the checkpoint's DAMSM encoders: each image's global code against its caption and "
            "99 captions of test images of other classes, cosine, top-1; 10 folds",
        }
    if is_shapes_dataset(root):
        from dmgan.attributes import load_attributes

        attributes, real_test = load_attributes(root), real_images(dataset)
        if attribute_classifier is not None and generated.attributes is not None:
            results.update(
                caption_accuracy_of_readings(
                    attribute_classifier,
                    dataset,
                    attributes,
                    real_test,
                    owners,
                    captions.texts,
                    generated.attributes,
                )
            )
        results["counterfactual_r_precision"] = counterfactual_r_precision(
            pipe, generated.image_codes, captions.texts
        )
        if generated.layouts is not None:
            from dmgan.attributes import attribute_targets, stage_agreement
            from dmgan.data.shapes import named_attributes

            targets = attribute_targets([attributes[dataset.keys[i]] for i in owners])
            named = [named_attributes(t) for t in captions.texts]
            results["stage_agreement"] = stage_agreement(generated.layouts, targets, named)
        with torch.no_grad():
            real_codes = pipe.image_encoder(real_test.to(pipe.device))[1].cpu()
        results["damsm_attribute_retrieval_on_real_test_images"] = damsm_attribute_retrieval(
            pipe, real_codes, [attributes[k] for k in dataset.keys]
        )
        # Against the real-image figure: how far the generator pleases the encoders it trains
        # against beyond what the attribute classifier reads (caption_accuracy).
        results["damsm_attribute_retrieval_on_generated_images"] = damsm_attribute_retrieval(
            pipe, generated.image_codes, [attributes[dataset.keys[i]] for i in owners]
        )
    return results


def evaluate(
    pipe: TextToImage,
    root: str | Path,
    num_images: int,
    *,
    protocol: str = DEFAULT_PROTOCOL,
    image_metrics_on: bool = True,
    features_file: str | Path | None = None,
    inception_weights: str | os.PathLike | None = None,
    is_classifier: str | Path | None = None,
    save_images: str | Path | None = None,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """Every metric this data supports for ``num_images`` images of ``pipe``; see the module
    docstring. ``image_metrics_on=False`` skips FID / KID / precision and recall. ``protocol``: a
    name of :data:`PROTOCOLS` (an old one of :data:`RENAMED_PROTOCOLS` warns)."""
    root, chosen = Path(root), protocol_named(protocol)
    started = time.perf_counter()
    dataset = evaluation_split(pipe.cfg, root)
    size = pipe.cfg.model.image_sizes[-1]
    results: dict[str, Any] = {"num_images": num_images, "image_size": size}
    network, real, features_path, network_path = None, None, None, None
    if image_metrics_on:
        network_path = network_file(chosen, inception_weights)
        network = feature_network(chosen, inception_weights).to(pipe.device)
        real, features_path = real_features_for(
            chosen, dataset, network, network_path, features_file, batch_size, progress
        )
    results["protocol"] = protocol_record(chosen, num_images, features_path, network_path, protocol)
    classifier = metrics.load_classifier(is_classifier).to(pipe.device) if is_classifier else None
    attribute_classifier = None
    if is_shapes_dataset(root):  # trained first, so that it reads each batch as it is generated
        from dmgan.attributes import load_attributes

        attribute_classifier = train_attribute_classifier(pipe.cfg, dataset, load_attributes(root), seed)
    generated = generate_and_collect(
        pipe,
        dataset,
        num_images,
        network=network,
        classifier=classifier,
        attribute_classifier=attribute_classifier,
        save_to=None if save_images is None else Path(save_images),
        seed=seed,
        batch_size=batch_size,
        progress=progress,
    )
    results.update(
        score(
            pipe,
            dataset,
            root,
            generated,
            real,
            is_classifier=is_classifier,
            attribute_classifier=attribute_classifier,
            seed=seed,
        )
    )
    if save_images is not None:
        results["saved_images"] = str(save_images)
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results


def evaluate_images(
    folder: str | Path,
    cfg: Config,
    root: str | Path,
    *,
    protocol: str = DEFAULT_PROTOCOL,
    features_file: str | Path | None = None,
    inception_weights: str | os.PathLike | None = None,
    is_classifier: str | Path | None = None,
    device: str = "cpu",
    seed: int = 0,
    batch_size: int = 32,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The image metrics of a folder of images (any model's) against ``root``'s real test images,
    under the same protocol as :func:`evaluate`. The folder is read a batch at a time by
    ``workers`` DataLoader processes (None: :func:`default_workers`), features and IS
    probabilities computed per batch: memory does not grow with the folder's images."""
    root, chosen = Path(root), protocol_named(protocol)
    started = time.perf_counter()
    size = cfg.model.image_sizes[-1]
    files = image_files(Path(folder))
    network_path = network_file(chosen, inception_weights)
    network = feature_network(chosen, inception_weights).to(device)
    real, features_path = real_features_for(
        chosen, evaluation_split(cfg, root), network, network_path, features_file, batch_size, progress
    )
    results: dict[str, Any] = {"images_folder": str(folder), "num_images": len(files), "image_size": size}
    results["protocol"] = protocol_record(chosen, len(files), features_path, network_path, protocol)
    classifier = metrics.load_classifier(is_classifier).to(device) if is_classifier else None
    features, probs, start = Rows(len(files)), Rows(len(files)), 0
    batches = folder_batches(files, size, batch_size, workers)
    total = -(-len(files) // batch_size)
    for batch in progress_display(batches, total=total, desc="score images", enabled=progress):
        features.put(start, features_of(network, batch))
        if classifier is not None:
            probs.put(start, metrics.classifier_probs(classifier, batch))
        start += len(batch)
        release_freed_memory()
    assert features.data is not None
    results.update(image_metrics(real, features.data, seed))
    results["real_images"] = len(real)
    if probs.data is not None:
        mean, std = metrics.inception_score(probs.data)
        results["inception_score"] = {"mean": mean, "std": std, "classifier": str(is_classifier)}
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results


def train_attribute_classifier(
    cfg: Config, test: TextImageDataset, attributes: dict[str, dict], seed: int
) -> AttributeClassifier:
    """Built-in shapes data: the attribute classifier of caption accuracy, trained on the real
    training images beside ``test`` (seeded by ``seed``; its own RNG, so it may be trained
    before or after generating)."""
    from dmgan.attributes import attribute_targets, train_classifier

    train = dataset_for(cfg, test.root, "train", train=False)
    return train_classifier(
        real_images(train), attribute_targets([attributes[k] for k in train.keys]), seed=seed
    )


def caption_accuracy_of_readings(
    classifier: AttributeClassifier,
    test: TextImageDataset,
    attributes: dict[str, dict],
    real_test: torch.Tensor,
    owners: list[int],
    texts: list[str],
    predictions: dict[str, torch.Tensor],
) -> dict:
    """Caption accuracy from the classifier's reading of each generated image (``predictions``:
    per attribute, N class indices, read batch by batch as the images were generated); see
    :func:`caption_accuracy`."""
    from dmgan.attributes import accuracy, accuracy_where_named, attribute_targets
    from dmgan.data.shapes import named_attributes

    targets = attribute_targets([attributes[test.keys[i]] for i in owners])
    real_targets = attribute_targets([attributes[k] for k in test.keys])
    return {
        "caption_accuracy": accuracy_where_named(predictions, targets, [named_attributes(t) for t in texts]),
        "caption_accuracy_all_captions": accuracy(predictions, targets),
        "classifier_accuracy_on_real_test_images": accuracy(classifier.predict(real_test), real_targets),
    }


def caption_accuracy(
    cfg: Config,
    test: TextImageDataset,
    attributes: dict[str, dict],
    real_test: torch.Tensor,
    owners: list[int],
    texts: list[str],
    images: torch.Tensor,
    seed: int,
) -> dict:
    """Built-in shapes data: an attribute classifier trained on the real training images reads
    the main object of each generated image (``images[i]``, drawn from caption ``texts[i]`` of
    ``test`` image ``owners[i]``). Per attribute, how often it matches: over the captions that
    name the attribute (``caption_accuracy``, with their count and the chance level), and over
    every caption, named or not (``caption_accuracy_all_captions``). ``attributes``: the
    dataset's ``attributes.json``; ``real_test``: :func:`real_images` of ``test``.

    Every image at once; :func:`evaluate` reads them batch by batch as they are generated
    (:func:`caption_accuracy_of_readings`), with the same numbers (a test checks it)."""
    classifier = train_attribute_classifier(cfg, test, attributes, seed)
    return caption_accuracy_of_readings(
        classifier, test, attributes, real_test, owners, texts, classifier.predict(images)
    )


def attribute_retrieval(
    image_codes: torch.Tensor,
    records: list[dict],
    encode: Callable[[list[str]], torch.Tensor],
    block: int = BLOCK // 4,
) -> dict[str, float]:
    """Does the DAMSM pair tell each attribute apart? For image i (code ``image_codes[i]``, N x D)
    with attributes ``records[i]``: its canonical caption with one attribute set to each of its
    values in turn; a hit when the true value's caption has the highest cosine with the image
    code. ``encode`` maps captions to sentence codes (M x D). Per attribute, the hit rate.

    On real images this says what the DAMSM loss can teach the generator: an attribute the
    encoders cannot retrieve gives no gradient towards it. The captions of ``block`` images are
    encoded at a time (every image's at once: N x values captions, 60,000 at 10,000 images)."""
    from dmgan.attributes import ATTRIBUTES
    from dmgan.data.shapes import canonical_caption

    image_codes = torch.nn.functional.normalize(image_codes.float(), dim=1)
    rates = {}
    for name, values in ATTRIBUTES.items():
        predicted = []
        for start in range(0, len(records), block):
            part = records[start : start + block]
            texts = [canonical_caption({**r, name: v}) for r in part for v in values]
            codes = torch.nn.functional.normalize(encode(texts).float(), dim=1).view(
                len(part), len(values), -1
            )
            predicted.append(torch.einsum("nd,nvd->nv", image_codes[start : start + block], codes).argmax(1))
        truth = torch.tensor([values.index(r[name]) for r in records])
        rates[name] = (torch.cat(predicted) == truth).float().mean().item()
    return rates


def counterfactual_r_precision(
    pipe: TextToImage, image_codes: torch.Tensor, texts: list[str], block: int = BLOCK // 4
) -> dict[str, Any]:
    """R-precision against captions that differ in one attribute: for each generated image (DAMSM
    code ``image_codes[i]``) and each attribute its caption ``texts[i]`` names, the caption
    against every caption that differs from it in that attribute alone (each other value, in its
    canonical words); a hit when the caption's cosine with the image is above all of theirs.
    Per attribute: the hit rate over the captions that name it, their count and the chance level
    (1 / the attribute's values). R-precision's distractors are captions of other (colour, shape)
    classes, so it cannot see whether the image follows the position or the background word;
    this can. Captions of ``block`` images are encoded at a time."""
    from dmgan.data.shapes import ATTRIBUTE_VALUES, find_attribute, with_value

    codes = torch.nn.functional.normalize(image_codes.float(), dim=1)
    words = [text.split() for text in texts]
    results: dict[str, Any] = {}
    for name, values in ATTRIBUTE_VALUES.items():
        rows = [i for i, w in enumerate(words) if find_attribute(w, name) is not None]
        hits = []
        for start in range(0, len(rows), block):
            part = rows[start : start + block]
            candidates = []
            for i in part:
                current = find_attribute(words[i], name)[2]  # type: ignore[index]
                others = [" ".join(with_value(words[i], name, v)) for v in values if v != current]
                candidates += [texts[i], *others]
            tokens = pipe.tokenize(candidates, words_num=pipe.cfg.text.eval_words_num)
            sentences = torch.nn.functional.normalize(
                pipe.encode(tokens.indices, tokens.lengths)[1].float().cpu(), dim=1
            ).view(len(part), len(values), -1)
            cosines = torch.einsum("nd,nvd->nv", codes[part], sentences)
            hits.append(cosines[:, 0] > cosines[:, 1:].amax(1))
        rate = torch.cat(hits).float().mean().item() if hits else float("nan")
        results[name] = {"accuracy": rate, "captions": len(rows), "chance": 1 / len(values)}
    results["protocol"] = (
        "the checkpoint's DAMSM encoders: each image's global code, its caption against the captions "
        "differing from it in one named attribute (each other value), cosine, top-1"
    )
    return results


def damsm_attribute_retrieval(
    pipe: TextToImage, image_codes: torch.Tensor, records: list[dict]
) -> dict[str, float]:
    """:func:`attribute_retrieval` with the pipeline's DAMSM text encoder, for DAMSM image codes
    (N x D) of real images with their ``attributes.json`` records, or of generated images with
    the records of the test images whose captions drew them."""

    def encode(texts: list[str]) -> torch.Tensor:
        captions = pipe.tokenize(texts)
        return pipe.encode(captions.indices, captions.lengths)[1].cpu()

    return attribute_retrieval(image_codes, records, encode)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="training checkpoint (runs/<preset>/checkpoints/latest.pt)")
    p.add_argument(
        "--images", type=Path, default=None, help="score this folder of images instead of a checkpoint"
    )
    p.add_argument(
        "--data-dir", default=None, help="dataset folder (default: the one the checkpoint was trained on)"
    )
    p.add_argument(
        "--preset", default=None, help="with --images and no checkpoint: the preset (its image size)"
    )
    p.add_argument(
        "--protocol",
        default=DEFAULT_PROTOCOL,
        choices=[*sorted(PROTOCOLS), *sorted(RENAMED_PROTOCOLS)],
        help="how the image metrics are computed (docs/evaluation.md); 'clean' is the old name of "
        "legacy-pytorch, clean-fid's resize is clean-fid",
    )
    p.add_argument(
        "--num-images", type=int, default=None, help="images to generate (default: the protocol's, else 2000)"
    )
    p.add_argument(
        "--no-fid", action="store_true", help="skip the image metrics (FID, KID, precision / recall)"
    )
    p.add_argument(
        "--real-features", default=None, help="real-image features (.npz; computed once when missing)"
    )
    p.add_argument(
        "--is-classifier", default=None, help="IS classifier: TorchScript or Inception-v3 state dict"
    )
    p.add_argument(
        "--save-images", type=Path, default=None, help="also write the generated images and captions.txt"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="with --images: processes that read the folder (0: the main one; default: min(4, cores - 1))",
    )
    p.add_argument(
        "--out",
        default=None,
        help="JSON file (default: evaluation.json next to the checkpoint or in the --images folder; "
        "for a Hub repo id OWNER--NAME-evaluation.json in the current folder)",
    )
    add_shared_flags(p, "inception-weights", "weights", "seed", "device", "memory-backend")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    map_large_blocks_apart()
    chosen = protocol_named(args.protocol, warn=False)  # evaluate() warns of an old name
    if chosen.num_images is not None and args.num_images not in (None, chosen.num_images):
        raise SystemExit(f"--protocol {chosen.name} fixes {chosen.num_images} images; leave out --num-images")
    num_images = chosen.num_images or args.num_images or 2000
    if args.checkpoint is None and args.images is None:
        raise SystemExit("evaluate needs a checkpoint, or --images with a folder to score")
    from dmgan.config import get_preset

    common = dict(
        protocol=args.protocol,
        features_file=args.real_features,
        inception_weights=args.inception_weights,
        is_classifier=args.is_classifier,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    if args.images is not None:
        if args.checkpoint is not None:
            pipe = TextToImage.load(args.checkpoint, "cpu", args.weights, args.memory_backend)
            cfg, data_dir = pipe.cfg, args.data_dir or pipe.data_dir
        elif args.preset is None or args.data_dir is None:
            raise SystemExit("--images without a checkpoint needs --preset and --data-dir")
        else:
            cfg, data_dir = get_preset(args.preset), args.data_dir
        results = evaluate_images(
            args.images, cfg, data_dir, device=args.device, workers=args.workers, **common
        )
        settings_source, out = str(args.images), Path(args.out or args.images / "evaluation.json")
    else:
        if num_images < 10:
            raise SystemExit("--num-images must be at least 10 (R-precision and IS use 10 folds)")
        pipe = TextToImage.load(args.checkpoint, args.device, args.weights, args.memory_backend)
        data_dir = args.data_dir or pipe.data_dir or default_root()
        results = evaluate(
            pipe,
            data_dir,
            num_images,
            image_metrics_on=not args.no_fid,
            save_images=args.save_images,
            **common,
        )
        settings_source = str(args.checkpoint)
        out = Path(args.out) if args.out else report_path(args.checkpoint)  # a repo id: here
    report = {
        "metrics": results,
        "source": settings_source,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        | {"data_dir": str(data_dir), "num_images": results["num_images"]},
        "environment": environment_record(args.device),  # versions, commit, devices
    }
    if args.checkpoint is not None and Path(args.checkpoint).is_file():
        report["checkpoint"], report["checkpoint_sha256"] = str(args.checkpoint), file_sha256(args.checkpoint)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
