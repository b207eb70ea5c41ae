"""A run's life: runs never clobber each other, --resume resumes something and refuses settings
that would break it, checkpoints are kept per step with a retention limit, --init-from starts a
new run from a model's weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dmgan import checkpoint
from dmgan.config import get_preset
from dmgan.data import shapes as shapes_data
from dmgan.runtime import RunOptions, check_run_folder, describe
from dmgan.train import main
from tests.tiny import TINY


def folder_with(tmp_path: Path, *files: str, name: str = "run") -> Path:
    out = tmp_path / name
    for name in files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(b"")
    return out


def check(out: Path, **options) -> None:
    opts = RunOptions(out=str(out), **options).resolved(torch.device("cpu"))  # as a run starts
    check_run_folder(opts, opts.config())


def test_a_new_run_refuses_a_folder_its_stages_wrote_in(tmp_path):
    out = folder_with(tmp_path, "damsm/text_encoder.pth", "checkpoints/latest.pt")
    with pytest.raises(SystemExit, match=r"already holds a run .*--resume.*--out .*run-2"):
        check(out)
    with pytest.raises(SystemExit, match="checkpoints/latest.pt"):
        check(out, stage="gan")
    check(folder_with(tmp_path, "damsm/text_encoder.pth", name="damsm-done"), stage="gan")  # GAN after DAMSM
    check(tmp_path / "fresh")


def test_resume_needs_something_to_resume(tmp_path):
    with pytest.raises(SystemExit, match="nothing to resume in"):
        check(tmp_path / "empty", resume="latest")
    with pytest.raises(SystemExit, match="no such checkpoint"):
        check(tmp_path, resume=str(tmp_path / "missing.pt"))
    with pytest.raises(SystemExit, match="--stage eval needs a trained checkpoint"):
        check(tmp_path / "empty", stage="eval")
    assert RunOptions(resume=True).resume == "latest" and RunOptions(resume=False).resume is None


def test_config_values_are_checked_on_the_command_line():
    from dmgan.train import parse_options

    with pytest.raises(SystemExit, match=r"train.batch_size: expected int, got 'abc'"):
        parse_options(["--set", "train.batch_size=abc"])
    assert parse_options(["--set", "train.batch_size=8"])[0].config().train.batch_size == 8


def test_resume_lists_changed_settings_and_refuses_those_that_break_the_run(tmp_path, capsys):
    out = folder_with(tmp_path, "checkpoints/latest.pt")
    stored = RunOptions(out=str(out))
    (out / "config.json").write_text(json.dumps(describe(stored, stored.config())))
    check(out, resume="latest", overrides={"train.g_lr": 1e-3, "train.betas": [0.5, 0.999]})
    assert "train.g_lr: 0.0004 -> 0.001" in capsys.readouterr().out  # betas: a list is the stored tuple
    with pytest.raises(SystemExit, match=r"model.r_num: 1 -> 2.*cannot change"):
        check(out, resume="latest", overrides={"model.r_num": 2})
    with pytest.raises(SystemExit, match="preset"):
        check(out, resume="latest", preset="bird")


@pytest.mark.slow
def test_snapshots_per_step_retention_tensorboard_and_init_from(tmp_path):
    data = shapes_data.generate(tmp_path / "data", num_train=32, num_test=10, seed=2)
    run = tmp_path / "run"
    base = ["--data-dir", str(data), "--set", "train.encoder_max_epoch=1", *TINY]
    main([*base, "--out", str(run), "--max-steps", "6", "--checkpoint-every", "2", "--keep-checkpoints", "2",
          "--report-to", "tensorboard"])  # fmt: skip
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("gan/g_loss")] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ] and "damsm/w_loss" in events.Tags()["scalars"]
    assert {"gan/samples", "gan/attention"} <= set(events.Tags()["images"])  # the grid, the word maps
    folder = run / "checkpoints"
    record = json.loads((run / "config.json").read_text())
    assert record["environment"]["torch"] == torch.__version__ and "dirty" in record["environment"]["git"]
    assert checkpoint.load(folder / "latest.pt")["environment"] == record["environment"]  # loads weights-only
    replay = tmp_path / "replay"
    main(["--config", str(run / "config.json"), "--out", str(replay), "--max-steps", "1"])
    replayed = json.loads((replay / "config.json").read_text())
    assert replayed["config"] == record["config"]
    changed = {k for k, v in record["options"].items() if replayed["options"][k] != v}
    assert changed == {"out", "max_steps"}  # what the command line gave beside the file
    assert sorted(p.name for p in folder.glob("*.pt")) == ["latest.pt", "step-000004.pt", "step-000006.pt"]
    assert (folder / "latest.pt").stat().st_ino == (folder / "step-000006.pt").stat().st_ino  # written once
    assert checkpoint.load(folder / "step-000004.pt")["step"] == 4

    encoders = ["--text-encoder", str(run / "damsm" / "text_encoder.pth")]
    encoders += ["--image-encoder", str(run / "damsm" / "image_encoder.pth")]
    started = tmp_path / "started"
    main(
        [
            *base,
            *encoders,
            "--out",
            str(started),
            "--stage",
            "gan",
            "--max-steps",
            "1",
            "--init-from",
            str(folder / "latest.pt"),
        ]
    )
    new, old = checkpoint.load(started / "checkpoints" / "latest.pt"), checkpoint.load(folder / "latest.pt")
    assert new["step"] == 1 and new["gan"]["optimizerG"]["state"][0]["step"] == 1  # fresh optimizers
    # One step of Adam (lr 4e-4) from the loaded weights: close to them, far from a fresh start.
    weights = [k for k, v in old["gan"]["netG"].items() if k.endswith("weight") and v.dim() > 1]
    assert max((new["gan"]["netG"][k] - old["gan"]["netG"][k]).abs().max() for k in weights) < 1e-2
    with pytest.raises(SystemExit, match=r"--init-from: .*expected the generator.* has shape"):
        main([*base, *encoders, "--out", str(tmp_path / "other"), "--stage", "gan", "--max-steps", "1",
              "--init-from", str(folder / "latest.pt"), "--set", "model.gf_dim=16"])  # fmt: skip
    assert torch.equal(
        old["gan"]["netG"]["ca_net.fc.weight"],
        checkpoint.load(folder / "step-000006.pt")["gan"]["netG"]["ca_net.fc.weight"],
    )
    assert get_preset("shapes").train.snapshot_interval == 1  # the default interval: an epoch
