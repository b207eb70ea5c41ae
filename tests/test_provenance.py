"""The run's record: versions, git state and devices; the deterministic switches."""

from __future__ import annotations

import json
import platform
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch

import dmgan
from dmgan import provenance
from dmgan.config import TINY_OVERRIDES, get_preset, override
from dmgan.provenance import environment_record, git_state, set_deterministic

CHECKOUT = Path(dmgan.__file__).resolve().parent.parent
needs_git = pytest.mark.skipif(
    shutil.which("git") is None or not (CHECKOUT / ".git").exists(), reason="needs git and a checkout"
)


@needs_git
def test_the_record_names_versions_commit_and_devices():
    record = environment_record(torch.device("cpu"), world_size=2)
    assert record["dmgan"] == dmgan.__version__
    assert record["torch"] == torch.__version__ and record["python"] == platform.python_version()
    assert record["cuda"] == torch.version.cuda
    assert record["cudnn"] is None or isinstance(record["cudnn"], int)
    assert re.fullmatch(r"[0-9a-f]{40}", record["git"]["commit"])
    assert isinstance(record["git"]["dirty"], bool) and record["git"]["reason"] is None
    assert record["device"] == "cpu" and record["device_name"] == record["cpu"] and record["cpu"]
    assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["world_size"] == 2
    text = json.dumps(record)  # goes into config.json as it is
    host = socket.gethostname()
    assert len(host) < 6 or host not in text  # no personal data (short names would match by chance)


@needs_git
def test_the_commit_is_the_checkouts_head():
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=CHECKOUT, capture_output=True, text=True)
    assert git_state(CHECKOUT)["commit"] == head.stdout.strip()


def test_without_git_the_record_says_why_and_does_not_fail(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git to be found
    record = environment_record("cpu")
    assert record["git"] == {"commit": None, "dirty": None, "reason": "git is not installed"}
    assert record["torch"] == torch.__version__


def test_a_git_that_fails_or_hangs_gives_a_reason(monkeypatch):
    def hang(*args, **kwargs):
        raise subprocess.TimeoutExpired(args[0], 30)

    monkeypatch.setattr(provenance.subprocess, "run", hang)
    state = git_state(CHECKOUT)
    assert state["commit"] is None and state["dirty"] is None and "TimeoutExpired" in state["reason"]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_outside_a_checkout_or_inside_someone_elses_there_is_no_commit(tmp_path):
    assert git_state(tmp_path)["reason"].startswith("git failed: ")  # not a repository
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    installed = tmp_path / "venv" / "site-packages"  # dmgan installed in a project's environment
    installed.mkdir(parents=True)
    state = git_state(installed)
    assert state["commit"] is None and "not imported from the top of a git checkout" in state["reason"]


@pytest.fixture
def torch_flags(monkeypatch):
    """The switches set_deterministic changes, put back after the test."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # monkeypatch restores it
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2:4]
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[4:6]


def test_set_deterministic_sets_the_switches_and_says_so(torch_flags):
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    state = set_deterministic(True)
    assert state == {
        "deterministic_algorithms": True,
        "cudnn_deterministic": True,
        "cudnn_benchmark": False,
        "matmul_tf32": False,
        "cudnn_tf32": False,
        "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
    }
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    off = set_deterministic(False)
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    assert off["deterministic_algorithms"] is False and off["cudnn_deterministic"] is False


def test_set_deterministic_keeps_a_workspace_setting_already_made(torch_flags, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    assert set_deterministic(True)["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_a_training_step_runs_deterministically_on_the_cpu(torch_flags):
    from dmgan.training_step import TrainingState, synthetic_batch

    cfg = override(get_preset("shapes"), **{**TINY_OVERRIDES, "model.base_size": 16})
    set_deterministic(True)

    def step() -> dict[str, float]:
        torch.manual_seed(0)
        state = TrainingState.build(cfg, vocab_size=20)
        return {k: float(v) for k, v in state.step(synthetic_batch(cfg, 20, 4, "cpu")).items()}

    assert step() == step()
