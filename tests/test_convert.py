"""dmgan.convert: the reference's released files (written here in its format: PyTorch 0.4 legacy
serialisation, protocol-2 pickles, DataParallel's ``module.`` prefixes, no num_batches_tracked)
into one dmgan checkpoint that samples and evaluates; the files that are not what they claim;
and the export to safetensors that every command loads, with its model card."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re

import pytest
import torch

from dmgan import checkpoint
from dmgan.config import get_preset
from dmgan.convert import main as convert_main
from dmgan.data import dataset_for
from dmgan.data import shapes as shapes_data
from dmgan.evaluate import main as evaluate_main
from dmgan.models import G_NET, build_discriminators, build_image_encoder, build_text_encoder
from dmgan.pipeline import TextToImage
from dmgan.sample import main as sample_main


def _save_as_the_reference_did(state: dict, path, parallel: bool = False) -> None:
    state = {
        ("module." if parallel else "") + k: v
        for k, v in state.items()
        if not k.endswith("num_batches_tracked")
    }
    torch.save(state, path, _use_new_zipfile_serialization=False, pickle_protocol=2)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The four files of a reference release, for the shapes preset, and the data they go with."""
    root = tmp_path_factory.mktemp("release")
    data = shapes_data.generate(root / "data", num_train=32, num_test=12, seed=5)
    cfg = get_preset("shapes")
    train = dataset_for(cfg, data, "train", train=True)  # writes the dataset's captions.pickle
    with open(root / "captions.pickle", "wb") as f:  # the reference's layout, as Python 2 wrote it
        pickle.dump([[[1, 2]], [[3]], train.vocab.ixtoword, train.vocab.wordtoix], f, protocol=2)
    torch.manual_seed(0)
    generator = G_NET(cfg.model)
    _save_as_the_reference_did(generator.state_dict(), root / "netG_epoch_600.pth", parallel=True)
    _save_as_the_reference_did(
        build_text_encoder(cfg.model, len(train.vocab)).state_dict(), root / "text_encoder200.pth"
    )
    image_encoder = build_image_encoder(cfg.model.image_encoder, cfg.model.embedding_dim)
    _save_as_the_reference_did(image_encoder.state_dict(), root / "image_encoder200.pth")
    _save_as_the_reference_did(
        build_discriminators(cfg.model)[2].state_dict(), root / "netD2.pth", parallel=True
    )
    files = {name: str(root / f) for name, f in (("netG", "netG_epoch_600.pth"), ("text", "text_encoder200.pth"),
             ("image", "image_encoder200.pth"), ("captions", "captions.pickle"), ("netD", "netD2.pth"))}  # fmt: skip
    return root, data, files, generator.state_dict()


def _convert(released, **replace):
    root, data, files, _ = released
    files = {**files, **replace}
    out = root / "converted.pt"
    convert_main(["reference", "--preset", "shapes", "--netG", files["netG"], "--text-encoder", files["text"],
                  "--image-encoder", files["image"], "--captions", files["captions"], "--data-dir", str(data),
                  "--out", str(out)])  # fmt: skip
    return out


def test_a_reference_release_converts_and_samples_and_evaluates(released, tmp_path):
    _, _, _, generator_state = released
    out = _convert(released)
    state = checkpoint.load(out)
    assert state["config"]["model"]["legacy_mask"] is True  # the reference's mask broadcast
    pipe = TextToImage.load(out)
    for key, value in generator_state.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(pipe.netG.state_dict()[key], value), key
    written = sample_main([str(out), "a large red circle", "--out", str(tmp_path / "s")])
    assert written and all(p.is_file() for p in written)
    report = evaluate_main([str(out), "--num-images", "12", "--no-fid", "--out", str(tmp_path / "e.json")])
    assert 0 <= report["metrics"]["r_precision"]["mean"] <= 1 and report["checkpoint_sha256"]


def test_files_that_are_not_what_they_claim_are_refused_with_what_was_expected(released, tmp_path):
    root, _, files, _ = released
    with pytest.raises(
        SystemExit, match=r"netD2.pth: expected the DM-GAN generator .* looks like a discriminator"
    ):
        _convert(released, netG=files["netD"])
    other_words = root / "other_captions.pickle"
    with open(other_words, "wb") as f:
        pickle.dump([[], [], {i: f"w{i}" for i in range(7)}, {}], f, protocol=2)
    with pytest.raises(
        SystemExit, match=r"text encoder was trained with \d+ words, .*other_captions.pickle has 7"
    ):
        _convert(released, captions=str(other_words))
    with pytest.raises(SystemExit, match="expected the DAMSM image encoder"):
        _convert(released, image=files["text"])
    with pytest.raises(SystemExit, match="generator \\(netG\\) not found"):
        _convert(released, netG=str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(SystemExit, match="junk.pth: not a PyTorch state dict"):
        _convert(released, netG=str(tmp_path / "junk.pth"))
    hostile = tmp_path / "hostile.pickle"
    hostile.write_bytes(pickle.dumps([[], [], {0: torch.nn.Identity()}, {}], protocol=2))
    with pytest.raises(SystemExit, match="a captions file holds plain data only"):
        _convert(released, captions=str(hostile))


def test_export_writes_safetensors_that_sample_evaluate_and_the_demo_load(trained, tmp_path):
    folder = tmp_path / "model"
    convert_main(["export", str(trained), str(folder)])
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "vocab.json",
    ]
    original, exported = TextToImage.load(trained), TextToImage.load(folder)
    captions = original.tokenize(["a large red circle", "a small blue square"])
    first, second = original.generate(captions, seed=3)[0], exported.generate(captions, seed=3)[0]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert sample_main([str(folder), "a red circle", "--out", str(tmp_path / "s")])
    report = evaluate_main([str(folder), "--num-images", "12", "--no-fid", "--out", str(tmp_path / "e.json")])
    assert "checkpoint_sha256" not in report and 0 <= report["metrics"]["r_precision"]["mean"] <= 1
    pytest.importorskip("gradio")
    from dmgan.demo import Demo

    assert Demo(folder, "cpu").pipelines["ema"].vocab.ixtoword == original.vocab.ixtoword


