"""The ``"cpp"`` backend: the C++ / CUDA extension in csrc/, as ``torch.ops.dmgan.*``.

Loads ``dmgan._C`` when setup.py built it; otherwise builds csrc/ on first use with ninja
(``torch.utils.cpp_extension.load``, cached under ~/.cache/torch_extensions) as stylegan3 does.
If neither works, importing this module raises ImportError with the reason, which ``dmgan.ops``
reports (``backend="cpp"``) or warns about once and falls back to eager (``backend="auto"``).
``DMGAN_SKIP_CPP_REASON=<why>`` makes it raise that ImportError without trying, so the backend
counts as unavailable (benchmarks.device_check sets it after its build stage failed, so that
later stages skip cpp with the build's error instead of rebuilding). A torch outside the
supported range (``_build.TORCH_REQUIREMENT``) is refused the same way, before anything is loaded
or built, with an error naming the installed version and the range.

The C++ side defines the schemas and the CPU / CUDA kernels; :mod:`dmgan.ops.library` gives them
their fake (shape) implementations and autograd, so ``torch.compile`` and
``torch.library.opcheck`` work. This module adds what the CUDA kernels cannot take.
"""

from __future__ import annotations

import functools
import os

import torch

from dmgan.ops import _build, library


def _load_extension() -> str:
    if os.environ.get("DMGAN_SKIP_CPP_REASON"):
        raise ImportError(f"the C++ extension is skipped: {os.environ['DMGAN_SKIP_CPP_REASON']}")
    try:
        _build.check_torch_version()
    except RuntimeError as e:
        raise ImportError(str(e)) from None
    try:
        import dmgan._C  # noqa: F401  (built by setup.py; registers torch.ops.dmgan.*)

        return "prebuilt"
    except ImportError:
        pass
    if not _build.CSRC.is_dir():
        raise ImportError("dmgan._C is not built and csrc/ is not beside the package to build it from")
    with_cuda = _build.want_cuda()
    if with_cuda:
        _build.prepare_cuda_env()
    from torch.utils import cpp_extension

    if with_cuda:  # torch resolved its CUDA_HOME when first imported; make it the real toolkit
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
    load = cpp_extension.load
    try:
        load(
            name="dmgan_C" + ("_cuda" if with_cuda else ""),
            sources=_build.sources(with_cuda),
            extra_cflags=_build.CXX_FLAGS,
            extra_cuda_cflags=_build.NVCC_FLAGS,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=os.environ.get("DMGAN_VERBOSE_BUILD") == "1",
        )
    except Exception as e:  # a compiler error, a missing toolchain, ...
        raise ImportError(f"building the dmgan C++ extension failed: {type(e).__name__}: {e}") from e
    return "built on first use"


HOW_LOADED = _load_extension()
library.register_memory_ops("dmgan")
_ops = torch.ops.dmgan
_HAS_CUDA_KERNELS = torch._C._dispatch_has_kernel_for_dispatch_key("dmgan::memory_read", "CUDA")


def supports(device: torch.device) -> bool:
    return device.type == "cpu" or (device.type == "cuda" and _HAS_CUDA_KERNELS)


def unsupported_reason(call: library.OpInput) -> str | None:
    """The CPU kernels take every input; the CUDA kernels have the GPU limits and shared memory."""
    if call.device.type != "cuda":
        return None
    reason = call.common_gpu_limits()
    if reason is not None:
        return reason
    needed, limit = cuda_shared_bytes(call), _shared_memory_per_block(call.device)
    if needed > limit:
        return f"{call.op} needs {needed} bytes of shared memory a block, {call.device} has {limit}"
    return None


def cuda_shared_bytes(call: library.OpInput) -> int:
    """Shared memory a block of the CUDA kernels takes (the larger of forward and backward), as
    csrc/memory_cuda.cu sizes it: the reading keeps the sample's keys, values and gate weights
    (plus a word-block per warp in the backward), the writing a few vectors of N_w / N_m floats."""
    if call.op == "memory_read":
        word_block = max(16, 1 << (call.num_words - 1).bit_length())
        floats = 2 * call.channels * call.num_words + 2 * call.channels + _READ_WARPS * word_block
    else:
        nm = 2 * call.channels
        floats = 3 * call.channels + 5 * nm + call.word_dim + 32
    return 4 * floats


_READ_WARPS = 4  # kWarps in csrc/memory_cuda.cu


@functools.cache
def _shared_memory_per_block(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def cpu_capability() -> str:
    """The instruction set the CPU kernels run with: "default", "avx2" or "avx512" (csrc/memory_cpu.cpp
    chooses it once per process from the CPU's features, lowered by DMGAN_CPU_CAPABILITY or
    ATEN_CPU_CAPABILITY)."""
    return _ops.cpu_capability()


# The registered ops take the reference's arguments; dmgan.ops hands them contiguous tensors of one
# dtype and turns the empty attention tensor into None when it was not asked for.
memory_write = _ops.memory_write
memory_read = _ops.memory_read
