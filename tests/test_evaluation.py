"""Metrics (FID, IS, R-precision) against known answers, and the sample / evaluate command lines."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from dmgan import metrics
from dmgan.data import shapes as shapes_data
from dmgan.evaluate import main as evaluate_main
from dmgan.pipeline import TextToImage
from dmgan.sample import main as sample_main


class Flatten(nn.Module):
    """A stand-in feature extractor: the 'images' are the features."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x):
        return x.flatten(1).double()


def scipy_fid(x: np.ndarray, y: np.ndarray) -> float:
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def fid_of(x: torch.Tensor, y: torch.Tensor) -> float:
    """torchmetrics' FID, the oracle of metrics.fid_from_features."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=Flatten(x.shape[1]), normalize=True)
    metric.update(x[:, :, None, None], real=True)
    metric.update(y[:, :, None, None], real=False)
    return float(metric.compute())


def test_fid_matches_scipy_and_the_gaussian_closed_form():
    g = torch.Generator().manual_seed(0)
    d, n = 4, 40000
    a1, a2 = (
        torch.randn(d, d, generator=g, dtype=torch.float64),
        torch.randn(d, d, generator=g, dtype=torch.float64),
    )
    s1, s2 = a1 @ a1.T + 0.5 * torch.eye(d), a2 @ a2.T + 0.5 * torch.eye(d)
    mu1, mu2 = torch.zeros(d, dtype=torch.float64), torch.arange(d, dtype=torch.float64)
    x = mu1 + torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(s1).T
    y = mu2 + torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(s2).T
    ours = metrics.fid_from_features(x, y)
    assert ours == pytest.approx(scipy_fid(x.numpy(), y.numpy()), rel=1e-6)
    closed = float(
        (mu1 - mu2).square().sum()
        + torch.trace(s1 + s2)
        - 2 * np.trace(scipy.linalg.sqrtm((s1 @ s2).numpy()).real)
    )
    assert ours == pytest.approx(closed, rel=0.03)
    small = torch.randn(30, 3, generator=g, dtype=torch.float64)  # small matrices too
    assert metrics.fid_from_features(small, small * 2 + 1) == pytest.approx(
        scipy_fid(small.numpy(), (small * 2 + 1).numpy()), rel=1e-6
    )


def test_fid_of_a_set_with_itself_is_zero():
    x = torch.randn(500, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert abs(metrics.fid_from_features(x, x)) < 1e-6
    # A shift moves only the means.
    assert metrics.fid_from_features(x, x + 0.5) == pytest.approx(8 * 0.25, rel=1e-4)


def test_kid_matches_an_independent_unbiased_mmd():
    """KID with one subset of everything is the unbiased MMD² with k(x, y) = (x·y / d + 1)³."""
    g = torch.Generator().manual_seed(3)
    real, fake = (
        torch.randn(60, 6, generator=g, dtype=torch.float64),
        torch.randn(60, 6, generator=g, dtype=torch.float64) + 0.3,
    )
    x, y, d, n = real.numpy(), fake.numpy(), 6, 60
    kernel = lambda a, b: (a @ b.T / d + 1) ** 3
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    mmd = (
        (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
        + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
        - 2 * kxy.mean()
    )
    kid = metrics.kid_from_features(real, fake, subsets=1, subset_size=n)
    assert kid["mean"] == pytest.approx(mmd, rel=1e-6) and kid["subset_size"] == n
    several = metrics.kid_from_features(real, fake, subsets=20, subset_size=30)
    assert several["std"] > 0 and several["standard_error"] == pytest.approx(several["std"] / 20**0.5)


def test_kid_takes_the_subsets_torchmetrics_takes_and_gives_its_numbers():
    """kid_from_features is torchmetrics' KernelInceptionDistance.compute without the metric
    object's float64 copies: the same subsets from the same seed, the same numbers."""
    from torchmetrics.image.kid import KernelInceptionDistance

    g = torch.Generator().manual_seed(5)
    real, fake = torch.randn(70, 6, generator=g), torch.randn(50, 6, generator=g) * 1.2 + 0.2
    metric = KernelInceptionDistance(feature=Flatten(6), subsets=7, subset_size=30)
    metric.update(real[:, :, None, None], real=True)
    metric.update(fake[:, :, None, None], real=False)
    with torch.random.fork_rng():
        torch.manual_seed(11)
        mean, std = metric.compute()
    ours = metrics.kid_from_features(real, fake, subsets=7, subset_size=30, seed=11)
    assert ours["mean"] == float(mean) and ours["std"] == float(std)


