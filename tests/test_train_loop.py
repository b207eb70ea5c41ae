"""The training script end to end on tiny shapes data: stages, AMP modes, resume equality,
2-process Gloo DDP, NaN/Inf handling, signals, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dmgan import checkpoint
from dmgan.config import TINY_OVERRIDES
from dmgan.data import DatasetLayoutError
from dmgan.data import shapes as shapes_data
from dmgan.train import main, train_from_command_line
from tests.tiny import TINY

pytestmark = pytest.mark.slow  # training runs
REPO = Path(__file__).resolve().parents[1]
RECOLOUR = "train.encoder_recolour_backgrounds"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return shapes_data.generate(tmp_path_factory.mktemp("shapes"), num_train=32, num_test=8, seed=1)


@pytest.fixture(scope="module")
def encoders(data_dir, tmp_path_factory) -> list[str]:
    """A DAMSM stage of one epoch (with the shapes-only background recolouring); its encoders
    are given to the GAN runs below."""
    out = tmp_path_factory.mktemp("damsm")
    main(
        [
            "--data-dir",
            str(data_dir),
            "--out",
            str(out),
            "--stage",
            "damsm",
            "--set",
            "train.encoder_max_epoch=1",
            "--set",
            f"{RECOLOUR}=true",
            *TINY,
        ]
    )
    return [
        "--text-encoder",
        str(out / "damsm" / "text_encoder.pth"),
        "--image-encoder",
        str(out / "damsm" / "image_encoder.pth"),
    ]


def gan_args(data_dir: Path, out: Path, encoders: list[str], *extra: str) -> list[str]:
    return ["--data-dir", str(data_dir), "--out", str(out), "--stage", "gan", *encoders, *TINY, *extra]


def metrics(out: Path, stage: str = "gan") -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["stage"] == stage]


def test_damsm_stage_writes_reference_style_encoders(encoders):
    text = checkpoint.load(encoders[1])
    assert "encoder.weight" in text and any(k.startswith("rnn.") for k in text)
    assert "emb_cnn_code.weight" in checkpoint.load(encoders[3])


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_a_few_steps_per_amp_mode(data_dir, encoders, tmp_path, amp):
    _results, gan = train_from_command_line(
        gan_args(data_dir, tmp_path, encoders, "--amp", amp, "--max-steps", "2")
    )
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(
        r["nonfinite"] == 0 and all(map(torch.isfinite, map(torch.tensor, (r["g_loss"], r["d_loss0"]))))
        for r in rows
    )
    assert gan.amp == amp and gan.scalerG.is_enabled() == (amp == "fp16")
    assert all(p.dtype == torch.float32 for p in gan.netG.parameters())
    assert (tmp_path / "samples" / "step000002.png").is_file()
    state = checkpoint.load(tmp_path / "checkpoints" / "latest.pt")
    assert state["step"] == 2 and checkpoint.all_finite(state["gan"])


def test_resume_gives_identical_weights(data_dir, encoders, tmp_path):
    train_from_command_line(
        gan_args(data_dir, tmp_path / "straight", encoders, "--max-steps", "6")
    )  # crosses an epoch (8 batches)
    train_from_command_line(gan_args(data_dir, tmp_path / "halves", encoders, "--max-steps", "3"))
    train_from_command_line(gan_args(data_dir, tmp_path / "halves", encoders, "--max-steps", "6", "--resume"))
    a = checkpoint.load(tmp_path / "straight" / "checkpoints" / "latest.pt")
    b = checkpoint.load(tmp_path / "halves" / "checkpoints" / "latest.pt")
    assert a["step"] == b["step"] == 6
    for part in ("netG", "netsD", "ema", "optimizerG"):
        flat_a = [t for t in _tensors(a["gan"][part])]
        flat_b = [t for t in _tensors(b["gan"][part])]
        assert len(flat_a) == len(flat_b) > 0
        assert all(torch.equal(x, y) for x, y in zip(flat_a, flat_b)), part
    c = checkpoint.load(tmp_path / "halves" / "checkpoints" / "latest.pt")
    assert not all(
        torch.equal(x, y)
        for x, y in zip(
            _tensors(c["gan"]["netG"]),
            _tensors(checkpoint.load(tmp_path / "straight" / "checkpoints" / "latest.pt")["gan"]["ema"]),
        )
    )


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _tensors(obj[k])
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def two_gloo_processes(dump: Path, args: list[str], **env: str) -> subprocess.CompletedProcess:
    """``train.py args`` under torchrun, two CPU processes (tests/_ddp_worker.py dumps each rank's
    generator into ``dump``); fails the test if the run fails."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(REPO / "tests" / "_ddp_worker.py"), str(dump), *args, "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_gloo_processes_keep_identical_generators(data_dir, encoders, tmp_path):
    proc = two_gloo_processes(tmp_path, gan_args(data_dir, tmp_path / "out", encoders, "--max-steps", "3"))
    g0, g1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert g0["params"].keys() == g1["params"].keys()
    # Parameters and their EMA agree bit for bit. (BatchNorm running statistics are per rank, as in
    # any DDP run without --sync-bn; DDP broadcasts rank 0's at every forward.)
    assert all(torch.equal(g0["params"][k], g1["params"][k]) for k in g0["params"])
    assert all(torch.equal(a, b) for a, b in zip(g0["ema"], g1["ema"]))
    state = checkpoint.load(tmp_path / "out" / "checkpoints" / "latest.pt")
    assert state["step"] == 3
    assert all(torch.equal(state["gan"]["netG"][k], v) for k, v in g0["params"].items())
    assert "cpu x 2" in proc.stdout


