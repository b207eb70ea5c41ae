"""Loading a model for inference: the memory backend is the caller's choice, not the checkpoint's;
``from dmgan import TextToImage`` without a heavy ``import dmgan``; configs of other versions."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

import dmgan
from dmgan import checkpoint
from dmgan.config import get_preset
from dmgan.models.generator import NEXT_STAGE_G
from dmgan.pipeline import TextToImage
from dmgan.runtime import RunOptions
from dmgan.sample import main as sample_main


def stage_backends(pipe: TextToImage) -> set[str]:
    return {m.backend for m in pipe.netG.modules() if isinstance(m, NEXT_STAGE_G)}


def test_checkpoints_do_not_store_the_memory_backend(trained):
    stored = checkpoint.load(trained)["config"]["model"]
    assert "memory_backend" not in stored and set(stored) == {
        f.name for f in dataclasses.fields(get_preset("shapes").model)
    }


def test_the_loader_chooses_the_backend_and_every_backend_draws_the_same(trained):
    captions = ["a large red circle", "a small blue square"]
    images = {}
    for backend in ("eager", "auto"):
        pipe = TextToImage.load(trained, memory_backend=backend)
        assert stage_backends(pipe) == {backend}
        images[backend] = pipe.generate(pipe.tokenize(captions), seed=1)[0][-1]
    torch.testing.assert_close(images["auto"], images["eager"], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown memory backend 'cuda-graphs'"):
        TextToImage.load(trained, memory_backend="cuda-graphs")


def test_a_checkpoint_that_stored_a_gpu_backend_still_loads_on_the_cpu(trained, tmp_path):
    """Older checkpoints carry ``model.memory_backend``; a model trained with triton on a GPU
    samples on a CPU with whatever backend runs there."""
    state = checkpoint.load(trained)
    state["config"]["model"]["memory_backend"] = "triton"
    old = checkpoint.save(state, tmp_path / "old.pt")
    pipe = TextToImage.load(old)
    assert stage_backends(pipe) == {"auto"}
    assert torch.isfinite(pipe.generate(pipe.tokenize(["a red circle"]), seed=0)[0][-1]).all()


def test_a_checkpoint_from_before_a_model_field_existed_loads_with_its_old_meaning(trained, tmp_path):
    """model.ca_noise_scale came later: a checkpoint without it was trained with CA-Net's full
    noise, and loads with that, not with the shapes preset's 0.1 of today."""
    state = checkpoint.load(trained)
    del state["config"]["model"]["ca_noise_scale"]
    pipe = TextToImage.load(checkpoint.save(state, tmp_path / "old.pt"))
    assert pipe.cfg.model.ca_noise_scale == 1.0
    state["config"]["model"]["no_such_field"] = 1
    with pytest.raises(ValueError, match="unknown field model.no_such_field"):
        TextToImage.load(checkpoint.save(state, tmp_path / "foreign.pt"))


def test_the_command_lines_take_the_memory_backend(trained, tmp_path):
    assert sample_main([str(trained), "a red circle", "--memory-backend", "eager", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):  # argparse: invalid choice
        sample_main([str(trained), "a red circle", "--memory-backend", "fast", "--out", str(tmp_path)])
    assert RunOptions(memory_backend="cpp").memory_backend == "cpp"
    with pytest.raises(ValueError, match="memory_backend must be one of"):
        RunOptions(memory_backend="fast")


def test_import_dmgan_is_light_and_text_to_image_comes_on_first_use():
    probe = (
        "import sys, dmgan; light = 'torch' not in sys.modules; "
        "from dmgan import TextToImage; import dmgan.pipeline; "
        "print(light, TextToImage is dmgan.pipeline.TextToImage, 'TextToImage' in dir(dmgan))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True", "True"]
    with pytest.raises(AttributeError, match="no attribute 'Pipeline'"):
        dmgan.Pipeline  # noqa: B018


def test_training_settings_of_another_version_do_not_stop_sampling(trained, tmp_path):
    """The train section only records how a model was trained: a field unknown here is passed
    over, a missing one takes today's default (the model and text sections must fit exactly)."""
    state = checkpoint.load(trained)
    state["config"]["train"]["warmup_steps"] = 100
    del state["config"]["train"]["encoder_recolour_backgrounds"]
    pipe = TextToImage.load(checkpoint.save(state, tmp_path / "other_train.pt"))
    assert pipe.cfg.train.encoder_recolour_backgrounds is False
    assert pipe.cfg.model == TextToImage.load(trained).cfg.model


def test_seeds_are_one_per_caption(trained):
    pipe = TextToImage.load(trained)
    with pytest.raises(ValueError, match="2 seeds for 1 captions"):
        pipe.generate(pipe.tokenize(["a red circle"]), seeds=[0, 1])