def test_fid_from_features_is_torchmetrics_fid_in_any_blocks():
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(300, 5, generator=g), torch.randn(200, 5, generator=g) * 0.8 + 0.1
    expected = fid_of(x.double(), y.double())
    for block in (7, 1024):
        assert metrics.fid_from_features(x, y, block=block) == pytest.approx(expected, rel=1e-9)
    wide = torch.randn(40, 64, generator=g), torch.randn(90, 64, generator=g) + 0.05  # rank-deficient Σ
    assert metrics.fid_from_features(*wide) == pytest.approx(fid_of(*(w.double() for w in wide)), rel=1e-6)
    with pytest.raises(ValueError, match="at least 2 feature rows, got 1"):
        metrics.fid_from_features(x[:1], y)


def test_precision_recall_density_coverage_match_their_definitions():
    g = torch.Generator().manual_seed(4)
    real = torch.randn(80, 5, generator=g, dtype=torch.float64)
    fake = torch.randn(70, 5, generator=g, dtype=torch.float64) * 0.7 + 0.4
    k = 3
    r, f = real.numpy(), fake.numpy()
    dist = lambda a, b: np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
    real_radius = np.sort(dist(r, r), axis=1)[:, k]  # column 0: the point itself
    fake_radius = np.sort(dist(f, f), axis=1)[:, k]
    d = dist(f, r)  # fake x real
    want = {
        "precision": np.mean([any(d[i, j] <= real_radius[j] for j in range(len(r))) for i in range(len(f))]),
        "recall": np.mean([any(d[i, j] <= fake_radius[i] for i in range(len(f))) for j in range(len(r))]),
        "density": np.mean(
            [sum(d[i, j] <= real_radius[j] for j in range(len(r))) / k for i in range(len(f))]
        ),
        "coverage": np.mean([d[:, j].min() <= real_radius[j] for j in range(len(r))]),
    }
    got = metrics.precision_recall(real, fake, k=k, chunk=16)  # several chunks
    for name, value in want.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name
    same = metrics.precision_recall(real, real, k=k)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0


def test_the_paper_protocols_network_is_torchvision_inception_from_a_weights_file(tmp_path):
    from torchvision.models import inception_v3

    weights = tmp_path / "inception_v3.pth"
    torch.manual_seed(0)
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=True).state_dict(), weights)
    net = metrics.TorchvisionInceptionFeatures(weights)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    features = net(images)
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    assert not torch.allclose(features[0], features[1])
    with pytest.raises(FileNotFoundError, match="Inception-v3 weights file not found"):
        metrics.TorchvisionInceptionFeatures(tmp_path / "missing.pth")
    from dmgan.evaluate import PROTOCOLS, network_file, protocol_record

    paper = PROTOCOLS["dmgan-paper"]
    record = protocol_record(paper, 30_000, None, network_file(paper, weights))
    assert record["network_file"] == str(weights)
    assert record["network_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_fid_network_loads_offline_and_gives_2048_features():
    net = metrics.InceptionFeatures()
    images = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 2 - 1
    features = net(images)
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    assert not torch.allclose(features[0], features[1])
    assert net(images[:, :, :64, :64]).shape == (2, 2048)  # other sizes are resized to 299
    small = ((images[:, :, :32, :32] + 1) * 127.5).round() / 127.5 - 1  # 8-bit images, as scored
    clean = metrics.InceptionFeatures("pil-bicubic")
    assert clean(small).shape == (2, 2048) and torch.isfinite(clean(small)).all()
    assert not torch.allclose(clean(small), net(small), atol=1e-3)  # another resize, other features


def test_clean_fid_resize_is_pils_antialiased_bicubic_on_float_channels():
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 32, 32), generator=g).float() / 127.5 - 1
    resized = metrics.clean_fid_resize(images)
    assert resized.shape == (2, 3, 299, 299) and resized.dtype == torch.float32
    assert 0 <= resized.min() and resized.max() <= 255 and not torch.equal(resized, resized.round())
    channel = ((images[1, 2] + 1) * 127.5).round().numpy().astype(np.float32)  # PIL, by hand
    want = np.asarray(Image.fromarray(channel).resize((299, 299), Image.Resampling.BICUBIC)).clip(0, 255)
    assert np.array_equal(resized[1, 2].numpy(), want)
    assert torch.equal(
        metrics.clean_fid_resize(torch.full((1, 3, 8, 8), 0.2)), torch.full((1, 3, 299, 299), 153.0)
    )
    # Antialiased: a one-pixel checkerboard shrunk to 299 is grey; the bilinear resize without
    # antialiasing picks pixels and keeps black and white.
    board = (torch.arange(897)[:, None] + torch.arange(897)[None, :]) % 2 * 2.0 - 1
    board = board.expand(1, 3, 897, 897)  # a third: bilinear samples whole pixels
    assert (metrics.clean_fid_resize(board) - 127.5).abs().max() < 2
    bilinear = torch.nn.functional.interpolate(board, size=(299, 299), mode="bilinear", align_corners=False)
    assert (bilinear.abs() > 0.9).float().mean() > 0.9


