"""dmgan.sample: seeds as stylegan3's tools take them, an image per (caption, seed) that depends on
those two alone, written batch by batch; and every model it cannot use (missing, cut off, of other
content, of another dmgan version) answered with one line that names the file and the problem."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import dmgan.sample
from dmgan import checkpoint
from dmgan.convert import main as convert_main
from dmgan.pipeline import TextToImage
from dmgan.sample import main as sample_main
from dmgan.sample import parse_seeds


def test_seed_lists_parse_as_stylegan3s_tools_take_them():
    assert [list(r) for r in parse_seeds("0-3,7,10-12")] == [[0, 1, 2, 3], [7], [10, 11, 12]]
    assert sum(len(r) for r in parse_seeds("0-9999999")) == 10_000_000  # ranges stay ranges
    for bad in ("3-1", "a", "1-", "-1", "", "1,,2"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_seeds(bad)


def test_an_image_per_caption_and_seed_that_depends_on_nothing_else(trained, tmp_path):
    texts = ["a large red circle", "a small blue square"]
    out, images = tmp_path / "out", tmp_path / "images"
    argv = [str(trained), *texts, "--seeds", "0-2,7", "--batch-size", "3", "--out", str(out)]
    written = sample_main([*argv, "--save-images", str(images)])
    names = sorted(p.name for p in out.glob("caption*.png"))
    assert names == [f"caption{c:03d}_seed{s:04d}.png" for c in range(2) for s in (0, 1, 2, 7)]
    assert len(written) == 1 + 8 + 8  # the grid, the word maps, the images
    assert (images / "captions.txt").read_text().splitlines() == [texts[0]] * 4 + [texts[1]] * 4
    # Image 7 (second caption, seed 7) came from a batch of three; drawn alone it is the same.
    alone = TextToImage.load(trained)(texts[1], seed=7)[0]
    batched = Image.open(images / "00007.png")
    assert np.abs(np.asarray(batched, dtype=int) - np.asarray(alone, dtype=int)).max() <= 1
    assert json.loads((out / "captions.json").read_text())["seeds"] == "0-2,7"
    with pytest.raises(SystemExit, match="leave out --samples"):
        sample_main([*argv, "--samples", "2"])


def test_samples_are_written_batch_by_batch(trained, tmp_path, monkeypatch, capsys):
    """Each batch's images are on disk before the next batch is drawn, and only the grid's first
    rows are kept: memory does not grow with the number of images."""
    images = tmp_path / "images"
    calls = []
    generate = TextToImage.generate

    def spy(self, captions, *args, **kwargs):
        calls.append((len(captions), len(list(images.glob("*.png")))))
        return generate(self, captions, *args, **kwargs)

    monkeypatch.setattr(TextToImage, "generate", spy)
    monkeypatch.setattr(dmgan.sample, "GRID_ROWS", 3)
    sample_main([str(trained), "a red circle", "--seeds", "0-9", "--batch-size", "4",
                 "--out", str(tmp_path / "out"), "--save-images", str(images)])  # fmt: skip
    assert calls == [(4, 0), (4, 4), (2, 8)]
    assert "grid.png shows the first 3 of 10 images" in capsys.readouterr().out
    assert len(list(images.glob("*.png"))) == 10


def test_the_pipeline_call_returns_pil_images_of_the_last_stage(trained):
    pipe = TextToImage.load(trained)
    images = pipe("a red circle", num_images=4, seed=0)
    assert len(images) == 4 and all(isinstance(i, Image.Image) and i.size == (32, 32) for i in images)
    again = pipe("a red circle", seed=2)[0]  # image k has seed seed + k
    assert np.abs(np.asarray(images[2], dtype=int) - np.asarray(again, dtype=int)).max() <= 1
    assert len(pipe(["a red circle", "a blue square"], num_images=2)) == 4
    with pytest.raises(ValueError, match="num_images must be at least 1"):
        pipe("a red circle", num_images=0)


@pytest.fixture(scope="module")
def bad_models(trained, tmp_path_factory):
    """name -> (a model path dmgan.sample cannot use, what its one line must say)."""
    root = tmp_path_factory.mktemp("bad")
    data = trained.read_bytes()
    (root / "cut.pt").write_bytes(data[: len(data) // 2])
    (root / "empty.pt").write_bytes(b"")
    (root / "notes.pt").write_text("these are my notes\n")
    torch.save(torch.zeros(3), root / "tensor.pt")
    torch.save({"weights": torch.zeros(2)}, root / "other.pt")
    torch.save(torch.nn.Linear(2, 2).state_dict(), root / "netG_epoch_600.pth")
    torch.save(torch.nn.Linear(2, 2), root / "module.pt")  # a pickled object: refused weights-only
    newer = checkpoint.load(trained)
    newer["config"]["model"]["memory_slots"] = 64
    newer["environment"]["dmgan"] = "9.0.0"
    checkpoint.save(newer, root / "newer.pt")
    older = checkpoint.load(trained)
    del older["config"]["text"]["words_num"]
    checkpoint.save(older, root / "older.pt")
    export = root / "export"
    convert_main(["export", str(trained), str(export)])
    tensors = (export / "model.safetensors").read_bytes()
    (export / "model.safetensors").write_bytes(tensors[: len(tensors) // 2])
    (root / "model.safetensors").write_bytes(tensors)
    return {
        "missing": (root / "missing.pt", r"checkpoint not found: .*missing\.pt"),
        "truncated": (root / "cut.pt", r"cut\.pt: the file is cut off"),
        "empty": (root / "empty.pt", r"empty\.pt: the file is empty"),
        "text": (root / "notes.pt", r"notes\.pt: not a PyTorch checkpoint but text \(it begins 'these are my notes'\)"),
        "tensor": (root / "tensor.pt", r"tensor\.pt is not a dmgan model .*holds a Tensor"),
        "foreign": (root / "other.pt", r"other\.pt is not a dmgan model or training checkpoint \(missing"),
        "state dict": (root / "netG_epoch_600.pth", r"netG_epoch_600\.pth .*state dict of one network.*dmgan\.convert reference"),
        "pickled object": (root / "module.pt", r"module\.pt: not a dmgan checkpoint: it holds Python objects"),
        "newer version": (root / "newer.pt", r"newer\.pt: its config does not fit dmgan .*unknown field model\.memory_slots.*written by dmgan 9\.0\.0"),
        "older version": (root / "older.pt", r"older\.pt: its config does not fit dmgan .*missing field text\.words_num"),
        "cut-off export": (export, r"export/model\.safetensors: cut off or not a safetensors file"),
        "safetensors file": (root / "model.safetensors", r"model\.safetensors: a safetensors file: pass the exported model's folder"),
    }  # fmt: skip


@pytest.mark.parametrize(
    "case",
    ["missing", "truncated", "empty", "text", "tensor", "foreign", "state dict", "pickled object",
     "newer version", "older version", "cut-off export", "safetensors file"],
)  # fmt: skip
def test_a_model_sample_cannot_use_is_one_line_naming_the_file_and_the_problem(bad_models, case, tmp_path):
    path, says = bad_models[case]
    with pytest.raises(SystemExit) as stop:
        sample_main([str(path), "a red circle", "--out", str(tmp_path)])
    message = str(stop.value.code)
    assert message.startswith("dmgan.sample: ") and "\n" not in message, message
    assert str(path) in message
    assert re.search(says, message), message


def test_the_demo_answers_the_same_line(bad_models):
    pytest.importorskip("gradio")
    from dmgan.demo import main as demo_main

    path, _ = bad_models["truncated"]
    with pytest.raises(SystemExit, match=rf"^dmgan.demo: {path}: the file is cut off"):
        demo_main([str(path)])


def test_no_traceback_reaches_the_terminal(bad_models, tmp_path):
    path, _ = bad_models["newer version"]
    run = subprocess.run(
        [sys.executable, "-m", "dmgan.sample", str(path), "a red circle", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [run.stderr.strip()] and str(path) in run.stderr
