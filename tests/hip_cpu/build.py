"""Build csrc/memory_cuda.cu for the CPU with HIP-CPU, as the ops ``torch.ops.dmgan_cuda_on_cpu.*``.

HIP-CPU (AMD, MIT licence) runs GPU kernels on CPU threads and fibers: blocks, ``__syncthreads``,
dynamic shared memory and warp shuffles. The kernels and launchers of ``csrc/memory_cuda.cu`` are
compiled unchanged, from a copy that differs only by the mechanical rewrites in :data:`REWRITES`
(CUDA's launch syntax and ``extern __shared__``, which plain C++ cannot parse; the op namespace
and the device the launchers expect) and by ``shim.h``, which supplies what HIP-CPU lacks. It
checks results, not races: HIP-CPU runs a block's threads in a fixed order.

HIP-CPU is found at ``$HIP_CPU_HOME`` or in a ``shared/hip-cpu`` folder beside the checkout (or
beside a folder above it); it needs TBB (the ``tbb-devel`` wheel of the dev extra, or Debian's
``libtbb-dev``). Builds go to ``$DMGAN_CACHE/cuda_on_cpu`` (default ``~/.cache/dmgan``).
"""

from __future__ import annotations

import os
import re
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SOURCE = ROOT / "csrc" / "memory_cuda.cu"
NAMESPACE = "dmgan_cuda_on_cpu"

# (pattern, replacement, what it is for): each must match at least once, so a change to the CUDA
# source that a rewrite no longer fits fails the build loudly instead of testing something else.
REWRITES = [
    (r"^#include <c10/cuda/[^>]+>\n", "", "c10::cuda comes from shim.h"),
    (
        r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)<<<(.*?)>>>\(",
        r"hipLaunchKernelGGL(HIP_KERNEL_NAME(\1), \2, ",
        "kernel<<<grid, block, shared, stream>>>(args) as a HIP-CPU launch",
    ),
    (r"extern __shared__ float (\w+)\[\];", r"HIP_DYNAMIC_SHARED(float, \1)", "dynamic shared memory"),
    (r"\.is_cuda\(\)", ".is_cpu()", "device memory is host memory here"),
    (
        r"TORCH_LIBRARY_IMPL\(dmgan, CUDA, m\)",
        f"TORCH_LIBRARY({NAMESPACE}, m) {{ dmgan::define_memory_ops(m); }}\n\n"
        f"TORCH_LIBRARY_IMPL({NAMESPACE}, CPU, m)",
        "the kernels as CPU ops of their own namespace",
    ),
]


def rewrite(source: str) -> str:
    """The CUDA source as C++ for HIP-CPU."""
    for pattern, replacement, purpose in REWRITES:
        source, count = re.subn(pattern, replacement, source, flags=re.MULTILINE)
        if count == 0:
            raise RuntimeError(f"the rewrite for {purpose} ({pattern!r}) matched nothing in {SOURCE}")
    return '#include "shim.h"\n' + source


def hip_cpu_home() -> Path | None:
    """HIP-CPU's folder (the one holding include/hip/hip_runtime.h), or None."""
    candidates = [os.environ.get("HIP_CPU_HOME"), *(folder / "shared" / "hip-cpu" for folder in ROOT.parents)]
    for candidate in filter(None, candidates):
        if (Path(candidate) / "include" / "hip" / "hip_runtime.h").is_file():
            return Path(candidate)
    return None


def tbb_paths() -> tuple[Path, Path] | None:
    """(include folder, library folder) of a TBB install: this environment's, then the system's."""
    prefixes = [Path(sys.prefix), Path("/usr"), Path("/usr/local")]
    libdirs = ["lib", "lib64", f"lib/{sysconfig.get_config_var('MULTIARCH') or 'x86_64-linux-gnu'}"]
    for prefix in prefixes:
        include = prefix / "include"
        if not (include / "tbb" / "tbb.h").is_file() and not (include / "oneapi" / "tbb.h").is_file():
            continue
        for libdir in libdirs:
            if list((prefix / libdir).glob("libtbb.so*")):
                return include, prefix / libdir
    return None


def missing() -> str | None:
    """Why the emulated build cannot run here, or None."""
    if hip_cpu_home() is None:
        return "HIP-CPU not found (set HIP_CPU_HOME, or keep shared/hip-cpu beside the checkout)"
    if tbb_paths() is None:
        return "TBB not found (pip install tbb-devel, or apt install libtbb-dev)"
    return None


def default_build_dir() -> Path:
    return Path(os.environ.get("DMGAN_CACHE", Path.home() / ".cache" / "dmgan")) / "cuda_on_cpu"


def build(build_dir: Path | None = None, optimisation: str = "-O1") -> str:
    """Compile (with ninja, incrementally) and load the emulated kernels; returns their op namespace."""
    build_dir = build_dir or default_build_dir()
    from torch.utils import cpp_extension

    reason = missing()
    if reason is not None:
        raise RuntimeError(reason)
    home, (tbb_include, tbb_lib) = hip_cpu_home(), tbb_paths()
    build_dir.mkdir(parents=True, exist_ok=True)
    generated, text = build_dir / "memory_cuda_on_cpu.cpp", rewrite(SOURCE.read_text())
    if not generated.is_file() or generated.read_text() != text:  # else ninja has nothing to rebuild
        generated.write_text(text)
    cpp_extension.load(
        name=NAMESPACE,
        sources=[str(generated)],
        extra_include_paths=[str(HERE), str(ROOT / "csrc"), str(home / "include"), str(tbb_include)],
        extra_cflags=[optimisation, "-w"],
        extra_ldflags=[f"-L{tbb_lib}", f"-Wl,-rpath,{tbb_lib}", "-ltbb"],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=os.environ.get("DMGAN_VERBOSE_BUILD") == "1",
    )
    return NAMESPACE
