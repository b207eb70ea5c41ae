"""Models by Hub repo id, without a network: a Hugging Face Hub cache laid out as the Hub lays it
(``models--OWNER--NAME/{blobs,snapshots/<commit>,refs/main}``) under a temporary ``HF_HUB_CACHE``
with ``HF_HUB_OFFLINE=1``, read by repo id; ``--push-to-hub`` with ``HfApi``'s methods replaced,
checking what would be uploaded."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from dmgan.convert import main as convert_main
from dmgan.pipeline import TextToImage, is_repo_id, report_path
from dmgan.sample import main as sample_main

pytest.importorskip("huggingface_hub")

REPO = "dmgan-tests/tiny-shapes"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def lay_out_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str = COMMIT) -> Path:
    """``folder``'s files as the Hub client caches a download of ``repo_id`` at ``commit``: each
    file's bytes once under blobs/ (named by their hash), the snapshot a folder of relative links
    to them, and refs/main naming the commit. Returns the snapshot folder."""
    owner, name = repo_id.split("/")
    repo = cache / f"models--{owner}--{name}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)  # no newline, as the client writes it
    return snapshot


@pytest.fixture
def hub_cache(trained, tmp_path, monkeypatch):
    """The tiny model exported and cached as repo REPO; offline; run from an empty folder (so no
    local folder shadows the repo id)."""
    export = tmp_path / "export"
    convert_main(["export", str(trained), str(export)])
    cache = tmp_path / "hf-cache"
    lay_out_hub_cache(cache, REPO, export)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return cache


def test_a_repo_id_loads_from_the_hub_cache_offline_and_draws_what_the_checkpoint_draws(trained, hub_cache):
    pipe = TextToImage.from_pretrained(REPO)
    assert pipe.source == REPO
    original = TextToImage.load(trained)
    captions = original.tokenize(["a large red circle", "a small blue square"])
    first, second = original.generate(captions, seed=4)[0], pipe.generate(captions, seed=4)[0]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert TextToImage.load(REPO).vocab.ixtoword == original.vocab.ixtoword  # load and from_pretrained: one


def test_the_commands_take_a_repo_id(hub_cache, tmp_path):
    written = sample_main([REPO, "a red circle", "--seeds", "0-1", "--out", str(tmp_path / "s")])
    assert sum(p.name.startswith("caption000_seed") for p in written) == 2
    pytest.importorskip("gradio")
    from dmgan.demo import Demo

    assert Demo(REPO, "cpu").pipelines["ema"].source == REPO


def test_evaluate_writes_a_repo_ids_report_in_the_current_folder(hub_cache):
    from dmgan.evaluate import main as evaluate_main

    evaluate_main([REPO, "--num-images", "10", "--no-fid"])
    here = sorted(p.name for p in Path.cwd().iterdir())  # the fixture's empty folder
    assert here == ["dmgan-tests--tiny-shapes-evaluation.json"]  # not dmgan-tests/evaluation.json
    report = json.loads(Path(here[0]).read_text())
    assert report["source"] == REPO and report["metrics"]["num_images"] == 10


def test_a_repo_missing_from_the_cache_offline_is_one_line_naming_it_and_the_cache(hub_cache):
    with pytest.raises(
        FileNotFoundError,
        match=r"^checkpoint not found: dmgan-tests/other is no file or folder here, nor in the Hugging Face Hub cache",
    ) as e:
        TextToImage.load("dmgan-tests/other")
    assert str(hub_cache) in str(e.value) and "HF_HUB_OFFLINE=1" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SystemExit, match=r"^dmgan.sample: checkpoint not found: dmgan-tests/other"):
        sample_main(["dmgan-tests/other", "a red circle"])


def test_a_cached_repo_that_is_no_dmgan_export_is_named(hub_cache, tmp_path):
    other = tmp_path / "not-a-model"
    other.mkdir()
    (other / "config.json").write_text("{}")
    lay_out_hub_cache(hub_cache, "dmgan-tests/not-a-model", other)
    with pytest.raises(
        FileNotFoundError, match=r"^dmgan-tests/not-a-model \(Hugging Face Hub\): .*model.safetensors"
    ):
        TextToImage.load("dmgan-tests/not-a-model")


def test_without_huggingface_hub_a_repo_id_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(FileNotFoundError, match=r"install huggingface_hub \(pip install -e \"\.\[hub\]\"\)"):
        TextToImage.load(REPO)


def test_what_reads_as_a_repo_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "model").mkdir()
    assert is_repo_id("owner/name") and is_repo_id("Some-Org/dm_gan.v2")
    assert not is_repo_id("runs/latest")  # a folder of that name is here: a mistyped path
    assert not is_repo_id("owner/latest.pt")  # a checkpoint's suffix
    assert not is_repo_id("model")  # no owner; and it exists
    assert not is_repo_id("a/b/c") and not is_repo_id("owner/na--me") and not is_repo_id("/abs/path")
    assert report_path("owner/name") == Path("owner--name-evaluation.json")
    assert report_path("runs/shapes/checkpoints/latest.pt") == Path("runs/shapes/checkpoints/evaluation.json")
    with pytest.raises(FileNotFoundError, match="checkpoint not found: runs/latest"):
        TextToImage.load("runs/latest")


def test_push_to_hub_uploads_the_export_folder_with_its_card(trained, tmp_path, monkeypatch):
    from huggingface_hub import HfApi, ModelCard

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may reach the network: the methods are stand-ins
    calls = []
    monkeypatch.setattr(
        HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw))
    )

    def upload_folder(self, **kw):
        folder = Path(kw["folder_path"])
        calls.append(("upload", kw["repo_id"], kw, sorted(p.name for p in folder.iterdir())))
        return "https://example.invalid/commit/1"

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    folder = tmp_path / "export"
    (tmp_path / "export").mkdir()
    (folder / "notes.txt").write_text("not part of the model")
    convert_main(["export", str(trained), str(folder), "--push-to-hub", REPO, "--dataset", "someone/shapes"])
    (create, repo, options), (upload, repo2, kw, files) = calls
    assert create == "create" and repo == REPO and options["exist_ok"] is True
    assert upload == "upload" and repo2 == REPO and kw["repo_type"] == "model"
    assert set(kw["allow_patterns"]) == {"model.safetensors", "config.json", "vocab.json", "README.md"}
    assert "notes.txt" in files  # in the folder, but not what the patterns upload
    card = ModelCard((folder / "README.md").read_text())  # the Hub's own parser of the metadata
    assert card.data.license == "mit" and card.data.library_name == "dmgan"
    assert {"text-to-image", "dm-gan"} <= set(card.data.tags) and card.data.datasets == ["someone/shapes"]
    assert f'TextToImage.from_pretrained("{REPO}")' in card.text


def test_a_failed_push_is_one_line_and_the_folder_stays(trained, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    def refuse(self, repo_id, **kw):
        raise OSError("no token: run hf auth login\nmore detail")

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    with pytest.raises(
        SystemExit,
        match=r"^dmgan.convert: pushing .* to the Hugging Face Hub repo .* failed \(OSError: no token",
    ):
        convert_main(["export", str(trained), str(tmp_path / "e"), "--push-to-hub", REPO])
    assert (tmp_path / "e" / "model.safetensors").is_file()
