"""The GPU machine's stack in CI: torch 2.11 and triton 3.6 (the oldest dmgan supports), beside the
pinned torch of the main environment.

``test_the_oldest_supported_torch_passes_the_toolchain_cases`` makes (or reuses) the environment
of tests/toolchain.py and, in a copy of this checkout, runs there what differs by toolchain:

- the extension built on first use (``dmgan.ops._cpp``, as benchmarks.device_check builds it on
  the GPU machine) with that torch's own flags, CPU and CUDA kernels (sm_90, where a CUDA toolkit
  is found), and the tests of this file marked :data:`INSIDE`, which check that it was torch 2.11
  and ``-std=c++17``;
- tests/test_csrc.py: the input checks, the loading (its C++17 syntax check is left out: the
  build above is the proof there);
- tests/test_ops_backends.py: every case of the C++ backend, the Triton kernels under the
  interpreter on a few shapes, opcheck, torch.compile(fullgraph=True) of a refinement stage;
- tests/test_ops_cuda_on_cpu.py: the CUDA kernels built for the CPU with HIP-CPU (with torch
  2.11's flags too), on a third of its cases (:data:`SELECTION`);
- the Triton compile gate for sm_90 at the bird sizes (bf16), with that triton's compiler;
- ``python -m benchmarks.device_check OUT --dry-run`` (its build stage CPU-only: the CUDA
  kernels were built above).

Its cost: the environment the first time (4.9 GB installed, cached: see tests/toolchain.py), the
builds (cached too) and the tests; the README has the measured
times. ``pytest -m "not toolchain"`` leaves it out. Each part's log and reports stay in the work
folder (``toolchain.work_dir()``: tests.log, tests.xml, compile_gate.log, device_check/).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests import toolchain

STAGE = "DMGAN_TOOLCHAIN_STAGE"  # set, to the torch version expected, in the stage's environment
INSIDE = pytest.mark.skipif(os.environ.get(STAGE) is None, reason="runs inside the torch 2.11 stage")

# What runs in the stage: what differs by toolchain, on few enough cases to keep it short. The
# Triton kernels under the interpreter (slow): the mixed caption lengths, a fully padded caption and
# several tiles, both layouts, the write with N_w off the chunk. The HIP-CPU cases: every write,
# the reads with several blocks, a fully padded caption, the widest N_r and T, in every dtype.
SELECTION = [
    "tests/test_toolchain.py",
    "tests/test_csrc.py",
    "tests/test_ops_backends.py",
    "tests/test_ops_cuda_on_cpu.py",
    "-k",
    "test_toolchain or (test_csrc and not cpp17)"
    " or (test_ops_backends and (cpp or opcheck or compile or (triton and (B2-C32-5x7 or B3-C32-9x7 or B2-Nw40))))"
    " or (test_ops_cuda_on_cpu and (write or reproducible or float64 or 17x17 or 9x7 or C128))",
]
# Tests that must have passed there (not skipped): the proof that each part ran.
MUST_PASS = [
    "test_toolchain.py::test_the_stage_runs_the_oldest_supported_torch_and_triton",
    "test_toolchain.py::test_the_stage_built_the_extension_with_that_torchs_cxx17_flags",
    "test_csrc.py::test_bad_write_input_names_the_weight",
    "test_ops_backends.py::test_memory_read_matches_reference[mask-B3-C32-9x7-T21/3/0-cpp-bfloat16]",
    "test_ops_backends.py::test_memory_read_matches_reference[mask-B3-C32-9x7-T21/3/0-triton-float16]",
    "test_ops_backends.py::test_memory_write_matches_reference[B2-Nw40-Nr32-T6-triton-float32]",
    "test_ops_backends.py::test_opcheck[cpp]",
    "test_ops_backends.py::test_torch_compile_of_a_generator_stage_has_no_graph_breaks[cpp]",
    "test_ops_backends.py::test_torch_compile_of_a_generator_stage_has_no_graph_breaks[triton]",
    "test_ops_cuda_on_cpu.py::test_memory_read_matches_reference[legacy-B2-C32-17x17-T9/30-bfloat16]",
    "test_ops_cuda_on_cpu.py::test_memory_read_of_channels_last_images_matches_reference[B2-C32-17x17-T9/30-float16]",
    "test_ops_cuda_on_cpu.py::test_memory_write_matches_reference[B3-Nw48-Nr64-T21-float16]",
]
STAGE_TIMEOUT_S = 3600  # a hung build or test fails the stage instead of the whole run


def _junit(path: Path) -> dict[str, str]:
    """file::test -> passed / failed / skipped, from pytest's JUnit report."""
    outcomes = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').split('.')[-1]}.py::{case.get('name')}"
        kinds = {child.tag for child in case}
        outcomes[name] = (
            "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
        )
    return outcomes