def test_the_other_processes_wait_out_an_evaluation_longer_than_the_collectives_timeout(
    data_dir, encoders, tmp_path
):
    """Under torchrun the first process evaluates alone; the others wait for it on a group of
    their own (--main-work-timeout), not in the next collective, whose timeout (--dist-timeout,
    6 s here) the evaluation (12 s) outlasts."""
    args = gan_args(data_dir, tmp_path / "out", encoders, "--max-steps", "2", "--eval-every", "1")
    two_gloo_processes(tmp_path, [*args, "--dist-timeout", "0.1"], DMGAN_TEST_EVALUATION_SECONDS="12")
    assert [r["step"] for r in metrics(tmp_path / "out", stage="eval")] == [1, 2]
    assert checkpoint.load(tmp_path / "out" / "checkpoints" / "latest.pt")["step"] == 2


def test_nonfinite_steps_are_skipped_then_training_stops(data_dir, encoders, tmp_path, monkeypatch):
    import dmgan.training_step as train_module

    real_loss = train_module.generator_loss
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        total, parts = real_loss(*args, **kwargs)
        calls["n"] += 1
        return (total * float("nan"), parts) if calls["n"] == 2 else (total, parts)

    monkeypatch.setattr(train_module, "generator_loss", sometimes_nan)
    train_from_command_line(gan_args(data_dir, tmp_path / "once", encoders, "--max-steps", "3"))
    rows = metrics(tmp_path / "once")
    assert rows[-1]["step"] == 3 and rows[-1]["skipped_steps"] == 1
    assert checkpoint.all_finite(checkpoint.load(tmp_path / "once" / "checkpoints" / "latest.pt")["gan"])

    monkeypatch.setattr(
        train_module, "generator_loss", lambda *a, **k: (real_loss(*a, **k)[0] * float("inf"), {})
    )
    with pytest.raises(SystemExit, match="3 steps in a row had NaN/Inf losses"):
        train_from_command_line(
            gan_args(data_dir, tmp_path / "always", encoders, "--max-steps", "3", "--max-nonfinite", "3")
        )
    assert not (tmp_path / "always" / "checkpoints" / "latest.pt").exists()


def test_checkpoint_with_nonfinite_weights_is_never_written(data_dir, encoders, tmp_path, monkeypatch):
    from dmgan.ema import ParameterEMA

    real_update = ParameterEMA.update

    def poisoned_update(self, model, **kwargs):  # losses stay finite; only the averaged weights go bad
        real_update(self, model, **kwargs)
        self.params[0].view(-1)[0] = float("nan")

    monkeypatch.setattr(ParameterEMA, "update", poisoned_update)
    with pytest.raises(SystemExit, match="refusing to write a checkpoint"):
        train_from_command_line(gan_args(data_dir, tmp_path, encoders, "--max-steps", "2"))
    assert not (tmp_path / "checkpoints" / "latest.pt").exists()