def test_clean_fid_resize_equals_clean_fids_own():
    """Against clean-fid's code where it is installed (it is no dependency: its network download
    is not needed for this): build_resizer("clean") on H x W x 3 uint8 images."""
    resize = pytest.importorskip("cleanfid.resize")
    g = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (2, 3, 40, 40), generator=g, dtype=torch.uint8)
    ours = metrics.clean_fid_resize(pixels.float() / 127.5 - 1)
    theirs = [resize.build_resizer("clean")(p.permute(1, 2, 0).numpy()) for p in pixels]
    assert np.array_equal(ours.permute(0, 2, 3, 1).numpy(), np.stack(theirs))


def test_protocols_by_name_and_the_old_name_clean(trained, tmp_path):
    from dmgan.evaluate import DEFAULT_PROTOCOL, PROTOCOLS, protocol_named, protocol_record

    legacy = PROTOCOLS["legacy-pytorch"]
    assert DEFAULT_PROTOCOL == "legacy-pytorch" and (legacy.network, legacy.resize) == (
        "tf-2015-inception",
        "bilinear",
    )
    assert legacy.features_tag == "tf-2015-inception"  # the real-feature files written before still serve
    assert PROTOCOLS["clean-fid"].features_tag == "tf-2015-inception-pil-bicubic"
    with pytest.warns(FutureWarning, match="clean is deprecated.*now named legacy-pytorch"):
        assert protocol_named("clean") is legacy
    with pytest.raises(ValueError, match="unknown protocol 'fancy'"):
        protocol_named("fancy")
    with pytest.warns(FutureWarning, match="now named legacy-pytorch"):
        report = evaluate_main(
            [
                str(trained),
                "--protocol",
                "clean",
                "--num-images",
                "10",
                "--no-fid",
                "--out",
                str(tmp_path / "e.json"),
            ]
        )
    record = report["metrics"]["protocol"]
    assert record["name"] == "legacy-pytorch" and record["requested_as"] == "clean"
    assert record["network_sha256"] is None  # --no-fid: no network ran
    assert not any(f["comparable"] for f in record["published_figures"])  # 10 images
    paper = {
        f["source"]: f["comparable"]
        for f in protocol_record(PROTOCOLS["dmgan-paper"], 30_000, None)["published_figures"]
    }
    assert paper == {
        "DM-GAN paper (Zhu et al., CVPR 2019), Table 1": True,
        "reference README (github.com/MinfengZhu/DM-GAN), released models, 'Pytorch FID'": True,
        "reference README (github.com/MinfengZhu/DM-GAN), released models, 'TF FID'": False,
    }
    tf_fid = protocol_record(legacy, 30_000, None)["published_figures"][2]
    assert tf_fid["comparable"] and tf_fid["values"] == {"CUB": 11.91, "COCO": 24.24}