def _stage_env(work: Path) -> dict[str, str]:
    from dmgan.ops import _build
    from tests.hip_cpu import build as hip_build

    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(
        {
            STAGE: toolchain.TORCH,
            "TORCH_EXTENSIONS_DIR": str(work / "torch_extensions"),
            "TORCH_CUDA_ARCH_LIST": "9.0",  # the GPU machine's H200
            "DMGAN_CACHE": str(work / "cache"),  # the HIP-CPU build, apart from the main environment's
            "TRITON_INTERPRET": "1",
            "TRITON_CACHE_DIR": str(work / "triton"),
            "PATH": f"{toolchain.python().parent}{os.pathsep}{env.get('PATH', '')}",
        }
    )
    if hip_build.hip_cpu_home() is not None:
        env["HIP_CPU_HOME"] = str(hip_build.hip_cpu_home())
    home = _build.find_cuda_home()
    if home is not None:  # build the CUDA kernels, and fail if they do not build
        env.update({"CUDA_HOME": home, "DMGAN_FORCE_CUDA": "1"})
    return env


def _run(command: list[str], cwd: Path, env: dict, log: Path, seconds: dict) -> int:
    """Runs a part of the stage, its output to ``log``; its wall time goes into ``seconds``."""
    start = time.monotonic()
    with log.open("w") as out:
        code = subprocess.run(
            command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=STAGE_TIMEOUT_S
        ).returncode
    seconds[log.stem] = round(time.monotonic() - start, 1)
    return code


