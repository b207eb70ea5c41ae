"""Datasets: the built-in shapes generator, the AttnGAN-layout loader on shapes and on a fake CUB
tree, caption sub-sampling and padding, and the bad-input errors."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dmgan.data import (
    DatasetLayoutError,
    EpochSampler,
    TextImageDataset,
    check_vocabulary,
    collate,
    subsample_caption,
)
from dmgan.data import shapes as shapes_data
from dmgan.data.dataset import crop_to_box, tokenize

SIZES = (16, 32, 64)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    return shapes_data.generate(tmp_path_factory.mktemp("shapes"), num_train=24, num_test=8, seed=3)


def test_shapes_generator_writes_the_attngan_layout_deterministically(shapes_root, tmp_path):
    for rel in (
        "train/filenames.pickle",
        "test/filenames.pickle",
        "train/class_info.pickle",
        "test/class_info.pickle",
        "attributes.json",
    ):
        assert (shapes_root / rel).is_file(), rel
    keys = pickle.load(open(shapes_root / "train" / "filenames.pickle", "rb"))
    assert len(keys) == 24 and all((shapes_root / "images" / f"{k}.png").is_file() for k in keys)
    again = shapes_data.generate(tmp_path / "again", num_train=24, num_test=8, seed=3)
    for key in keys[:5]:
        assert (again / "text" / f"{key}.txt").read_text() == (
            shapes_root / "text" / f"{key}.txt"
        ).read_text()
        assert np.array_equal(
            np.asarray(Image.open(again / "images" / f"{key}.png")),
            np.asarray(Image.open(shapes_root / "images" / f"{key}.png")),
        )
    other = shapes_data.generate(tmp_path / "other", num_train=24, num_test=8, seed=4)
    assert any(
        (other / "text" / f"{k}.txt").read_text() != (shapes_root / "text" / f"{k}.txt").read_text()
        for k in keys
    )


def test_shapes_captions_and_classes_follow_the_drawn_scene(shapes_root):
    attributes = json.loads((shapes_root / "attributes.json").read_text())
    keys = pickle.load(open(shapes_root / "train" / "filenames.pickle", "rb"))
    classes = pickle.load(open(shapes_root / "train" / "class_info.pickle", "rb"))
    for key, cls in zip(keys, classes):
        main = attributes[key]
        lines = (shapes_root / "text" / f"{key}.txt").read_text().splitlines()
        assert len(lines) == 10
        assert all(main["colour"] in line.split() for line in lines)
        shape_words = {w for s in shapes_data.SYNONYMS[main["shape"]] for w in s.split()}
        assert all(shape_words & set(line.split()) for line in lines)
        assert cls == shapes_data.class_id(
            shapes_data.ShapeObject(main["shape"], main["colour"], "small", "center")
        )
        # The main object's colour is drawn: some pixels are close to it.
        pixels = np.asarray(Image.open(shapes_root / "images" / f"{key}.png"), dtype=np.int32)
        target = np.array(shapes_data.COLOURS[main["colour"]])
        assert (np.abs(pixels - target).max(axis=2) <= 20).sum() > 20


def test_loader_returns_the_pyramid_and_padded_captions(shapes_root):
    ds = TextImageDataset(shapes_root, "train", SIZES, words_num=16, captions_per_image=10, flip=False)
    assert (shapes_root / "captions.pickle").is_file()  # built from text/ on first load
    images, caption, length, _class_id, key = ds[3]
    assert [tuple(i.shape) for i in images] == [(3, s, s) for s in SIZES]
    assert all(i.min() >= -1 and i.max() <= 1 for i in images)
    assert images[-1].std() > 0.05  # not blank
    assert caption.shape == (16,) and 1 <= length <= 16
    assert (caption[:length] > 0).all() and (caption[length:] == 0).all()
    words = ds.vocab.decode(caption).split()
    lines = [tokenize(line) for line in (shapes_root / "text" / f"{key}.txt").read_text().splitlines()]
    assert words in lines
    # Deterministic per (seed, epoch, index), different across epochs.
    again = ds[3]
    assert torch.equal(again[1], caption) and torch.equal(again[0][-1], images[-1])
    crops = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        crops.add(ds[3][0][-1].sum().item())
    assert len(crops) > 1


def test_image_cache_changes_nothing_and_keeps_to_its_budget(shapes_root):
    one_image = 76 * 76 * 3  # SIZES[-1] = 64 loads at 76 px
    cached, uncached, small = (
        TextImageDataset(shapes_root, "train", SIZES, words_num=16, captions_per_image=10, cache_bytes=budget)
        for budget in (2**20, 0, 2 * one_image)
    )
    for epoch in (0, 1):
        for ds in (cached, uncached, small):
            ds.set_epoch(epoch)
        for i in range(5):
            want = uncached[i]
            for ds in (cached, small):
                got = ds[i]
                assert torch.equal(got[1], want[1])
                assert all(torch.equal(a, b) for a, b in zip(got[0], want[0]))
    assert len(cached._cache) == 5 and len(uncached._cache) == 0
    assert len(small._cache) == 2 and small._cached_bytes == 2 * one_image


def test_recolour_unnamed_backgrounds_changes_only_the_background_of_unnamed_captions(shapes_root):
    ds = TextImageDataset(
        shapes_root, "train", SIZES, words_num=16, captions_per_image=10, flip=False, random_crop=False
    )
    keys = list(ds.keys)
    names = {ds.vocab.decode([i]) for i in range(1, len(ds.vocab))} & shapes_data.background_words()
    assert names >= {"black", "white", "gray", "grey"}
    items = [ds[i] for i in range(len(keys))]
    # Each image once with a caption that names a background word and once with one that does not.
    a, circle, white = (ds.vocab.wordtoix[w] for w in ("a", "circle", "white"))
    captions = torch.tensor([[a, white, 0], [a, circle, 0]]).repeat(len(items), 1)
    images = torch.stack([item[0][-1] for item in items for _ in (0, 1)])
    torch.manual_seed(0)
    draws = [shapes_data.recolour_unnamed_backgrounds(images, captions, ds.vocab.wordtoix) for _ in range(6)]
    palette = torch.tensor(list(shapes_data.BACKGROUNDS.values())) / 127.5 - 1
    attrs = json.loads((shapes_root / "attributes.json").read_text())
    for out in draws:
        assert torch.equal(out[0::2], images[0::2])  # caption names the background: untouched
    for i, key in enumerate(keys):
        before, afters = images[2 * i], [out[2 * i + 1] for out in draws]
        own = palette[list(shapes_data.BACKGROUNDS).index(attrs[key]["background"])]
        background = (before - own[:, None, None]).abs().amax(0) < 0.2
        assert background[0, 0] and background.float().mean() > 0.3
        for after in afters:
            assert torch.equal(after[:, ~background], before[:, ~background])  # the objects stay
            colours = after[:, background].T.unique(dim=0)
            assert len(colours) == 1 and (palette - colours).abs().amax(1).min() < 1e-6
        assert len({tuple(a[:, 0, 0].tolist()) for a in afters}) > 1  # drawn at random


def test_collate_and_sampler_shard_without_overlap(shapes_root):
    ds = TextImageDataset(shapes_root, "train", SIZES, words_num=16, captions_per_image=10)
    batch = collate([ds[i] for i in range(4)])
    assert batch.captions.shape == (4, 16) and batch.images[0].shape == (4, 3, 16, 16) and batch.skipped == 0
    ranks = [list(EpochSampler(24, 4, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 12 and not set(ranks[0]) & set(ranks[1])
    s = EpochSampler(24, 4, seed=1)
    s.set_epoch(1)
    full = list(s)
    s.set_epoch(1, skip_batches=2)
    assert list(s) == full[8:] and full != list(EpochSampler(24, 4, seed=1))


@pytest.mark.parametrize("length", [1, 5, 12, 30])
def test_subsample_keeps_order_and_pads_with_zero(length):
    rng = random.Random(length)
    tokens = [rng.randrange(1, 50) * 100 + i for i in range(length)]  # distinct, position-tagged
    padded, n = subsample_caption(tokens, 12, rng)
    assert len(padded) == 12 and n == min(length, 12)
    kept = padded[:n]
    assert all(t in tokens for t in kept)
    assert [tokens.index(t) for t in kept] == sorted(tokens.index(t) for t in kept)
    assert padded[n:] == [0] * (12 - n)
    if length > 12:  # sub-sampled, not cut: over many draws, words past position 12 appear
        draws = {t for _ in range(20) for t in subsample_caption(tokens, 12, rng)[0]}
        assert draws & set(tokens[12:])


def _fake_cub(root: Path, cub_captions: int = 10) -> Path:
    """Two classes, three birds each, in CUB's layout (JPEG images, bounding boxes, protocol-2 pickles)."""
    cub = root / "CUB_200_2011"
    names, boxes, keys = [], [], []
    rng = np.random.default_rng(0)
    for c, cls in enumerate(["001.Black_footed_Albatross", "002.Laysan_Albatross"]):
        (cub / "images" / cls).mkdir(parents=True)
        (root / "text" / cls).mkdir(parents=True)
        for i in range(3):
            key = f"{cls}/{cls[4:]}_{i:04d}"
            w, h = 120 + 10 * i, 90
            pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            pixels[20:60, 30:90] = (255, 0, 0)  # the "bird": inside the bounding box
            Image.fromarray(pixels).save(cub / "images" / f"{key}.jpg", quality=90)
            names.append(f"{len(names) + 1} {key}.jpg")
            boxes.append(f"{len(boxes) + 1} 30.0 20.0 60.0 40.0")
            lines = [
                f"this bird number {i} of class {c} has a red body and white wings"
                for _ in range(cub_captions)
            ]
            (root / "text" / f"{key}.txt").write_text("\n\n".join(lines) + "\n")
            keys.append(key)
    (cub / "images.txt").write_text("\n".join(names) + "\n")
    (cub / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    for split, split_keys, classes in (("train", keys[:4], [1, 1, 1, 2]), ("test", keys[4:], [2, 2])):
        (root / split).mkdir()
        pickle.dump(split_keys, open(root / split / "filenames.pickle", "wb"), protocol=2)
        pickle.dump(classes, open(root / split / "class_info.pickle", "wb"), protocol=2)
    return root


def test_fake_cub_tree_loads_with_bounding_box_crop_and_captions(tmp_path):
    root = _fake_cub(tmp_path)
    ds = TextImageDataset(root, "train", SIZES, words_num=8, captions_per_image=10)
    assert len(ds) == 4 and ds.class_ids == [1, 1, 1, 2] and ds.boxes is not None
    images, caption, length, _class_id, _key = ds[1]
    assert [tuple(i.shape) for i in images] == [(3, s, s) for s in SIZES]
    assert length == 8  # 12-word captions are sub-sampled to WORDS_NUM
    assert set(ds.vocab.decode(caption).split()) <= set(
        "this bird number 0 1 2 of class has a red body and white wings".split()
    )
    # captions.pickle as the reference writes it: [train, test, ixtoword, wordtoix], index 0 = <end>
    train_caps, test_caps, ixtoword, wordtoix = pickle.load(open(root / "captions.pickle", "rb"))
    assert len(train_caps) == 40 and len(test_caps) == 20 and ixtoword[0] == "<end>" and wordtoix["bird"] > 0
    # The crop is the reference's: a square of 1.5 x max(w, h) centred on the box, clipped.
    image = Image.new("RGB", (120, 90))
    assert crop_to_box(image, (30.0, 20.0, 60.0, 40.0)).size == (90, 85)  # r = 45 around (60, 40)
    red = ds.load_image(ds.keys[0])
    assert red.size == (90, 85)


def test_vocabulary_mismatch_names_both_sizes():
    check_vocabulary(5450, 5450, "captions.pickle")
    with pytest.raises(ValueError, match=r"26835 words.*27297"):
        check_vocabulary(26835, 27297, "captions.pickle")


def test_missing_or_partial_folder_lists_the_expected_layout(tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"filenames.pickle") as e:
        TextImageDataset(tmp_path / "nope", "train", SIZES, 8, 10)
    assert "captions.pickle" in str(e.value) and "CUB_200_2011" in str(e.value)
    root = _fake_cub(tmp_path / "cub")
    (root / "train" / "filenames.pickle").unlink()
    with pytest.raises(DatasetLayoutError, match=r"missing: .*train/filenames.pickle"):
        TextImageDataset(root, "train", SIZES, 8, 10)


def test_caption_file_with_too_few_captions_is_named(tmp_path):
    root = _fake_cub(tmp_path, cub_captions=7)
    with pytest.raises(ValueError, match=r"Albatross_0000.txt has 7 non-empty captions, 10 are needed"):
        TextImageDataset(root, "train", SIZES, 8, 10)


def test_corrupt_image_is_skipped_and_counted(tmp_path):
    root = _fake_cub(tmp_path)
    ds = TextImageDataset(root, "train", SIZES, words_num=8, captions_per_image=10)
    ds.image_path(ds.keys[2]).write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.warns(UserWarning, match="unreadable image"):
        items = [ds[i] for i in range(4)]
    assert items[2] is None
    batch = collate(items)
    assert batch.skipped == 1 and batch.captions.shape[0] == 3