def test_real_features_computed_under_another_resize_are_refused(trained, tmp_path):
    from dmgan.evaluate import evaluation_split, real_features

    pipe = TextToImage.load(trained)
    dataset, network, path = (
        evaluation_split(pipe.cfg, pipe.data_dir),
        RecordingFeatures(),
        tmp_path / "real.npz",
    )
    first = real_features(dataset, network, path, progress=False, stamp={"resize": "bilinear"})
    assert torch.equal(
        real_features(dataset, network, path, progress=False, stamp={"resize": "bilinear"}), first
    )
    with pytest.raises(SystemExit, match="computed with resize bilinear, this protocol needs pil-bicubic"):
        real_features(dataset, network, path, progress=False, stamp={"resize": "pil-bicubic"})
    np.savez(path, features=first.numpy())  # as dmgan wrote them before the stamp: taken
    assert torch.equal(
        real_features(dataset, network, path, progress=False, stamp={"resize": "pil-bicubic"}), first
    )


def test_inception_score_of_known_classifier_outputs():
    classes = 10
    confident_balanced = torch.eye(classes).repeat(20, 1)  # each split sees every class once, twice
    mean, std = metrics.inception_score(confident_balanced, splits=10)
    assert mean == pytest.approx(classes) and std == pytest.approx(0, abs=1e-9)
    assert metrics.inception_score(torch.full((100, classes), 1 / classes))[0] == pytest.approx(1.0)
    one_class = torch.zeros(100, classes)
    one_class[:, 3] = 1
    assert metrics.inception_score(one_class)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="N >= 10"):
        metrics.inception_score(torch.rand(5, 3))


def test_r_precision_on_constructed_embeddings():
    g = torch.Generator().manual_seed(0)
    n, d = 100, 16
    true = torch.randn(n, d, generator=g)
    wrong = torch.randn(n, 99, d, generator=g)
    assert metrics.r_precision(true, true, wrong, generator=g) == (1.0, 0.0)
    assert metrics.r_precision(wrong[:, 5], true, wrong, generator=g)[0] == 0.0
    half = torch.where(torch.arange(n)[:, None] < 50, true, wrong[:, 0])
    mean, std = metrics.r_precision(half, true, wrong, generator=g)
    assert mean == pytest.approx(0.5) and std > 0  # the hits are shuffled into folds


def test_r_precisions_mismatched_captions_come_from_other_classes_drawn_image_by_image():
    from dmgan.evaluate import mismatched_codes

    images, per_image, count = 7, 3, 99
    # code of (image i, caption j) = [i, j]: each picked code says where it came from
    codes = torch.stack(
        [torch.tensor([[float(i), float(j)] for j in range(per_image)]) for i in range(images)]
    )
    class_ids, owners = [0, 0, 1, 1, 2, 2, 2], [0, 2, 4, 6, 1, 0]
    picked = mismatched_codes(codes, owners, class_ids, count, torch.Generator().manual_seed(5))
    assert picked.shape == (len(owners), count, 2)
    for n, owner in enumerate(owners):
        sources = picked[n, :, 0].long().tolist()
        assert all(class_ids[i] != class_ids[owner] for i in sources)
        assert len(set(sources)) > 1 and len(set(picked[n, :, 1].tolist())) > 1
    # the draws of one image after another, as R-precision drew them when it kept a list per image
    g, flat, classes = torch.Generator().manual_seed(5), codes.flatten(0, 1), torch.tensor(class_ids)
    for n, owner in enumerate(owners):
        others = (classes != classes[owner]).nonzero().view(-1)
        pick = others[torch.randint(len(others), (count,), generator=g)]
        assert torch.equal(
            picked[n], flat[pick * per_image + torch.randint(per_image, (count,), generator=g)]
        )
    with pytest.raises(ValueError, match="more than one class"):
        mismatched_codes(codes, [0], [0] * images, count, torch.Generator())


def test_training_run_ends_with_a_short_evaluation(trained):
    results = json.loads((trained.parent.parent / "metrics.json").read_text())
    assert 0 <= results["r_precision"]["mean"] <= 1
    attributes = {"colour", "shape", "size", "position", "background"}
    assert set(results["caption_accuracy"]) == attributes
    for images in ("real_test", "generated"):
        rates = results[f"damsm_attribute_retrieval_on_{images}_images"]
        assert set(rates) == attributes and all(0 <= r <= 1 for r in rates.values())