def test_interrupted_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "latest.pt"
    checkpoint.save({"step": 1, "w": torch.ones(3)}, path)

    def crash(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert checkpoint.load(path)["step"] == 1 and list(tmp_path.iterdir()) == [path]


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(data_dir, encoders, tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        *gan_args(data_dir, out, encoders, "--max-steps", "100000", "--checkpoint-every", "100000"),
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and metrics(out)):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "SIGTERM: checkpoint written" in stdout and "Traceback" not in stderr
    state = checkpoint.load(out / "checkpoints" / "latest.pt")
    assert state["step"] >= 1 and checkpoint.all_finite(state["gan"])


def test_max_steps_is_the_step_count_even_past_the_epochs(data_dir, encoders, tmp_path):
    """It used to cap silently at the preset's epochs: ``--max-steps 3000`` ran 2000 steps."""
    train_from_command_line(
        gan_args(data_dir, tmp_path, encoders, "--set", "train.max_epoch=1", "--max-steps", "11")
    )  # 8 batches an epoch
    assert metrics(tmp_path)[-1]["step"] == 11
    assert checkpoint.load(tmp_path / "checkpoints" / "latest.pt")["step"] == 11


def test_corrupt_image_is_skipped_and_reported(data_dir, encoders, tmp_path):
    copy = shutil.copytree(data_dir, tmp_path / "data")
    (copy / "images" / "train_00005.png").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable image"):
        train_from_command_line(
            gan_args(copy, tmp_path / "out", encoders, "--max-steps", "8")
        )  # one epoch: every image
    assert metrics(tmp_path / "out")[-1]["skipped_images"] == 1


def test_bad_input_errors(data_dir, encoders, tmp_path):
    with pytest.raises(DatasetLayoutError, match="expected the AttnGAN layout"):
        main(["--data-dir", str(tmp_path / "missing"), "--out", str(tmp_path), *TINY])
    with pytest.raises(SystemExit, match="needs a DAMSM text encoder"):
        main(["--data-dir", str(data_dir), "--out", str(tmp_path / "x"), "--stage", "gan", *TINY])
    bad_vocab = tmp_path / "text_encoder.pth"
    state = checkpoint.load(encoders[1])
    state["encoder.weight"] = torch.zeros(7, state["encoder.weight"].shape[1])
    checkpoint.save(state, bad_vocab)
    with pytest.raises(
        ValueError, match=r"vocabulary mismatch: captions.pickle has \d+ words .* trained with 7"
    ):
        main(gan_args(data_dir, tmp_path / "y", ["--text-encoder", str(bad_vocab), *encoders[2:]]))
    with pytest.raises(SystemExit):
        main(["--preset", "bird", "--out", str(tmp_path / "z")])  # the real presets need --data-dir
    not_shapes = shutil.copytree(data_dir, tmp_path / "not_shapes")
    (not_shapes / "attributes.json").unlink()  # as CUB / COCO: no shapes attributes
    with pytest.raises(SystemExit, match="recolour_backgrounds applies to the built-in shapes data only"):
        main(
            [
                "--data-dir",
                str(not_shapes),
                "--out",
                str(tmp_path / "w"),
                "--stage",
                "damsm",
                "--set",
                f"{RECOLOUR}=true",
                *TINY,
            ]
        )


def test_stages_run_from_python_with_run_options(tmp_path):
    """No command line: a RunOptions object, the run opened from it, each stage called in turn."""
    from dmgan.runtime import RunOptions, default_amp, start_run
    from dmgan.trainer import pretrain_damsm, short_evaluation, train_gan

    tiny = {**TINY_OVERRIDES, "train.encoder_max_epoch": 1}
    data = shapes_data.generate(
        tmp_path / "data", num_train=32, num_test=10, seed=2
    )  # 10: R-precision's folds
    options = RunOptions(data_dir=str(data), out=str(tmp_path), overrides=tiny, max_steps=2, threads=1)
    with start_run(options) as started:
        assert started.options.amp == default_amp(torch.device("cpu"))[0]  # what this CPU does best
        assert started.options.workers == 0 and started.config.train.batch_size == 4
        pretrain_damsm(started, data)
        state = train_gan(started, data)
        results = short_evaluation(started, data, state)
    assert (tmp_path / "damsm" / "text_encoder.pth").is_file() and 0 <= results["r_precision"]["mean"] <= 1
    assert checkpoint.load(tmp_path / "checkpoints" / "latest.pt")["step"] == 2
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["options"]["max_steps"] == 2 and saved["options"]["amp"] == started.options.amp
    assert saved["config"]["train"]["batch_size"] == 4 and saved["config"]["name"] == "shapes"


def test_print_config_prints_the_resolved_run_and_exits(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["--out", str(tmp_path), "--set", "model.r_num=3", "--max-steps", "7", "--print-config"])
    assert stopped.value.code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["config"]["model"]["r_num"] == 3 and printed["options"]["max_steps"] == 7
    assert printed["options"]["out"] == str(tmp_path) and printed["options"]["amp"] in ("off", "bf16")
    assert not (tmp_path / "config.json").exists()  # nothing ran


def test_each_setting_has_one_way_to_be_set(capsys):
    """Config fields are set with --set only (no --epochs beside --set train.max_epoch), and an
    unknown field is refused before anything starts."""
    for removed in ("--epochs", "--damsm-epochs", "--batch-size"):
        with pytest.raises(SystemExit):
            main([removed, "2", "--print-config"])
        assert "unrecognized arguments" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="train has no field .nope."):
        main(["--set", "train.nope=1", "--print-config"])


