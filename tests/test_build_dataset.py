"""python -m dmgan.data.build: your own captioned images into the AttnGAN layout, with what it
left out named; then a few training steps and an evaluation on it with the custom preset."""

from __future__ import annotations

import json
import pickle
import random

import pytest
from PIL import Image

from dmgan.data.build import main as build_main
from dmgan.evaluate import main as evaluate_main
from dmgan.train import main as train_main
from tests.tiny import TINY

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (40, 70, 230), "yellow": (240, 220, 30)}


def _photos(folder, count=30, metadata=False):
    """``count`` small images of coloured squares with captions, plus three that must be left out."""
    rng = random.Random(0)
    folder.mkdir()
    rows = []
    for i in range(count):
        colour = rng.choice(list(COLOURS))
        image = Image.new("RGB", (48, 40), (250, 250, 250))
        image.paste(COLOURS[colour], (8, 8, 30, 30))
        sub = folder / ("set_a" if i % 2 else "set_b")
        sub.mkdir(exist_ok=True)
        image.save(sub / f"photo {i}.png")
        captions = [f"a {colour} square on white", f"a photo of a {colour} box"]
        if metadata:
            rows += [{"file_name": f"{sub.name}/photo {i}.png", "text": c} for c in captions]
        else:
            (sub / f"photo {i}.txt").write_text("\n".join(captions) + "\n\n")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "broken.txt").write_text("a broken image\n")
    Image.new("RGB", (32, 32)).save(folder / "silent.png")
    (folder / "silent.txt").write_text("\n  \n")  # no caption
    Image.new("RGB", (32, 32)).save(folder / "uncaptioned.png")
    if metadata:
        rows += [
            {"file_name": "broken.png", "text": "a broken image"},
            {"file_name": "silent.png", "text": " "},
        ]
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.mark.parametrize("metadata", [False, True], ids=["txt-files", "metadata-jsonl"])
def test_a_folder_of_captioned_images_becomes_the_attngan_layout(tmp_path, capsys, metadata):
    source = _photos(tmp_path / "photos", metadata=metadata)
    report = build_main([str(source), str(tmp_path / "data"), "--test-fraction", "0.2", "--seed", "1"])
    out = capsys.readouterr().out
    assert len(report.kept) == 30 and report.captions_per_image == 2
    assert [r.split(":")[0] for r in report.unreadable] == ["broken.png"] and "broken.png" in out
    assert "silent.png" in report.without_captions and "silent.png" in out
    if not metadata:  # a metadata file lists only its rows: the uncaptioned image is not there at all
        assert "uncaptioned.png" in report.without_captions
    data = tmp_path / "data"
    train = pickle.loads((data / "train" / "filenames.pickle").read_bytes())
    test = pickle.loads((data / "test" / "filenames.pickle").read_bytes())
    assert len(test) == 6 and len(train) == 24 and not set(train) & set(test)
    assert (data / "images" / f"{test[0]}.png").is_file() and (data / "captions.pickle").is_file()
    assert len((data / "text" / f"{train[0]}.txt").read_text().splitlines()) == 2
    assert len(pickle.loads((data / "train" / "class_info.pickle").read_bytes())) == 24
    again = build_main([str(source), str(tmp_path / "again"), "--test-fraction", "0.2", "--seed", "1"])
    assert again.kept == report.kept  # the split is a function of the seed
    assert pickle.loads((tmp_path / "again" / "test" / "filenames.pickle").read_bytes()) == test
    with pytest.raises(SystemExit, match="exists and is not empty"):
        build_main([str(source), str(data)])


@pytest.mark.slow
def test_the_built_dataset_trains_and_evaluates_with_the_custom_preset(tmp_path):
    source = _photos(tmp_path / "photos")
    report = build_main([str(source), str(tmp_path / "data"), "--test-fraction", "0.34"])
    run = tmp_path / "run"
    small = [
        "--set",
        "model.base_size=8",
        "--set",
        "model.image_encoder=small",
        "--set",
        "train.encoder_max_epoch=1",
        "--set",
        f"text.captions_per_image={report.captions_per_image}",
    ]
    train_main(
        [
            "--preset",
            "custom",
            "--data-dir",
            str(tmp_path / "data"),
            "--out",
            str(run),
            "--max-steps",
            "3",
            *small,
            *TINY,
        ]
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["r_precision"]["mean"] <= 1
    evaluated = evaluate_main(
        [
            str(run / "checkpoints" / "latest.pt"),
            "--num-images",
            "10",
            "--no-fid",
            "--out",
            str(tmp_path / "e.json"),
        ]
    )
    assert evaluated["metrics"]["num_images"] == 10