def test_caption_accuracy_counts_an_attribute_only_over_the_captions_that_name_it():
    from dmgan.attributes import ATTRIBUTES, accuracy_where_named
    from dmgan.data.shapes import named_attributes

    texts = ["a red circle in the top left", "a small red circle", "a red circle in the middle on black"]
    named = [named_attributes(t) for t in texts]
    assert named == [
        {"colour", "shape", "position"},
        {"colour", "shape", "size"},
        {"colour", "shape", "position", "background"},
    ]
    targets = {name: torch.zeros(3, dtype=torch.long) for name in ATTRIBUTES}
    predictions = {name: torch.tensor([0, 1, 1]) for name in ATTRIBUTES}  # right only for the first image
    rates = accuracy_where_named(predictions, targets, named)
    assert rates["colour"]["captions"] == 3 and rates["colour"]["accuracy"] == pytest.approx(1 / 3)
    assert rates["position"] == {"accuracy": 0.5, "captions": 2, "chance": 0.2}  # images 0 and 2
    assert rates["size"]["captions"] == 1 and rates["size"]["accuracy"] == 0.0
    assert rates["background"]["captions"] == 1 and rates["background"]["chance"] == pytest.approx(1 / 3)


def test_caption_accuracy_of_an_evaluation_equals_the_classifier_reading_every_image_at_once(trained):
    """The reference for caption accuracy: the same images regenerated, kept all together and
    read by :func:`dmgan.evaluate.caption_accuracy` at once. An evaluation in several batches must
    give the same numbers, NaN for an attribute that no caption names included."""
    from dmgan.attributes import load_attributes
    from dmgan.evaluate import (
        caption_accuracy,
        caption_plan,
        evaluate,
        evaluation_split,
        quantized,
        real_images,
    )

    pipe = TextToImage.load(trained)
    root, num_images, batch, seed = pipe.data_dir, 20, 6, 3
    results = evaluate(
        pipe, root, num_images, image_metrics_on=False, seed=seed, batch_size=batch, progress=False
    )
    dataset = evaluation_split(pipe.cfg, root)
    owners, captions = caption_plan(dataset, num_images, seed)
    images = torch.cat(
        [
            quantized(
                pipe.generate(captions[s : s + batch], seed=seed * 1_000_003 + s, batch_size=batch)[0][-1]
            )
            for s in range(0, num_images, batch)
        ]
    )
    want = caption_accuracy(
        pipe.cfg, dataset, load_attributes(root), real_images(dataset), owners, captions.texts, images, seed
    )
    assert json.dumps({k: results[k] for k in want}, sort_keys=True) == json.dumps(want, sort_keys=True)


class RecordingFeatures(nn.Module):
    """A stand-in feature network: each image's channel means, and how many images each call saw."""

    num_features = 3

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # features_of asks the network where it lives
        self.seen: list[int] = []

    def forward(self, images):
        self.seen.append(len(images))
        return images.float().mean((2, 3)) + self.anchor


