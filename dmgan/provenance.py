"""What a run needs on record to be repeated: the code, the software, the hardware, and whether
it asked for deterministic algorithms.

:func:`environment_record` describes where a run runs (dmgan's version and git commit, Python,
torch, CUDA, cuDNN, the devices), without personal data: no host name, user name or path.
:func:`set_deterministic` makes torch pick deterministic algorithms and says what it set.

    >>> record = environment_record("cpu")
    >>> record["torch"] == torch.__version__, record["world_size"]
    (True, 1)
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

import dmgan

# cuBLAS is deterministic only with a fixed workspace per stream (the CUDA docs' "results
# reproducibility"); ":16:8" would do too, with less memory and sometimes slower.
CUBLAS_WORKSPACE = ":4096:8"


def environment_record(device: torch.device | str, world_size: int = 1) -> dict[str, Any]:
    """Where this process runs, for a run's record: versions of dmgan (and its git commit), Python,
    torch, CUDA, cuDNN and Triton; the device and its name, the CPU model and the vector
    instructions torch's CPU kernels use; the process count. Never raises for a missing git."""
    device = torch.device(device)
    record: dict[str, Any] = {
        "dmgan": dmgan.__version__,
        "git": git_state(Path(dmgan.__file__).resolve().parent.parent),
        "python": platform.python_version(),
        "torch": str(torch.__version__),  # a str subclass, which weights_only loading refuses
        "cuda": torch.version.cuda,  # the CUDA torch was built with (None: a CPU build)
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _package_version("triton"),
        "platform": platform.platform(),  # OS and kernel release: no host name
        "device": str(device),
        "device_name": _device_name(device),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # e.g. AVX2, AVX512
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "world_size": world_size,
    }
    if device.type == "cuda":
        record["cuda_driver"] = _cuda_driver()
        record["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        record["compute_capability"] = "{}.{}".format(*torch.cuda.get_device_capability(device))
    return record


def git_state(root: Path) -> dict[str, Any]:
    """``{"commit", "dirty", "reason"}`` of the git checkout at ``root``: the commit (40 hex digits)
    and whether tracked files differ from it (untracked files are not counted, as in ``git describe
    --dirty``); commit and dirty are None, and ``reason`` says why, where git or the checkout is
    missing (an installed package, say)."""
    unknown = {"commit": None, "dirty": None}
    try:
        top = _git(root, "rev-parse", "--show-toplevel")
        if Path(top).resolve() != root.resolve():
            # dmgan installed inside some other repository (a virtual environment in a project):
            # that repository's commit is not dmgan's code.
            return {**unknown, "reason": "dmgan is not imported from the top of a git checkout"}
        commit = _git(root, "rev-parse", "HEAD")
        # --no-optional-locks: reading the state must not take the index lock a commit may hold.
        dirty = bool(_git(root, "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"))
    except FileNotFoundError:
        return {**unknown, "reason": "git is not installed"}
    except subprocess.CalledProcessError as e:
        message = (e.stderr or "").strip().splitlines()
        return {**unknown, "reason": f"git failed: {message[0] if message else e}"}
    except (OSError, subprocess.SubprocessError) as e:  # a timeout, no permission, ...
        return {**unknown, "reason": f"git failed: {type(e).__name__}"}
    return {"commit": commit, "dirty": dirty, "reason": None}


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux) with its family and model where it gives
    them (a virtual machine's name alone can be "AMD EPYC"), else what ``platform`` knows."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    name = next((fields[k] for k in ("model name", "Model", "cpu model") if fields.get(k)), None)
    if name is None:
        return platform.processor() or platform.machine() or "unknown"
    if fields.get("cpu family") and fields.get("model"):
        return f"{name} (family {fields['cpu family']}, model {fields['model']})"
    return name


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return cpu_model()
    return device.type


def _cuda_driver() -> int | None:
    """The installed driver's CUDA version (e.g. 13000 for 13.0), as the CUDA runtime reports it."""
    with contextlib.suppress(Exception):  # private API: absent in some builds
        return int(torch._C._cuda_getDriverVersion())
    return None


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def deterministic_state() -> dict[str, Any]:
    """The settings :func:`set_deterministic` changes, as they stand."""
    return {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }


def set_deterministic(enabled: bool) -> dict[str, Any]:
    """With ``enabled``: deterministic algorithms everywhere torch has them, and errors where it has
    none; returns the settings as they now stand (:func:`deterministic_state`), for the run's record.

    It sets ``torch.use_deterministic_algorithms(True)``, cuDNN deterministic with its benchmark off
    (no autotuning: the same algorithm every run), TF32 off for matrix products and cuDNN (products in
    full fp32), and ``CUBLAS_WORKSPACE_CONFIG``
    to ``:4096:8`` unless already set (cuBLAS reads it when its first handle is made: call this
    before any CUDA work). What it costs: on GPUs, slower steps (cuDNN's deterministic algorithms
    in place of the fastest, fp32 products in place of TF32: how much depends on the model and the
    GPU), and a RuntimeError from any op without a deterministic implementation, where it would
    have run. Torch's list (``torch.use_deterministic_algorithms``) includes the CUDA backward of
    bilinear ``interpolate`` and of adaptive average pooling, which dmgan's DAMSM image encoder
    uses and the generator's DAMSM loss differentiates through: expect deterministic GAN training
    on a GPU to stop there. On the CPU a training step runs and repeats bitwise (tested). dmgan's
    memory op is deterministic in every backend (sums in a fixed order, no atomics). Mixed
    precision is left as asked. Turning it on imports ``torch._inductor`` (torch does, to set its
    compiler's switches too): a few seconds once.

    Without ``enabled``, torch's own defaults for the determinism switches come back
    (``use_deterministic_algorithms(False)``, cuDNN deterministic off); benchmark, TF32 and the
    environment variable are left as they are (they are speed choices other code may make).
    """
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    else:
        # Only when on: the call imports torch._inductor, seconds of a run's start on a CPU.
        if torch.are_deterministic_algorithms_enabled():
            torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
    return deterministic_state()
