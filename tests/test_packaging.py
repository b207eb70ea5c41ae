"""What the install exposes: the Triton kernels as ``dmgan.kernels``, no top-level ``kernels``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_install_exposes_dmgan_kernels_and_no_top_level_kernels_module(tmp_path):
    """Run from a folder outside the checkout, so only what is installed can be imported."""
    probe = (
        "import importlib.util, dmgan.kernels, dmgan.kernels.compile_gate; "
        "print(importlib.util.find_spec('kernels'), dmgan.kernels.__name__)"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None", "dmgan.kernels"]


def test_setup_lists_no_top_level_kernels_package():
    from setuptools import find_packages

    text = (ROOT / "setup.py").read_text()
    assert 'find_packages(include=["dmgan", "dmgan.*"])' in text
    packages = find_packages(str(ROOT), include=["dmgan", "dmgan.*"])
    assert "dmgan.kernels" in packages and not [p for p in packages if p.split(".")[0] != "dmgan"]