def test_evaluation_streams_images_to_disk_and_scores_folders_batch_by_batch(trained, tmp_path, monkeypatch):
    """Nothing holds every image: generated images reach the feature network, the attribute
    classifier and the disk a batch at a time (captions.txt last), and --images reads a folder
    a batch at a time, in DataLoader workers or not, to the same numbers."""
    from pathlib import Path

    import dmgan.evaluate as ev
    from dmgan.attributes import AttributeClassifier

    network = RecordingFeatures()
    monkeypatch.setattr(ev, "feature_network", lambda protocol, weights: network)
    written, read = [], []
    write = ev.write_numbered_images
    predict = AttributeClassifier.predict

    def recording_write(images, folder, start=0):
        written.append((start, len(images), (Path(folder) / "captions.txt").exists()))
        return write(images, folder, start)

    def recording_predict(self, images, *args, **kwargs):
        read.append(len(images))
        return predict(self, images, *args, **kwargs)

    trims = []  # the heap's freed pages go back to the OS after every batch
    monkeypatch.setattr(ev, "write_numbered_images", recording_write)
    monkeypatch.setattr(AttributeClassifier, "predict", recording_predict)
    monkeypatch.setattr(ev, "release_freed_memory", lambda: trims.append(len(written)))
    pipe = TextToImage.load(trained)
    folder, real_file = tmp_path / "imgs", tmp_path / "real.npz"
    direct = ev.evaluate(
        pipe, pipe.data_dir, 20, features_file=real_file, save_images=folder, batch_size=6, progress=False
    )
    assert written == [(0, 6, False), (6, 6, False), (12, 6, False), (18, 2, False)]
    # after each forward of the feature network (the 12 real images as 6 + 6, then one per
    # generated batch) and after each generated batch is written, then after R-precision's block
    assert trims == [0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert read[:4] == [6, 6, 6, 2] and read[4:] == [12]  # then the 12 real test images, once
    assert max(network.seen) <= 6 and sum(network.seen) == 12 + 20  # real features, then each batch
    assert (
        len(sorted(folder.glob("*.png"))) == 20
        and len((folder / "captions.txt").read_text().splitlines()) == 20
    )

    def score_folder(workers: int) -> dict:  # --images on the folder, the real features from real_file
        return ev.evaluate_images(
            folder,
            pipe.cfg,
            pipe.data_dir,
            features_file=real_file,
            batch_size=6,
            workers=workers,
            progress=False,
        )

    monkeypatch.setattr(ev, "FEATURE_BATCH", 4)  # the network sees a batch of 6 as 4, then 2
    for workers in (0, 1):
        network.seen.clear()
        trims.clear()
        scored = score_folder(workers)
        assert network.seen == [4, 2, 4, 2, 4, 2, 2]  # the real features come from real_file
        assert len(trims) == 7 + 4  # after each forward of the network, and after each batch
        for key in ("fid", "precision", "recall", "density", "coverage"):
            assert scored[key] == pytest.approx(direct[key], rel=1e-6, abs=1e-9), (workers, key)
        assert scored["kid"]["mean"] == pytest.approx(direct["kid"]["mean"], rel=1e-6)

    damaged = folder / "00007.png"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # its header still reads
    for workers in (0, 1):
        with pytest.raises(SystemExit, match=r"00007.png is not a readable image"):
            score_folder(workers)


def test_generate_is_a_function_of_its_seed_and_leaves_the_global_rng_alone(trained):
    pipe = TextToImage.load(trained)
    captions = pipe.tokenize(["a large red circle", "a small blue square on gray", "a cyan cross"])
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = pipe.generate(captions, seed=7)[0]
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(5)  # another global RNG state must not matter
    again = pipe.generate(captions, seed=7)[0]
    other = pipe.generate(captions, seed=8)[0]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[-1], other[-1])


def test_sample_cli_writes_grids_and_attention_maps(trained, tmp_path, capsys):
    from PIL import Image

    captions = tmp_path / "captions.txt"
    captions.write_text("a large red circle in the top left\n\na small zebra square on gray\n")
    written = sample_main(
        [str(trained), str(captions), "--samples", "2", "--out", str(tmp_path / "out"), "--truncation", "1.0"]
    )
    assert len(written) == 1 + 2 * 2 and all(p.is_file() for p in written)
    assert "unknown words skipped in 'a small zebra square on gray': zebra" in capsys.readouterr().out
    grid = Image.open(tmp_path / "out" / "grid.png")
    assert grid.size[0] >= 3 * 64 and grid.size[1] >= 4 * 64  # 4 rows of three stages
    figure = Image.open(tmp_path / "out" / "caption000_sample00.png")
    assert figure.size[1] > 2 * 64  # stages, then one attention tile per word
    meta = json.loads((tmp_path / "out" / "captions.json").read_text())
    assert meta["unknown_words"] == [[], ["zebra"]]