@pytest.mark.slow
@pytest.mark.toolchain
@pytest.mark.skipif(os.environ.get(STAGE) is not None, reason="this is the stage")
def test_the_oldest_supported_torch_passes_the_toolchain_cases():
    start = time.monotonic()
    python = toolchain.ensure_env()
    work = toolchain.work_dir()
    seconds = {"environment": round(time.monotonic() - start, 1)}  # what each part took: times.json
    with toolchain.locked(work / "stage.lock"):
        source = toolchain.copy_checkout()
        toolchain.remove_stale_torch_locks(work / "torch_extensions")
        env = _stage_env(work)
        failures = []

        junit, log = work / "tests.xml", work / "tests.log"
        junit.unlink(missing_ok=True)
        pytest_command = [str(python), "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts="]
        code = _run(
            [*pytest_command, "-q", "-rs", f"--junitxml={junit}", *SELECTION], source, env, log, seconds
        )
        outcomes = _junit(junit) if junit.exists() else {}
        # The emulated-CUDA cases need HIP-CPU, which the main suite skips without too.
        must_pass = [t for t in MUST_PASS if "cuda_on_cpu" not in t or "HIP_CPU_HOME" in env]
        not_passed = {t: outcomes.get(t, "not run") for t in must_pass if outcomes.get(t) != "passed"}
        if code != 0 or not_passed or len(outcomes) < 120:
            failures.append(
                f"tests (exit {code}, {len(outcomes)} ran, {not_passed}):\n{log.read_text()[-6000:]}"
            )

        # Compile errors and shared memory fail here; spills are reported (a warning), not failed:
        # their policy (tests/test_triton_compile_gate.py) is for the pinned triton's allocator.
        gate, log = work / "compile_gate.json", work / "compile_gate.log"
        gate.unlink(missing_ok=True)
        gate_command = [
            str(python),
            "-m",
            "dmgan.kernels.compile_gate",
            "--arch",
            "90",
            "--dtype",
            "bfloat16",
        ]
        gate_command += ["--channels", "64", "--words", "18", "--allow-spills", "--json", str(gate)]
        code = _run(gate_command, source, {**env, "TRITON_INTERPRET": "0"}, log, seconds)
        rows = json.loads(gate.read_text()) if code == 0 and gate.exists() else []
        if code != 0 or not rows:
            failures.append(f"compile gate (exit {code}, {len(rows)} kernels):\n{log.read_text()[-4000:]}")
        spills = [f"{r['kernel']} {r['config']}: {r['spill_bytes']} B" for r in rows if r["spill_bytes"]]
        if spills:
            warnings.warn(f"Triton {toolchain.TRITON} spills on sm_90: {'; '.join(spills)}", stacklevel=1)

        out, log = work / "device_check", work / "device_check.log"
        dry_run = [str(python), "-m", "benchmarks.device_check", str(out), "--dry-run"]
        code = _run(dry_run, source, {**env, "DMGAN_SKIP_CUDA": "1", "DMGAN_FORCE_CUDA": "0"}, log, seconds)
        summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
        stages = {r["stage"]: r for r in summary.get("stages", [])}
        seen_torch = stages.get("environment", {}).get("result", {}).get("torch", "")
        built = stages.get("build", {}).get("result", {}).get("how")
        if code != 0 or not seen_torch.startswith(toolchain.TORCH) or built != "built on first use":
            statuses = {name: r.get("status") for name, r in stages.items()}
            failures.append(
                f"device_check --dry-run (exit {code}, torch {seen_torch!r}, build {built!r}, {statuses}):\n"
                f"{log.read_text()[-4000:]}"
            )
        seconds["total"] = round(time.monotonic() - start, 1)
        (work / "times.json").write_text(json.dumps(seconds, indent=1) + "\n")
        assert not failures, "\n\n".join(failures)


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


# --- inside the stage (the environment of tests/toolchain.py)


@INSIDE
def test_the_stage_runs_the_oldest_supported_torch_and_triton():
    import torch
    import triton

    from dmgan.ops import _build

    assert torch.__version__.split("+")[0] == os.environ[STAGE] == toolchain.TORCH
    assert triton.__version__ == toolchain.TRITON
    assert (int(toolchain.TORCH.split(".")[0]), int(toolchain.TORCH.split(".")[1])) == _build.TORCH_OLDEST
    assert Path(sys.prefix).name == "venv" and Path(sys.prefix).parent.name == toolchain.key()


@INSIDE
def test_the_stage_built_the_extension_with_that_torchs_cxx17_flags():
    """Built on first use (no dmgan._C in the copy), in the stage's extensions folder, with the
    flags torch 2.11's cpp_extension wrote into the ninja file: C++17, never C++20."""
    import torch

    from dmgan.ops import _build, _cpp

    assert _cpp.HOW_LOADED == "built on first use"
    cuda = os.environ.get("DMGAN_FORCE_CUDA") == "1"
    assert _cpp._HAS_CUDA_KERNELS == cuda
    ninja = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / ("dmgan_C_cuda" if cuda else "dmgan_C") / "build.ninja"
    flags = {
        line.split("=", 1)[0].strip(): line.split("=", 1)[1]
        for line in ninja.read_text().splitlines()
        if "=" in line and not line.startswith(" ")
    }
    assert _build.cxx_standard() == "c++17"
    for name in ("cflags", "cuda_cflags") if cuda else ("cflags",):
        assert "-std=c++17" in flags[name].split() and "c++20" not in flags[name], (name, flags[name])
    if cuda:
        assert "arch=compute_90,code=sm_90" in flags["cuda_cflags"], flags["cuda_cflags"]
    assert torch._C._dispatch_has_kernel_for_dispatch_key("dmgan::memory_read", "CPU")