def test_accumulate_trains_with_micro_batches_and_refuses_a_size_that_does_not_divide(
    data_dir, encoders, tmp_path
):
    train_from_command_line(
        gan_args(
            data_dir,
            tmp_path / "two",
            encoders,
            "--accumulate",
            "2",
            "--max-steps",
            "2",
            "--channels-last",
            "on",
        )
    )
    assert metrics(tmp_path / "two")[-1]["step"] == 2
    options = json.loads((tmp_path / "two" / "config.json").read_text())["options"]
    assert options["accumulate"] == 2 and options["channels_last"] == "on"
    with pytest.raises(SystemExit, match="--accumulate 3 must divide the batch size 4"):
        train_from_command_line(
            gan_args(data_dir, tmp_path / "three", encoders, "--accumulate", "3", "--max-steps", "1")
        )


def test_eval_every_logs_the_metrics_keeps_the_best_fid_and_resume_keeps_it(tmp_path):
    """--eval-every: FID, KID, precision / recall, R-precision and caption accuracy in
    metrics.jsonl; best.pt holds the weights of the lowest FID so far, and a resumed run goes on
    from that best instead of forgetting it."""
    data = shapes_data.generate(tmp_path / "data", num_train=32, num_test=10, seed=3)
    base = ["--data-dir", str(data), "--out", str(tmp_path / "run"), "--set", "train.encoder_max_epoch=1",
            *TINY, "--eval-every", "2", "--eval-images", "10"]  # fmt: skip
    train_from_command_line([*base, "--max-steps", "4"])
    evals = metrics(tmp_path / "run", stage="eval")
    assert [r["step"] for r in evals] == [2, 4]
    assert all(r["fid"] > 0 and 0 <= r["precision"] <= 1 and "caption_accuracy_colour" in r for r in evals)
    latest = checkpoint.load(tmp_path / "run" / "checkpoints" / "latest.pt")
    best_fid = min(r["fid"] for r in evals)
    assert latest["best"] == {"fid": best_fid, "step": next(r["step"] for r in evals if r["fid"] == best_fid)}
    assert checkpoint.load(tmp_path / "run" / "checkpoints" / "best.pt")["step"] == latest["best"]["step"]
    train_from_command_line(
        [*base, "--max-steps", "6", "--resume", "--stage", "gan", "--channels-last", "on"]
    )  # either layout resumes
    evals = metrics(tmp_path / "run", stage="eval")
    assert [r["step"] for r in evals] == [2, 4, 6]
    resumed = checkpoint.load(tmp_path / "run" / "checkpoints" / "latest.pt")["best"]
    assert resumed["fid"] == min(r["fid"] for r in evals)  # the best across both runs
    assert checkpoint.load(tmp_path / "run" / "checkpoints" / "best.pt")["step"] == resumed["step"]
