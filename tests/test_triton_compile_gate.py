"""GPU compile gate without a GPU: every Triton kernel, at its launch configuration, compiles for
sm_86, sm_89, sm_90 and sm_120 (python -m kernels.compile_gate; its docstring has the findings).

16-bit I/O, the training path, must also be free of register spills; fp32 I/O must compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
ALL_ARCHS = ("86", "89", "90", "120")
SHIPPED = ["--channels", "32", "64", "--t-pad", "16", "32"]  # the presets: N_r 32 / 64, T <= 32

GATES = {
    "bf16-every-arch": (["--arch", *ALL_ARCHS, "--dtype", "bfloat16", *SHIPPED], False),
    "fp16-sm86": (["--arch", "86", "--dtype", "float16", *SHIPPED], False),
    "fp32-every-arch": (
        ["--arch", *ALL_ARCHS, "--dtype", "float32", "--channels", "64", "--t-pad", "32"],
        True,
    ),
}


@pytest.mark.skipif(not PTXAS.exists(), reason="this triton build ships no NVIDIA backend")
@pytest.mark.parametrize("gate", GATES)
def test_kernels_compile(gate, tmp_path):
    arguments, allow_spills = GATES[gate]
    report = tmp_path / "gate.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from a cache
    command = [sys.executable, "-m", "kernels.compile_gate", *arguments, "--json", str(report)]
    if allow_spills:
        command.append("--allow-spills")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
    print(result.stdout)
    results = json.loads(report.read_text())
    assert not [r for r in results if r["error"]], result.stdout[-3000:]
    if not allow_spills:
        assert not [r for r in results if r["spill_bytes"]], result.stdout[-3000:]
    assert result.returncode == 0, result.stderr[-3000:]
    assert {r["kernel"] for r in results} == {
        "memory_read_forward_kernel", "memory_read_backward_kernel",
        "memory_write_forward_kernel", "memory_write_backward_kernel",
    }  # fmt: skip
    assert {str(r["arch"]) for r in results} == set(arguments[1 : arguments.index("--dtype")])
    assert all(0 < r["registers"] <= 255 for r in results)