def _card_sections(card: str) -> dict[str, str]:
    """The card's metadata header, then its sections by their ## titles."""
    _, header, body = card.split("---\n", 2)
    parts = re.split(r"^## (.+)$", body, flags=re.M)
    return {"metadata": header, "intro": parts[0], **dict(zip(parts[1::2], parts[2::2]))}


def test_the_model_card_says_what_the_model_is_and_how_it_scored(trained, tmp_path, capsys):
    """A run's layout in tmp_path (checkpoints/latest.pt, metrics.json), with an evaluation.json
    beside the checkpoint: the card takes its figures, and passes over one of another file."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = run / "checkpoints" / "latest.pt"
    os.link(trained, ckpt)
    (run / "metrics.json").write_text(
        json.dumps({"r_precision": {"mean": 0.25, "std": 0.5}, "gan_seconds": 3})
    )
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    report = {
        "metrics": {
            "num_images": 500,
            "fid": 123.456,
            "kid": {"mean": 0.0125, "std": 0.002},
            "protocol": {"name": "clean", "network": "tf-2015-inception", "comparable_to": "pytorch-fid"},
            "caption_accuracy": {"colour": {"accuracy": 0.875, "captions": 500, "chance": 1 / 6}},
            "inception_score": "not computed: pass --is-classifier",
        },
        "settings": {"weights": "ema"},
        "checkpoint_sha256": sha,
    }
    (run / "checkpoints" / "evaluation.json").write_text(json.dumps(report))
    convert_main(["export", str(ckpt), str(tmp_path / "model")])
    card = _card_sections((tmp_path / "model" / "README.md").read_text())
    assert "license: mit" in card["metadata"] and "library_name: dmgan" in card["metadata"]
    assert '- "text-to-image"' in card["metadata"] and '- "dm-gan"' in card["metadata"]
    assert "datasets" not in card["metadata"]  # the shapes data is on no hub
    assert f'TextToImage.from_pretrained("{tmp_path / "model"}")' in card["How to use"]
    assert (
        "built-in shapes data" in card["Training data"]
        and "Trained for 2 generator steps" in card["Training data"]
    )
    assert str(tmp_path) not in card["Training data"]  # the data folder by its name only
    evaluation = card["Evaluation"]
    assert (
        "dmgan.evaluate" in evaluation
        and "| fid | 123.5 |" in evaluation
        and "| kid | 0.0125 ± 0.002 |" in evaluation
    )
    assert "| caption accuracy: colour | 0.875 (chance 0.1667) |" in evaluation
    assert (
        "Protocol `legacy-pytorch` (recorded under its old name `clean`) (network tf-2015-inception"
        in evaluation
        and "500 generated images" in evaluation
    )
    config = re.search(r"<details>.*```json\n(.*)```\n\n</details>", card["Configuration"], flags=re.S)
    assert json.loads(config[1]) == json.loads(json.dumps(checkpoint.load(trained)["config"]))
    assert "MIT" in card["License"]
    assert (
        "{DM-GAN}: Dynamic Memory Generative Adversarial Networks" in card["Citation"]
        and "2019" in card["Citation"]
    )

    report["checkpoint_sha256"] = "0" * 64  # an evaluation of another file: the run's metrics instead
    (run / "checkpoints" / "evaluation.json").write_text(json.dumps(report))
    convert_main(["export", str(ckpt), str(tmp_path / "model2")])
    assert "scored another file" in capsys.readouterr().out
    evaluation = _card_sections((tmp_path / "model2" / "README.md").read_text())["Evaluation"]
    assert (
        "metrics.json" in evaluation
        and "| r precision | 0.25 ± 0.5 |" in evaluation
        and "fid" not in evaluation
    )

    convert_main(["export", str(ckpt), str(tmp_path / "model3"), "--weights", "raw"])  # scored with ema
    evaluation = _card_sections((tmp_path / "model3" / "README.md").read_text())["Evaluation"]
    assert "Not evaluated yet" in evaluation
