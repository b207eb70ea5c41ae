"""The supported torch range (dmgan/ops/_build.py): 2.11, the GPU machine's, to 2.14, the pinned
one; enforced when setup.py builds the extension and when dmgan.ops loads it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import toolchain

# --- the supported range, enforced when building and when loading


ROOT = Path(__file__).resolve().parents[1]


def test_the_supported_torch_range_holds_the_pinned_and_the_gpu_machines_torch():
    from dmgan.ops import _build

    assert _build.TORCH_REQUIREMENT == "torch>=2.11,<2.15"
    for version in ("2.11.0", "2.11.0+cu130", "2.12.1", "2.14.1", "2.14.1+cpu", toolchain.TORCH):
        assert _build.torch_version_problem(version) is None, version
    for version in ("2.10.0", "2.10.1+cu128", "2.15.0", "2.15.0.dev20261201", "3.0.0"):
        problem = _build.torch_version_problem(version)
        assert problem is not None and f"torch {version} is installed" in problem, version
        assert "2.11 to 2.14 (torch>=2.11,<2.15)" in problem
    assert 'PINNED = ["torch==2.14.1"' in (ROOT / "setup.py").read_text()
    assert _build.cxx_standard("2.11.0+cu130") == "c++17" and _build.cxx_standard("2.14.1") == "c++20"


def test_the_ops_layer_refuses_a_torch_outside_the_range_when_loading_the_extension(monkeypatch):
    """The cpp backend counts as unavailable, with the reason, before any prebuilt dmgan._C is
    loaded or csrc/ built; DMGAN_ALLOW_ANY_TORCH=1 lets it try."""
    import torch

    from dmgan import ops
    from dmgan.ops import _build
    from dmgan.ops.parity import ReadShape, read_case

    case = read_case(ReadShape(1, 32, 2, 2, (1,)), torch.float32)
    monkeypatch.setattr(torch, "__version__", "2.15.0+cu130")
    monkeypatch.delenv(_build.ALLOW_ANY_TORCH, raising=False)
    monkeypatch.delitem(sys.modules, "dmgan.ops._cpp", raising=False)
    # Fresh copies without the cpp backend; the real ones come back after the test.
    monkeypatch.setattr(ops, "_loaded", {k: v for k, v in ops._loaded.items() if k != "cpp"})
    monkeypatch.setattr(ops, "_load_errors", {k: v for k, v in ops._load_errors.items() if k != "cpp"})
    with pytest.raises(
        RuntimeError, match=r"backend 'cpp' is unavailable: ImportError: .*torch 2\.15\.0\+cu130 is"
    ):
        ops.memory_read(**case, backend="cpp")
    assert "supports torch 2.11 to 2.14" in ops._load_errors["cpp"]
    monkeypatch.setenv(_build.ALLOW_ANY_TORCH, "1")
    _build.check_torch_version()  # no error


def test_setup_py_refuses_to_build_with_a_torch_outside_the_range():
    code = (
        "import runpy, sys, torch\n"
        "torch.__version__ = '2.10.0'\n"
        "sys.argv = ['setup.py', '--name']\n"
        "runpy.run_path('setup.py', run_name='__main__')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DMGAN_ALLOW_ANY_TORCH"}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
    assert run.returncode != 0
    assert "dmgan: dmgan's C++/CUDA extension supports torch 2.11 to 2.14" in run.stderr, run.stderr[-2000:]
    assert "torch 2.10.0 is installed" in run.stderr
