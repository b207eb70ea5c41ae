"""How the C++/CUDA extension is built: sources, flags, the CUDA toolkit and target architectures.

Shared by setup.py (ahead of time) and dmgan.ops._cpp (on first use). Environment switches:
the CUDA kernels are added when torch is a CUDA build and a CUDA toolkit is found (no GPU needed);
``DMGAN_SKIP_CUDA=1`` builds the CPU kernels only, ``DMGAN_FORCE_CUDA=1`` makes a missing toolkit
an error instead of a CPU-only build, and ``TORCH_CUDA_ARCH_LIST`` picks the architectures
(default: 8.0 8.6 8.9 9.0 12.0+PTX).

The torch releases the extension is built and tested with are :data:`TORCH_REQUIREMENT` (2.11, the
GPU machine's, to 2.14, the pinned one); :func:`check_torch_version` refuses others, with
``DMGAN_ALLOW_ANY_TORCH=1`` to try anyway. The sources are C++17: torch 2.11's ``cpp_extension``
compiles with ``-std=c++17``, 2.12 and later with C++20 (:func:`cxx_standard`).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CPU_SOURCES = ("memory_cpu.cpp", "memory_cpu_default.cpp", "memory_cpu_avx2.cpp", "memory_cpu_avx512.cpp")
CUDA_SOURCES = ("memory_cuda.cu",)
DEFAULT_ARCHS = (
    "8.0 8.6 8.9 9.0 12.0+PTX"  # A100, RTX 30xx, RTX 40xx, H100 / H200, RTX 50xx (+PTX: newer GPUs)
)
CXX_FLAGS = ["-O3", "-fno-math-errno", "-fopenmp"]  # no -march: see csrc/memory_cpu_kernels.h
NVCC_FLAGS = ["-O3", "--use_fast_math", "-lineinfo"]

# The torch releases supported: the oldest and the newest minor release tested (tests/toolchain.py
# builds and tests the oldest, the README's test command the pinned newest).
TORCH_OLDEST, TORCH_NEWEST = (2, 11), (2, 14)
TORCH_REQUIREMENT = f"torch>={TORCH_OLDEST[0]}.{TORCH_OLDEST[1]},<{TORCH_NEWEST[0]}.{TORCH_NEWEST[1] + 1}"
ALLOW_ANY_TORCH = "DMGAN_ALLOW_ANY_TORCH"


def _minor(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"cannot read a torch version from {version!r}")
    return int(match[1]), int(match[2])


def torch_version_problem(version: str) -> str | None:
    """Why the extension is not built for torch ``version`` (``torch.__version__``), or None."""
    if TORCH_OLDEST <= _minor(version) <= TORCH_NEWEST:
        return None
    oldest, newest = (f"{a}.{b}" for a, b in (TORCH_OLDEST, TORCH_NEWEST))
    return (
        f"dmgan's C++/CUDA extension supports torch {oldest} to {newest} ({TORCH_REQUIREMENT}); torch"
        f" {version} is installed. Install a torch in that range (the README's commands pin 2.14.1),"
        f" or set {ALLOW_ANY_TORCH}=1 to build it anyway."
    )


def check_torch_version(version: str | None = None) -> None:
    """Raise RuntimeError naming the installed torch and the supported range when it is outside."""
    if os.environ.get(ALLOW_ANY_TORCH) == "1":
        return
    if version is None:
        import torch

        version = torch.__version__
    problem = torch_version_problem(version)
    if problem is not None:
        raise RuntimeError(problem)


def cxx_standard(version: str | None = None) -> str:
    """The C++ standard torch ``version``'s cpp_extension compiles with: C++17 before 2.12."""
    if version is None:
        import torch

        version = torch.__version__
    return "c++17" if _minor(version) < (2, 12) else "c++20"


def find_cuda_home() -> str | None:
    """CUDA_HOME, or the toolkit the ``nvcc`` on PATH belongs to, following a wrapper script that
    execs the real nvcc (torch would take the wrapper's folder for the toolkit)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    path = Path(nvcc).resolve()
    try:
        head = path.read_bytes()[:4096]
    except OSError:
        head = b""
    if head.startswith(b"#!"):
        match = re.search(rb"exec\s+(\S*nvcc)\b", head)
        if match:
            path = Path(match.group(1).decode())
    home = path.parent.parent
    return str(home) if (home / "include" / "cuda.h").exists() else None


def want_cuda() -> bool:
    """Build the CUDA kernels? Yes with a CUDA build of torch and a CUDA toolkit."""
    import torch

    if os.environ.get("DMGAN_SKIP_CUDA") == "1":
        return False
    if torch.version.cuda is not None and find_cuda_home() is not None:
        return True
    if os.environ.get("DMGAN_FORCE_CUDA") == "1":
        raise RuntimeError(
            f"DMGAN_FORCE_CUDA=1 but torch {'is a CPU build' if torch.version.cuda is None else 'finds no CUDA toolkit'}"
            " (set CUDA_HOME to the toolkit folder)"
        )
    return False


def prepare_cuda_env() -> None:
    """Point torch's extension builder at the real toolkit and give it architectures to build for."""
    home = find_cuda_home()
    if home:
        os.environ.setdefault("CUDA_HOME", home)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)


def sources(with_cuda: bool) -> list[str]:
    names = CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())
    return [str(CSRC / name) for name in names]
