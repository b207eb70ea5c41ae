"""The ``"cpp"`` backend: the C++ / CUDA extension in csrc/, as ``torch.ops.dmgan.*``.

Loads ``dmgan._C`` when setup.py built it; otherwise builds csrc/ on first use with ninja
(``torch.utils.cpp_extension.load``, cached under ~/.cache/torch_extensions) as stylegan3 does.
If neither works, importing this module raises ImportError with the reason, which ``dmgan.ops``
reports (``backend="cpp"``) or warns about once and falls back to eager (``backend="auto"``).

The C++ side defines the schemas and the CPU / CUDA kernels; here they get their fake (shape)
implementations and autograd (the backwards are ops of their own), so ``torch.compile`` and
``torch.library.opcheck`` work, and the reference's signatures for ``dmgan.ops``.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from dmgan.ops import _build


def _load_extension() -> str:
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
_ops = torch.ops.dmgan


@torch.library.register_fake("dmgan::memory_write")
def _(words, rbar, *weights):
    shape = (words.shape[0], rbar.shape[1], words.shape[2])
    return words.new_empty(shape), words.new_empty(shape)


@torch.library.register_fake("dmgan::memory_write_backward")
def _(grad_keys, grad_values, words, rbar, *weights):
    return [t.new_empty(t.shape) for t in (words, rbar, *weights)]


@torch.library.register_fake("dmgan::memory_read")
def _(img, keys, values, pad_mask, gate_w, gate_b, return_attention, legacy_mask):
    batch, _, height, width = img.shape
    return img.new_empty(img.shape), img.new_empty(
        (batch, keys.shape[2], height, width) if return_attention else (0,)
    )


@torch.library.register_fake("dmgan::memory_read_backward")
def _(grad_out, img, keys, values, pad_mask, gate_w, gate_b, legacy_mask):
    return tuple(t.new_empty(t.shape) for t in (img, keys, values, gate_w, gate_b))


def _write_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _write_backward(ctx, grad_keys: Tensor | None, grad_values: Tensor | None):
    inputs = ctx.saved_tensors
    shape = (inputs[0].shape[0], inputs[1].shape[1], inputs[0].shape[2])
    grads = [inputs[0].new_zeros(shape) if g is None else g.contiguous() for g in (grad_keys, grad_values)]
    return tuple(_ops.memory_write_backward(*grads, *inputs))


def _read_setup(ctx, inputs, output) -> None:
    img, keys, values, pad_mask, gate_w, gate_b, _, legacy_mask = inputs
    ctx.save_for_backward(img, keys, values, pad_mask, gate_w, gate_b)
    ctx.legacy_mask = legacy_mask
    ctx.mark_non_differentiable(output[1])  # the attention map is for looking at, not training


def _read_backward(ctx, grad_out: Tensor, _grad_attention: Tensor):
    img, keys, values, pad_mask, gate_w, gate_b = ctx.saved_tensors
    grads = _ops.memory_read_backward(
        grad_out.contiguous(), img, keys, values, pad_mask, gate_w, gate_b, ctx.legacy_mask
    )
    grad_img, grad_keys, grad_values, grad_gate_w, grad_gate_b = grads
    return grad_img, grad_keys, grad_values, None, grad_gate_w, grad_gate_b, None, None


torch.library.register_autograd("dmgan::memory_write", _write_backward, setup_context=_write_setup)
torch.library.register_autograd("dmgan::memory_read", _read_backward, setup_context=_read_setup)

_HAS_CUDA_KERNELS = torch._C._dispatch_has_kernel_for_dispatch_key("dmgan::memory_read", "CUDA")
MAX_CUDA_WORDS = 64


def supports(device: torch.device) -> bool:
    return device.type == "cpu" or (device.type == "cuda" and _HAS_CUDA_KERNELS)


def unsupported_reason(channels: int, num_words: int, device: torch.device) -> str | None:
    if device.type == "cuda" and num_words > MAX_CUDA_WORDS:
        return f"T = {num_words} words (the CUDA kernels take at most {MAX_CUDA_WORDS})"
    return None


# The registered ops take the reference's arguments; dmgan.ops hands them contiguous tensors of one
# dtype and turns the empty attention tensor into None when it was not asked for.
memory_write = _ops.memory_write
memory_read = _ops.memory_read
