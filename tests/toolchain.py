"""A second virtual environment with the oldest torch dmgan supports: the GPU machine's stack.

The GPU machine this project is lent has torch 2.11, triton 3.6, Python 3.12 and no package index;
torch 2.11's ``cpp_extension`` compiles with ``-std=c++17`` where 2.12 and later use C++20. This
module makes an environment with exactly :data:`TORCH` and :data:`TRITON` (from the package
index: the default CUDA 13 build of torch, a 531 MB wheel, with the CUDA libraries it requires,
4.9 GB installed, since the index has no CPU-only build of it; triton's wheel is 188 MB) and the
few packages the tests need there, and a copy of the checkout to run them in (so that the
``dmgan._C`` built against the main environment's torch is not imported: the copy builds the
extension on first use with torch 2.11's own flags).

Both are cached under ``$DMGAN_CACHE/toolchain`` (default ``~/.cache/dmgan``), keyed by the
Python version and :data:`REQUIREMENTS`: the environment is made once (a ``complete`` marker is
written last, so an interrupted install is redone), the extension builds are incremental (ninja).
A file lock (released when its process dies, unlike torch's build lock) serialises runs.

    python -m tests.toolchain   # make the environment; print its interpreter
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH = "2.11.0"
TRITON = "3.6.0"
# Pinned as in setup.py's dev extra where it names them; what tests/test_toolchain.py runs there
# needs nothing more (the eval, demo and lint tools are not installed).
REQUIREMENTS = [
    f"torch=={TORCH}",
    f"triton=={TRITON}",
    "numpy==2.3.5",  # triton 3.6's interpreter converts 1-element arrays with int(), an error from numpy 2.4
    "pillow==12.3.0",
    "einops==0.8.2",
    "tqdm==4.70.1",
    "safetensors==0.8.0",
    "ninja==1.13.2",
    "pytest==9.2.0",
    "pytest-benchmark==5.3.1",  # benchmarks.device_check's memory-bench stage
    "matplotlib==3.11.2",  # benchmarks.device_check's profile stage (its roofline plot)
    "tbb-devel==2023.2.0",  # HIP-CPU (the emulated CUDA kernels)
]


def cache_root() -> Path:
    return Path(os.environ.get("DMGAN_CACHE", Path.home() / ".cache" / "dmgan")) / "toolchain"


def key() -> str:
    digest = hashlib.sha256("\n".join(REQUIREMENTS).encode()).hexdigest()[:8]
    return f"py{sys.version_info.major}.{sys.version_info.minor}-torch{TORCH}-triton{TRITON}-{digest}"


def env_dir() -> Path:
    return cache_root() / key() / "venv"


def python() -> Path:
    return env_dir() / "bin" / "python"


def work_dir() -> Path:
    """Per checkout: the copy of its files, the extension builds, the device script's output."""
    checkout = hashlib.sha256(str(ROOT).encode()).hexdigest()[:8]
    return cache_root() / key() / f"work-{checkout}"


@contextlib.contextmanager
def locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_env(log=print) -> Path:
    """The environment's interpreter, after making the environment unless it is complete."""
    env = env_dir()
    with locked(env.parent / "venv.lock"):
        if (env / "complete").is_file():
            return python()
        shutil.rmtree(env, ignore_errors=True)  # an interrupted earlier attempt
        log(f"making {env} ({', '.join(REQUIREMENTS)})")
        # From the base interpreter, so that the new environment does not see this one's packages.
        base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
        subprocess.run([str(base if base.exists() else sys.executable), "-m", "venv", str(env)], check=True)
        pip = [str(python()), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, *REQUIREMENTS], check=True)
        (env / "complete").write_text("\n".join(REQUIREMENTS) + "\n")
    return python()


# What the copy leaves out: build outputs, caches, data and checkpoints (as .gitignore does).
_SKIP_NAMES = {".git", ".venv", ".cache", "__pycache__", ".pytest_cache", ".ruff_cache", ".benchmarks"}
_SKIP_TOP = {"build", "dist", "runs", "data"}
_SKIP_SUFFIXES = (".so", ".pt", ".pth", ".egg-info")


def _ignore(folder: str, names: list[str]) -> set[str]:
    top = Path(folder).resolve() == ROOT
    return {n for n in names if n in _SKIP_NAMES or (top and n in _SKIP_TOP) or n.endswith(_SKIP_SUFFIXES)}


def copy_checkout() -> Path:
    """The checkout's files as they are now (committed or not), without its built extension, in
    the work folder; modification times are kept, so ninja rebuilds only what changed."""
    source = work_dir() / "src"
    shutil.rmtree(source, ignore_errors=True)
    shutil.copytree(ROOT, source, symlinks=True, ignore=_ignore)
    return source


def build_paths(interpreter: Path) -> dict:
    """What an interpreter's torch compiles extensions with: its version, its C++ standard flag,
    its header folders and Python's, and where its environment keeps TBB's headers."""
    code = (
        "import json, sys, sysconfig, torch\n"
        "from torch.utils.cpp_extension import include_paths\n"
        "print(json.dumps({'torch': torch.__version__, 'include_paths': include_paths(),"
        " 'python_include': sysconfig.get_paths()['include'], 'prefix': sys.prefix}))"
    )
    run = subprocess.run([str(interpreter), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def remove_stale_torch_locks(folder: Path) -> None:
    """torch's JIT build leaves a ``lock`` file when killed mid-build, and every later build of
    that name waits on it forever; under :func:`locked` no build of ours is running, so any is stale."""
    for lock in folder.glob("*/lock"):
        lock.unlink(missing_ok=True)


if __name__ == "__main__":
    print(ensure_env())
