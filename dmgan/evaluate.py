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
import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmgan import metrics
from dmgan.cli import HelpFormatter, add_shared_flags
from dmgan.config import Config
from dmgan.data import TextImageDataset, dataset_for
from dmgan.data.shapes import default_root, is_shapes_dataset
from dmgan.pipeline import Captions, TextToImage
from dmgan.progress import progress as progress_display
from dmgan.provenance import environment_record
from dmgan.visualize import save_images as save_images_as_files


@dataclass(frozen=True)
class Protocol:
    """How the image metrics are computed, so that two numbers under one protocol compare."""

    name: str
    network: str  # "tf-2015-inception" or "torchvision-inception-v3"
    num_images: int | None  # None: --num-images chooses (default 2,000)
    comparable_to: str


PROTOCOLS = {
    "clean": Protocol(
        "clean",
        "tf-2015-inception",
        None,
        "FID of TTUR's TensorFlow code, pytorch-fid and clean-fid, which use the same 2015 TF "
        "Inception (up to their resizing: clean-fid resizes with PIL's antialiased bicubic), and KID "
        "of torch-fidelity / clean-fid; not the DM-GAN paper's FID column",
    ),
    "dmgan-paper": Protocol(
        "dmgan-paper",
        "torchvision-inception-v3",
        30_000,
        "the FID column of the DM-GAN paper (CVPR 2019) and of papers evaluated with the reference "
        "code's torchvision Inception-v3 pool3 features on 30,000 images",
    ),
}
RESIZE = (
    "images at the preset's last stage size (a folder's resized to it with PIL's bicubic filter, "
    "generated ones rounded to 8 bits as a saved PNG would be), then to 299 x 299 bilinear, no "
    "antialiasing, before the network"
)
CAPTIONS = "the images cycle over the test images, one random caption of each image per pass"


def protocol_record(protocol: Protocol, num_images: int, features_file: Path | None) -> dict[str, Any]:
    """What the JSON says of the protocol the numbers follow."""
    return {
        "name": protocol.name,
        "network": protocol.network,
        "num_images": num_images,
        "split": "test",
        "captions": CAPTIONS,
        "resize": RESIZE,
        "real_features": None if features_file is None else str(features_file),
        "comparable_to": protocol.comparable_to,
    }


def feature_network(protocol: Protocol, inception_weights: str | os.PathLike | None) -> torch.nn.Module:
    if protocol.network == "tf-2015-inception":
        return metrics.InceptionFeatures()
    if inception_weights is None:
        raise SystemExit(
            f"--protocol {protocol.name} needs torchvision's ImageNet Inception-v3 weights: pass "
            "--inception-weights inception_v3_google-0cc3c7bd.pth (from torchvision; nothing is downloaded here)"
        )
    return metrics.TorchvisionInceptionFeatures(inception_weights)


def quantized(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] rounded to the 256 levels a saved 8-bit image holds."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


