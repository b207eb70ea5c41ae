"""Evaluate a checkpoint on its test captions: FID, IS, R-precision, and caption accuracy (shapes).

    python -m dmgan.evaluate runs/shapes/checkpoints/latest.pt --num-images 2000
    python -m dmgan.evaluate netG.pt --data-dir data/birds --num-images 30000 --is-classifier cub_inception.pt

Generates ``--num-images`` images, cycling over the test images with a random caption each pass
(the reference's protocol: 30,000 for the paper's numbers), and writes one JSON with every metric,
the settings, the checkpoint's SHA-256 and the time taken. See :mod:`dmgan.metrics` for which
networks the metrics use.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dmgan import metrics
from dmgan.config import Config, HelpFormatter
from dmgan.data import TextImageDataset, dataset_for
from dmgan.data.shapes import default_root, is_shapes_dataset
from dmgan.pipeline import Captions, TextToImage


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


def evaluate(
    pipe: TextToImage,
    root: str | Path,
    num_images: int,
    *,
    fid: bool = True,
    fid_stats: str | Path | None = None,
    is_classifier: str | Path | None = None,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """Every metric this data supports; see the module docstring."""
    root = Path(root)
    started = time.perf_counter()
    dataset = evaluation_split(pipe.cfg, root)
    owners, captions = caption_plan(dataset, num_images, seed)
    results: dict[str, Any] = {"num_images": num_images, "image_size": pipe.cfg.model.image_sizes[-1]}

    fid_metric = None
    if fid:
        fid_metric = metrics.fid_metric(device=pipe.device)
        stats = (
            Path(fid_stats) if fid_stats else root / f"fid_stats_test_{pipe.cfg.model.image_sizes[-1]}.npz"
        )
        if stats.is_file():
            results["fid_reference_images"] = metrics.load_reference_stats(fid_metric, stats)
        else:
            for chunk in tqdm(
                torch.arange(len(dataset)).split(batch_size), desc="FID real", disable=not progress
            ):
                fid_metric.update(real_images(dataset, chunk.tolist()).to(pipe.device), real=True)
            metrics.save_reference_stats(fid_metric, stats)
            results["fid_reference_images"] = len(dataset)
        results["fid_reference_stats"] = str(stats)
    classifier = metrics.load_classifier(is_classifier).to(pipe.device) if is_classifier else None

    image_codes, probs, last_images = [], [], []
    keep_images = is_shapes_dataset(root)  # caption accuracy (shapes); 30k x 256² would not fit
    for start in tqdm(range(0, num_images, batch_size), desc="generate", disable=not progress):
        stages, _ = pipe.generate(
            captions[start : start + batch_size], seed=seed * 1_000_003 + start, batch_size=batch_size
        )
        images = stages[-1]
        with torch.no_grad():
            image_codes.append(pipe.image_encoder(images.to(pipe.device))[1].float().cpu())
        if fid_metric is not None:
            fid_metric.update(images.to(pipe.device), real=False)
        if classifier is not None:
            probs.append(metrics.classifier_probs(classifier, images))
        if keep_images:
            last_images.append(images)

    if fid_metric is not None:
        results["fid"] = float(fid_metric.compute())
    if classifier is not None:
        mean, std = metrics.inception_score(torch.cat(probs))
        results["inception_score"] = {"mean": mean, "std": std, "classifier": str(is_classifier)}
    else:
        results["inception_score"] = (
            "not computed: pass --is-classifier (2015 Inception or the CUB fine-tuned one)"
        )

    generator = torch.Generator().manual_seed(seed)
    codes = all_sentence_codes(pipe, dataset)
    true_codes = pipe.encode(captions.indices, captions.lengths)[1].float().cpu()
    if len(set(dataset.class_ids)) > 1:
        mismatched = mismatched_codes(codes, owners, dataset.class_ids, 99, generator)
        mean, std = metrics.r_precision(torch.cat(image_codes), true_codes, mismatched, generator=generator)
        results["r_precision"] = {"mean": mean, "std": std, "candidates": 100, "folds": 10}

    if keep_images:
        from dmgan.attributes import load_attributes

        attributes, real_test = load_attributes(root), real_images(dataset)
        results.update(
            caption_accuracy(
                pipe.cfg, dataset, attributes, real_test, owners, captions.texts, torch.cat(last_images), seed
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
            pipe, torch.cat(image_codes), [attributes[dataset.keys[i]] for i in owners]
        )
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
    p.add_argument("checkpoint", help="training checkpoint (runs/<preset>/checkpoints/latest.pt)")
    p.add_argument(
        "--data-dir", default=None, help="dataset folder (default: the one the checkpoint was trained on)"
    )
    p.add_argument(
        "--num-images", type=int, default=2000, help="images to generate (30000 for the paper protocol)"
    )
    p.add_argument("--no-fid", action="store_true", help="skip FID")
    p.add_argument(
        "--fid-stats", default=None, help="real-image FID statistics (.npz; computed once when missing)"
    )
    p.add_argument(
        "--is-classifier", default=None, help="IS classifier: TorchScript or Inception-v3 state dict"
    )
    p.add_argument("--weights", default="ema", choices=["ema", "raw"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", default=None, help="JSON file (default: next to the checkpoint)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.num_images < 10:
        raise SystemExit("--num-images must be at least 10 (R-precision and IS use 10 folds)")
    pipe = TextToImage.load(args.checkpoint, args.device, args.weights)
    from dmgan import checkpoint

    data_dir = args.data_dir or checkpoint.load(args.checkpoint).get("data_dir")
    if data_dir is None:
        data_dir = default_root()
    results = evaluate(
        pipe,
        data_dir,
        args.num_images,
        fid=not args.no_fid,
        fid_stats=args.fid_stats,
        is_classifier=args.is_classifier,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    report = {
        "metrics": results,
        "checkpoint": str(args.checkpoint),
        "checkpoint_sha256": file_sha256(args.checkpoint),
        "settings": {k: v for k, v in vars(args).items() if k != "checkpoint"} | {"data_dir": str(data_dir)},
        "torch": torch.__version__,
    }
    out = Path(args.out) if args.out else Path(args.checkpoint).with_name("evaluation.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