def test_sample_cli_bad_input(trained, tmp_path):
    # dmgan.sample ends on a model or captions it cannot read with one line (cli.one_line_errors)
    with pytest.raises(SystemExit, match="checkpoint not found"):
        sample_main([str(tmp_path / "missing.pt"), "a red circle"])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(SystemExit, match="holds no caption"):
        sample_main([str(trained), str(empty)])
    with pytest.raises(SystemExit, match="'zebra giraffe' has no word of the vocabulary"):
        sample_main([str(trained), "zebra giraffe", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="caption file not found"):
        sample_main([str(trained), str(tmp_path / "nope.txt")])


def test_evaluate_cli_writes_one_json(trained, tmp_path):
    out = tmp_path / "eval.json"
    evaluate_main([str(trained), "--num-images", "20", "--no-fid", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["checkpoint_sha256"] == hashlib.sha256(trained.read_bytes()).hexdigest()
    m = report["metrics"]
    assert m["num_images"] == 20 and "not computed" in m["inception_score"] and m["seconds"] > 0
    assert 0 <= m["r_precision"]["mean"] <= 1 and 0 <= m["caption_accuracy"]["colour"]["accuracy"] <= 1
    assert m["caption_accuracy"]["colour"]["captions"] == 20  # every caption names the colour
    assert 0 <= m["caption_accuracy_all_captions"]["position"] <= 1


class ColourClassifier(nn.Module):
    """Logits = scaled mean of each colour channel: a classifier with known, input-dependent outputs."""

    def forward(self, x):
        return 20 * x.mean(dim=(2, 3))


def test_inception_score_with_a_user_classifier(trained, tmp_path):
    path = tmp_path / "classifier.pt"
    torch.jit.script(ColourClassifier()).save(str(path))
    classifier = metrics.load_classifier(path)
    images = torch.zeros(30, 3, 8, 8)
    images[torch.arange(30), torch.arange(30) % 3] = 1.0  # ten confidently red, green and blue each
    mean, _ = metrics.inception_score(metrics.classifier_probs(classifier, images), splits=10)
    assert mean == pytest.approx(3.0, rel=1e-3)
    report = evaluate_main(
        [
            str(trained),
            "--num-images",
            "20",
            "--no-fid",
            "--is-classifier",
            str(path),
            "--out",
            str(tmp_path / "e.json"),
        ]
    )
    score = report["metrics"]["inception_score"]
    assert 1.0 <= score["mean"] <= 3.0 and score["classifier"] == str(path)


def test_inception_v3_state_dict_is_accepted_as_classifier(tmp_path):
    from torchvision.models import inception_v3

    path = tmp_path / "inception_cub.pth"
    torch.save(
        inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=5).state_dict(), path
    )
    classifier = metrics.load_classifier(path)
    assert metrics.classifier_probs(classifier, torch.rand(2, 3, 64, 64) * 2 - 1).shape == (2, 5)
    (tmp_path / "bad.pth").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.pth is neither TorchScript nor a readable state dict"):
        metrics.load_classifier(tmp_path / "bad.pth")


def test_attribute_retrieval_oracle_hits_and_wrong_images_miss():
    # Bag-of-words "encoders": an image code equal to its own caption's code retrieves every
    # attribute; codes of other records retrieve only what they happen to share.
    from dmgan.evaluate import attribute_retrieval

    records = [
        {"shape": s, "colour": c, "size": z, "position": p, "background": b}
        for s, c, z, p, b in [
            ("circle", "red", "small", "top left", "gray"),
            ("cross", "blue", "large", "center", "black"),
            ("triangle", "cyan", "small", "bottom right", "white"),
            ("square", "pink", "large", "top right", "gray"),
        ]
    ]
    words = sorted(
        {w for r in records for v in r.values() for w in v.split()}
        | set("a in the on background top bottom left right center green yellow".split())
    )

    def encode(texts):
        codes = torch.zeros(len(texts), len(words))
        for i, t in enumerate(texts):
            for w in t.split():
                codes[i, words.index(w)] += 1
        return codes

    own = encode([shapes_data.canonical_caption(r) for r in records])
    assert attribute_retrieval(own, records, encode) == {k: 1.0 for k in records[0]}
    shifted = attribute_retrieval(own.roll(1, dims=0), records, encode)
    assert shifted["shape"] == 0.0 and shifted["colour"] == 0.0


def test_sample_cli_takes_several_captions_and_saves_images_named_for_their_captions(trained, tmp_path):
    from PIL import Image

    texts = ["a large red circle", "a small blue square on gray"]
    sample_main(
        [
            str(trained),
            *texts,
            "--samples",
            "2",
            "--out",
            str(tmp_path / "out"),
            "--save-images",
            str(tmp_path / "imgs"),
        ]
    )
    lines = (tmp_path / "imgs" / "captions.txt").read_text().splitlines()
    assert lines == [texts[0], texts[0], texts[1], texts[1]]
    files = sorted((tmp_path / "imgs").glob("*.png"))
    assert [f.name for f in files] == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert Image.open(files[0]).size == (32, 32)  # the last stage at its own size


@pytest.mark.parametrize("mode", ["seeds", "captions"])
def test_sample_cli_interpolates_between_seeds_or_captions(trained, tmp_path, mode):
    from PIL import Image

    texts = ["a large red circle", "a small blue square"] if mode == "captions" else ["a large red circle"]
    written = sample_main(
        [str(trained), *texts, "--interpolate", mode, "--frames", "5", "--out", str(tmp_path)]
    )
    assert [p.name for p in written] == ["interpolation.png", "interpolation.gif"]
    strip = Image.open(tmp_path / "interpolation.png")
    assert strip.size == (5 * 128, 128)  # five frames of the 32-pixel stage, shown at 128
    gif = Image.open(tmp_path / "interpolation.gif")
    assert gif.n_frames == 5 + 3  # there and back
    pixels = np.asarray(strip.convert("RGB")).reshape(128, 5, 128, 3)
    assert not np.array_equal(pixels[:, 0], pixels[:, -1])  # the walk goes somewhere
    with pytest.raises(SystemExit, match="between two captions"):
        sample_main([str(trained), "a red circle", "--interpolate", "captions", "--out", str(tmp_path / "x")])


@pytest.mark.slow  # the TF Inception on about 50 images on the CPU
def test_a_folder_that_save_images_wrote_scores_as_the_checkpoint_did(trained, tmp_path):
    """--save-images writes exactly what was scored (8-bit images and their captions), and
    --images on that folder gives the same FID, KID, precision and recall; the JSON says which
    protocol the numbers follow."""
    direct = evaluate_main([str(trained), "--num-images", "20", "--save-images", str(tmp_path / "imgs"),
                            "--out", str(tmp_path / "direct.json")])["metrics"]  # fmt: skip
    folder = evaluate_main(
        [str(trained), "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "f.json")]
    )
    m = folder["metrics"]
    assert m["num_images"] == 20 and len((tmp_path / "imgs" / "captions.txt").read_text().splitlines()) == 20
    for key in ("fid", "precision", "recall", "density", "coverage"):
        assert m[key] == pytest.approx(direct[key], rel=1e-6, abs=1e-9), key
    assert m["kid"]["mean"] == pytest.approx(direct["kid"]["mean"], rel=1e-6)
    assert direct["fid"] > 0 and 0 <= direct["precision"] <= 1
    network_sha = hashlib.sha256(metrics.fid_network_path().read_bytes()).hexdigest()
    for record in (direct["protocol"], m["protocol"]):
        assert record["name"] == "legacy-pytorch" and record["network"] == "tf-2015-inception"
        assert record["network_sha256"] == network_sha and "requested_as" not in record
        assert (
            record["split"] == "test"
            and "299" in record["resize"]
            and record["real_features"].endswith(".npz")
        )
    assert "random caption" in direct["protocol"]["captions"]
    assert "pytorch-fid" in direct["protocol"]["comparable_to"]


def test_the_protocol_fixes_what_it_fixes_and_bad_folders_are_named(trained, tmp_path):
    with pytest.raises(SystemExit, match="dmgan-paper fixes 30000 images"):
        evaluate_main([str(trained), "--protocol", "dmgan-paper", "--num-images", "20"])
    with pytest.raises(SystemExit, match="needs torchvision's ImageNet Inception-v3 weights"):
        evaluate_main([str(trained), "--protocol", "dmgan-paper"])  # refused before generating
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "00000.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit, match=r"00000.png is not a readable image"):
        evaluate_main([str(trained), "--images", str(tmp_path / "bad")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="holds no PNG or JPEG"):
        evaluate_main([str(trained), "--images", str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match="is not a folder"):
        evaluate_main([str(trained), "--images", str(tmp_path / "missing")])