@torch.no_grad()
def features_of(network: torch.nn.Module, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    device = next(network.parameters()).device
    return torch.cat([network(part.to(device)).float().cpu() for part in images.split(batch_size)])


def real_features(
    dataset: TextImageDataset,
    network: torch.nn.Module,
    path: Path,
    batch_size: int = 32,
    progress: bool = True,
) -> torch.Tensor:
    """The pool3 features of every real test image (N x 2048), computed once and kept in ``path``."""
    if path.is_file():
        with np.load(path) as data:
            if "features" not in data:
                raise SystemExit(f"{path} holds no 'features' (statistics of an older dmgan?): delete it")
            return torch.from_numpy(data["features"])
    parts = [
        features_of(network, real_images(dataset, chunk.tolist()), batch_size)
        for chunk in progress_display(
            torch.arange(len(dataset)).split(batch_size), desc="real features", enabled=progress
        )
    ]
    features = torch.cat(parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, features=features.numpy())
    tmp.replace(path)
    return features


def image_metrics(real: torch.Tensor, fake: torch.Tensor, seed: int = 0) -> dict[str, Any]:
    """FID, KID and precision / recall / density / coverage of generated against real features."""
    return {
        "fid": metrics.fid_from_features(real, fake),
        "kid": metrics.kid_from_features(real, fake, seed=seed),
        **metrics.precision_recall(real, fake),
    }


def folder_images(folder: Path, size: int) -> tuple[list[Path], torch.Tensor]:
    """Every PNG / JPEG of ``folder`` in name order, as N x 3 x size x size in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError

    if not folder.is_dir():
        raise SystemExit(f"--images: {folder} is not a folder")
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise SystemExit(f"--images: {folder} holds no PNG or JPEG image")
    images = []
    for f in files:
        try:
            image = Image.open(f).convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise SystemExit(f"--images: {f} is not a readable image ({e})") from None
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
    return files, torch.stack(images).float() / 127.5 - 1


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
    flat = codes.flatten(0, 1)
    per_image = codes.shape[1]
    out = []
    for owner in owners:
        others = (classes != classes[owner]).nonzero().view(-1)
        if len(others) == 0:
            raise ValueError("R-precision needs test images of more than one class")
        pick = others[torch.randint(len(others), (count,), generator=generator)]
        out.append(flat[pick * per_image + torch.randint(per_image, (count,), generator=generator)])
    return torch.stack(out)


@dataclass
class Generated:
    """What scoring needs of the images a model generated: per image, the test image it belongs
    to and its caption; the DAMSM image encoder's global codes; the feature network's features
    and the IS classifier's probabilities (when computed); the images themselves (when kept)."""

    owners: list[int]
    captions: Captions
    image_codes: torch.Tensor  # N x D
    features: torch.Tensor | None = None  # N x F
    probs: torch.Tensor | None = None  # N x classes
    images: torch.Tensor | None = None  # N x 3 x S x S in [-1, 1], 8-bit levels


def generate_and_collect(
    pipe: TextToImage,
    dataset: TextImageDataset,
    num_images: int,
    *,
    network: torch.nn.Module | None = None,
    classifier: torch.nn.Module | None = None,
    keep_images: bool = False,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
) -> Generated:
    """Generate ``num_images`` images (cycling over the test images, a random caption each pass)
    a batch at a time, keeping of each batch only what the metrics read."""
    owners, captions = caption_plan(dataset, num_images, seed)
    codes, features, probs, images = [], [], [], []
    for start in progress_display(range(0, num_images, batch_size), desc="generate", enabled=progress):
        stages, _ = pipe.generate(
            captions[start : start + batch_size], seed=seed * 1_000_003 + start, batch_size=batch_size
        )
        batch = quantized(stages[-1])  # what a saved image holds: a folder of them scores the same
        with torch.no_grad():
            codes.append(pipe.image_encoder(batch.to(pipe.device))[1].float().cpu())
        if network is not None:
            features.append(features_of(network, batch, batch_size))
        if classifier is not None:
            probs.append(metrics.classifier_probs(classifier, batch))
        if keep_images:
            images.append(batch)
    cat = lambda parts: torch.cat(parts) if parts else None
    return Generated(owners, captions, torch.cat(codes), cat(features), cat(probs), cat(images))


def score(
    pipe: TextToImage,
    dataset: TextImageDataset,
    root: Path,
    generated: Generated,
    real: torch.Tensor | None = None,
    *,
    is_classifier: str | Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Every metric of ``generated`` that this data supports: the image metrics against ``real``
    features (when given), IS (when a classifier was run), R-precision (test images of several
    classes), and on the shapes data caption accuracy and the DAMSM encoders' attribute retrieval."""
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
        mismatched = mismatched_codes(
            all_sentence_codes(pipe, dataset), owners, dataset.class_ids, 99, generator
        )
        true_codes = pipe.encode(captions.indices, captions.lengths)[1].float().cpu()
        mean, std = metrics.r_precision(generated.image_codes, true_codes, mismatched, generator=generator)
        results["r_precision"] = {
            "mean": mean,
            "std": std,
            "candidates": 100,
            "folds": 10,
            "protocol": "the checkpoint's DAMSM encoders: each image's global code against its caption and "
            "99 captions of test images of other classes, cosine, top-1; 10 folds",
        }
    if is_shapes_dataset(root) and generated.images is not None:
        from dmgan.attributes import load_attributes

        attributes, real_test = load_attributes(root), real_images(dataset)
        results.update(
            caption_accuracy(
                pipe.cfg, dataset, attributes, real_test, owners, captions.texts, generated.images, seed
            )
        )
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
    protocol: str = "clean",
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
    docstring. ``image_metrics_on=False`` skips FID / KID / precision and recall."""
    root, chosen = Path(root), PROTOCOLS[protocol]
    started = time.perf_counter()
    dataset = evaluation_split(pipe.cfg, root)
    size = pipe.cfg.model.image_sizes[-1]
    results: dict[str, Any] = {"num_images": num_images, "image_size": size}
    network, real, features_path = None, None, None
    if image_metrics_on:
        network = feature_network(chosen, inception_weights).to(pipe.device)
        features_path = (
            Path(features_file) if features_file else root / f"features_{chosen.network}_test_{size}.npz"
        )
        real = real_features(dataset, network, features_path, batch_size, progress)
    results["protocol"] = protocol_record(chosen, num_images, features_path)
    classifier = metrics.load_classifier(is_classifier).to(pipe.device) if is_classifier else None
    generated = generate_and_collect(
        pipe,
        dataset,
        num_images,
        network=network,
        classifier=classifier,
        keep_images=is_shapes_dataset(root) or save_images is not None,  # 30k x 256² would not fit otherwise
        seed=seed,
        batch_size=batch_size,
        progress=progress,
    )
    results.update(score(pipe, dataset, root, generated, real, is_classifier=is_classifier, seed=seed))
    if save_images is not None:
        assert generated.images is not None
        save_images_as_files(generated.images, generated.captions.texts, Path(save_images))
        results["saved_images"] = str(save_images)
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results


def evaluate_images(
    folder: str | Path,
    cfg: Config,
    root: str | Path,
    *,
    protocol: str = "clean",
    features_file: str | Path | None = None,
    inception_weights: str | os.PathLike | None = None,
    is_classifier: str | Path | None = None,
    device: str = "cpu",
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """The image metrics of a folder of images (any model's) against ``root``'s real test images,
    under the same protocol as :func:`evaluate`."""
    root, chosen = Path(root), PROTOCOLS[protocol]
    started = time.perf_counter()
    size = cfg.model.image_sizes[-1]
    files, images = folder_images(Path(folder), size)
    network = feature_network(chosen, inception_weights).to(device)
    features_path = (
        Path(features_file) if features_file else root / f"features_{chosen.network}_test_{size}.npz"
    )
    real = real_features(evaluation_split(cfg, root), network, features_path, batch_size, progress)
    results: dict[str, Any] = {"images_folder": str(folder), "num_images": len(files), "image_size": size}
    results["protocol"] = protocol_record(chosen, len(files), features_path)
    results.update(image_metrics(real, features_of(network, images, batch_size), seed))
    results["real_images"] = len(real)
    if is_classifier:
        classifier = metrics.load_classifier(is_classifier).to(device)
        mean, std = metrics.inception_score(metrics.classifier_probs(classifier, images))
        results["inception_score"] = {"mean": mean, "std": std, "classifier": str(is_classifier)}
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results


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
    dataset's ``attributes.json``; ``real_test``: :func:`real_images` of ``test``."""
    from dmgan.attributes import accuracy, accuracy_where_named, attribute_targets, train_classifier
    from dmgan.data.shapes import named_attributes

    train = dataset_for(cfg, test.root, "train", train=False)
    classifier = train_classifier(
        real_images(train), attribute_targets([attributes[k] for k in train.keys]), seed=seed
    )
    targets = attribute_targets([attributes[test.keys[i]] for i in owners])
    real_targets = attribute_targets([attributes[k] for k in test.keys])
    predictions = classifier.predict(images)
    return {
        "caption_accuracy": accuracy_where_named(predictions, targets, [named_attributes(t) for t in texts]),
        "caption_accuracy_all_captions": accuracy(predictions, targets),
        "classifier_accuracy_on_real_test_images": accuracy(classifier.predict(real_test), real_targets),
    }


def attribute_retrieval(
    image_codes: torch.Tensor, records: list[dict], encode: Callable[[list[str]], torch.Tensor]
) -> dict[str, float]:
    """Does the DAMSM pair tell each attribute apart? For image i (code ``image_codes[i]``, N x D)
    with attributes ``records[i]``: its canonical caption with one attribute set to each of its
    values in turn; a hit when the true value's caption has the highest cosine with the image
    code. ``encode`` maps captions to sentence codes (M x D). Per attribute, the hit rate.

    On real images this says what the DAMSM loss can teach the generator: an attribute the
    encoders cannot retrieve gives no gradient towards it."""
    from dmgan.attributes import ATTRIBUTES
    from dmgan.data.shapes import canonical_caption

    image_codes = torch.nn.functional.normalize(image_codes.float(), dim=1)
    rates = {}
    for name, values in ATTRIBUTES.items():
        texts = [canonical_caption({**r, name: v}) for r in records for v in values]
        codes = torch.nn.functional.normalize(encode(texts).float(), dim=1).view(
            len(records), len(values), -1
        )
        predicted = torch.einsum("nd,nvd->nv", image_codes, codes).argmax(1)
        truth = torch.tensor([values.index(r[name]) for r in records])
        rates[name] = (predicted == truth).float().mean().item()
    return rates


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
        "--protocol", default="clean", choices=sorted(PROTOCOLS), help="how the image metrics are computed"
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
        "--out", default=None, help="JSON file (default: next to the checkpoint, or in the folder)"
    )
    add_shared_flags(p, "inception-weights", "weights", "seed", "device", "memory-backend")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    chosen = PROTOCOLS[args.protocol]
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
        results = evaluate_images(args.images, cfg, data_dir, device=args.device, **common)
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
        out = Path(args.out) if args.out else Path(args.checkpoint).with_name("evaluation.json")
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
