"""The C++ CPU kernels per instruction set (csrc/memory_cpu_kernels.h): one build that runs on
every x86-64 CPU, the best kernels chosen at run time, an override that lowers the choice, and the
parity tests run under each instruction set this machine has."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from dmgan import ops
from dmgan.ops import _build

_cpp = pytest.importorskip("dmgan.ops._cpp", reason="the C++ extension did not load", exc_type=ImportError)

ROOT = Path(__file__).resolve().parents[1]
CAPABILITIES = ("default", "avx2", "avx512")  # lowest first, as csrc/memory_cpu.cpp orders them
X86 = torch.backends.cpu.get_cpu_capability().upper() in ("DEFAULT", "AVX2", "AVX512")


def _capability_in_a_fresh_process(**env: str) -> subprocess.CompletedProcess:
    code = "import torch, dmgan.ops._cpp as c; print(c.cpu_capability())"
    clean = {k: v for k, v in os.environ.items() if k not in ("DMGAN_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY")}
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**clean, **env},
        timeout=300,
    )


def _supported() -> str:
    result = _capability_in_a_fresh_process()
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def test_the_build_names_no_machine():
    """-march=native made a build for its own CPU only: an AVX-512 machine's build died with an
    illegal instruction on an AVX2 one, an AVX2 machine's never used AVX-512."""
    assert not [flag for flag in _build.CXX_FLAGS if flag.startswith(("-march", "-mcpu", "-mavx", "-mtune"))]
    assert {"memory_cpu_default.cpp", "memory_cpu_avx2.cpp", "memory_cpu_avx512.cpp"} <= set(
        _build.CPU_SOURCES
    )


def test_the_kernels_run_with_the_best_instruction_set_the_cpu_has():
    supported = _supported()
    assert supported in CAPABILITIES
    if X86:  # ATen asks the same of the CPU for its own kernels (AVX2: + FMA; AVX512: F, BW, VL, DQ)
        assert supported == torch.backends.cpu.get_cpu_capability().lower()
    assert ops.device_kind("cpu") == f"cpu-{_cpp.cpu_capability()}"


def test_an_override_lowers_the_choice_and_never_raises_it():
    supported = _supported()
    assert _capability_in_a_fresh_process(DMGAN_CPU_CAPABILITY="default").stdout.strip() == "default"
    assert _capability_in_a_fresh_process(ATEN_CPU_CAPABILITY="DEFAULT").stdout.strip() == "default"
    # Ours wins over ATen's; a capability the CPU lacks gives the best it has, as in ATen.
    both = _capability_in_a_fresh_process(DMGAN_CPU_CAPABILITY="avx512", ATEN_CPU_CAPABILITY="default")
    assert both.stdout.strip() == supported
    unknown = _capability_in_a_fresh_process(DMGAN_CPU_CAPABILITY="avx9")
    assert unknown.returncode != 0
    assert (
        "DMGAN_CPU_CAPABILITY=avx9 is not a CPU capability dmgan knows: use default, avx2 or avx512"
        in unknown.stderr
    )


def _loaded_library() -> Path:
    """The shared library that holds the ops: dmgan/_C*.so, or the one built on first use."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1]
        if re.search(r"(dmgan/_C\.|dmgan_C[^/]*\.so$)", path):
            return Path(path)
    pytest.skip("the extension's library is not found in /proc/self/maps")


@pytest.mark.skipif(not X86 or shutil.which("objdump") is None, reason="x86-64 and binutils' objdump")
def test_only_each_instruction_sets_kernels_use_its_instructions():
    """The kernels are compiled per instruction set in one library; everything else in it (the op
    glue, and every copy of a torch or standard-library inline function, which the linker may share
    between the files) must be baseline x86-64 code, or the library dies on a CPU without AVX."""
    disassembly = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", "-C", str(_loaded_library())],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    uses: dict[str, set[str]] = defaultdict(set)  # namespace -> register kinds / encodings seen
    offenders: set[str] = set()
    function = namespace = ""
    for line in disassembly.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = header[1]
            found = re.search(r"dmgan::cpu::(AVX512|AVX2|DEFAULT)::", function)
            namespace = found[1] if found else "other"
            continue
        parts = line.split("\t")
        if len(parts) < 2 or not parts[1].strip():
            continue
        instruction = parts[1]
        if instruction.startswith("v"):  # VEX / EVEX encoded: AVX and later
            uses[namespace].add("vex")
        for kind in ("ymm", "zmm"):
            if f"%{kind}" in instruction:
                uses[namespace].add(kind)
        if namespace in ("other", "DEFAULT") and instruction.startswith("v"):
            offenders.add(f"{namespace}: {function[:160]}")
        if namespace == "AVX2" and "%zmm" in instruction:
            offenders.add(f"AVX2 with zmm: {function[:160]}")
    assert not offenders, "AVX instructions outside their kernels:\n" + "\n".join(sorted(offenders)[:20])
    assert {"ymm"} <= uses["AVX2"] and {"zmm"} <= uses["AVX512"], dict(uses)


@pytest.mark.slow
def test_parity_under_every_instruction_set_this_cpu_has():
    """The main suite checks the best instruction set; here the C++ backend's parity tests (outputs
    and gradients against the reference, poisoned outputs, every dtype) run again under each lower
    one, in a fresh process each (the choice is made once per process)."""
    supported = _supported()
    lower = CAPABILITIES[: CAPABILITIES.index(supported)]
    if not lower:
        pytest.skip(f"{supported} is the only instruction set here")
    for capability in lower:
        env = {**os.environ, "DMGAN_CPU_CAPABILITY": capability}
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cpp and not cuda",
                   "tests/test_ops_backends.py", "tests/test_ops_reference.py"]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=1200)
        assert result.returncode == 0, f"under {capability}:\n{result.stdout[-4000:]}"
        passed = re.search(r"(\d+) passed", result.stdout)
        assert passed and int(passed[1]) >= 20, result.stdout[-2000:]
