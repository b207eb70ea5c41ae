"""What every fused backend of the memory ops shares: the op's facts, its fake shapes, its autograd.

A fused backend is a namespace of four ops with the reference's arguments (positional, as in the
C++ schemas of ``csrc/memory_cpu.cpp``)::

    memory_write(words, rbar, A, B, M_w, M_w_b, M_r, M_r_b, key_w, key_b, value_w, value_b[, dtype])
        -> (keys, values)                                   B x N_r x T each
    memory_write_backward(grad_keys, grad_values, words, rbar, *weights[, needs_input_grad])
        -> gradients of the 12 inputs
    memory_read(img, keys, values, pad_mask, gate_w, gate_b, return_attention, legacy_mask)
        -> (r' B x N_r x H x W, attention B x T x H x W or an empty tensor)
    memory_read_backward(grad_out, img, keys, values, pad_mask, gate_w, gate_b, legacy_mask)
        -> gradients of (img, keys, values, gate_w, gate_b)

Images (``img``, r', ``grad_out``, the image gradient) come in either dense layout, contiguous
(B x C x H x W) or channels-last (B x H x W x C in memory; :func:`is_channels_last`), and every
kernel addresses pixel n = h W + w of channel c of sample b at b C H W + c s_c + n s_n, with
strides (s_c, s_n) = (H W, 1) or (1, C); r' and the image gradient keep ``img``'s layout, so a
channels-last model pays no conversion per call. Keys, values and the rest are contiguous.

The Triton ops (``dmgan.kernels``), the C++ / CUDA ops (``dmgan._C``) and the CUDA kernels
emulated on the CPU in the tests register their fake shapes and autograd here, once for their
namespace (:func:`register_memory_ops`, or one op at a time), so ``torch.compile`` traces them
and autograd differentiates them the same way.
:class:`OpInput` describes a call for the backends' ``unsupported_reason``.

Two arguments are optional, for backends whose kernels take mixed inputs (the Triton ones; the
C++ schemas have neither): memory_write's ``dtype``, the dtype it computes in and returns (its
inputs then come in their own dtypes: fp32 weights under autocast), and memory_write_backward's
``needs_input_grad``, one flag per input: the gradients not asked for are not computed and come
back as empty tensors (training asks for none of the frozen encoder's words nor of the detached
r̄). The autograd below passes ``needs_input_grad`` to a backward whose schema takes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MAX_WORDS = 64  # words per caption the GPU kernels take (their word blocks are 16, 32 or 64 wide)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the GPU kernels compute from


def write_argument_shapes(
    batch: int, word_dim: int, channels: int, num_words: int
) -> dict[str, tuple[int, ...]]:
    """memory_write's arguments and their shapes, in order: words B x N_w x T, r̄ B x N_r, and the
    stage's layer weights (N_m = 2 N_r)."""
    nw, nr, nm = word_dim, channels, 2 * channels
    return {
        "words": (batch, nw, num_words), "rbar": (batch, nr), "A": (1, nw), "B": (1, nr),
        "M_w": (nm, nw, 1), "M_w_b": (nm,), "M_r": (nm, nr, 1), "M_r_b": (nm,),
        "key_w": (nr, nm, 1), "key_b": (nr,), "value_w": (nr, nm, 1), "value_b": (nr,),
    }  # fmt: skip


def is_channels_last(img: Tensor) -> bool:
    """True for a B x C x H x W tensor laid out B x H x W x C that is not also contiguous (a
    tensor with one channel or one pixel is both; it counts as contiguous)."""
    return not img.is_contiguous() and img.is_contiguous(memory_format=torch.channels_last)


def dense_image(img: Tensor) -> Tensor:
    """``img`` itself when contiguous or channels-last, else a contiguous copy."""
    return img if is_channels_last(img) else img.contiguous()


def like_image(grad: Tensor, img: Tensor) -> Tensor:
    """``grad`` in ``img``'s dense layout, as the kernels take them together (a copy only when
    autograd hands over the other layout)."""
    layout = torch.channels_last if is_channels_last(img) else torch.contiguous_format
    return grad.contiguous(memory_format=layout)


@dataclass(frozen=True)
class OpInput:
    """One call of a memory op as the kernels will see it (after autocast)."""

    op: str  # "memory_write" or "memory_read"
    device: torch.device
    dtype: torch.dtype
    batch: int  # B
    channels: int  # N_r
    num_words: int  # T
    num_pixels: int = 0  # H W (memory_read)
    word_dim: int = 0  # N_w (memory_write)

    def common_gpu_limits(self) -> str | None:
        """Why the GPU kernels of any backend cannot take this input, or None."""
        if self.dtype not in KERNEL_DTYPES:
            return f"dtype {self.dtype} (the GPU kernels take float32, float16 and bfloat16)"
        if self.num_words > MAX_WORDS:
            return f"T = {self.num_words} words (at most {MAX_WORDS})"
        return None


WRITE_INPUTS = 12  # words, rbar and the ten weights


def _write_fake(words, rbar, A, B, M_w, M_w_b, M_r, M_r_b, key_w, key_b, value_w, value_b, dtype=None):
    shape = (words.shape[0], rbar.shape[1], words.shape[2])
    return words.new_empty(shape, dtype=dtype), words.new_empty(shape, dtype=dtype)


def _write_backward_fake(
    grad_keys, grad_values, words, rbar, A, B, M_w, M_w_b, M_r, M_r_b, key_w, key_b, value_w, value_b,
    needs_input_grad=None,
):  # fmt: skip
    inputs = (words, rbar, A, B, M_w, M_w_b, M_r, M_r_b, key_w, key_b, value_w, value_b)
    needs = needs_input_grad or (True,) * WRITE_INPUTS
    grads = [torch.empty_like(words)] + [t.new_empty(t.shape) for t in inputs[1:]]  # words': their layout
    return [g if need else t.new_empty(0) for g, t, need in zip(grads, inputs, needs)]


def _read_fake(img, keys, values, pad_mask, gate_w, gate_b, return_attention, legacy_mask):
    batch, _, height, width = img.shape
    attention_shape = (batch, keys.shape[2], height, width) if return_attention else (0,)
    return torch.empty_like(img), img.new_empty(attention_shape)  # r' in img's layout


def _read_backward_fake(grad_out, img, keys, values, pad_mask, gate_w, gate_b, legacy_mask):
    return (torch.empty_like(img), *(t.new_empty(t.shape) for t in (keys, values, gate_w, gate_b)))


def _save_write_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:WRITE_INPUTS])
    ctx.keys_dtype = output[0].dtype
    ctx.set_materialize_grads(False)  # an unused output's gradient: None, not a zero-filled tensor


def _save_read_inputs(ctx, inputs, output) -> None:
    img, keys, values, pad_mask, gate_w, gate_b, _, legacy_mask = inputs
    ctx.save_for_backward(img, keys, values, pad_mask, gate_w, gate_b)
    ctx.legacy_mask = legacy_mask
    ctx.mark_non_differentiable(output[1])  # the attention map is for looking at, not training
    ctx.set_materialize_grads(False)  # so no zero-filled gradient of the attention map is made


def _takes(op, argument: str) -> bool:
    return any(a.name == argument for a in op.default._schema.arguments)


def register_memory_write(namespace: str) -> None:
    """Fake shapes and autograd for ``<namespace>::memory_write`` (+ ``memory_write_backward``).

    The backward is an op of its own, so a compiled graph holds it as one node. Output gradients
    reach it contiguous; a missing one (an output that was not used) as zeros. Only the inputs
    that need a gradient get one (None for the others).
    """
    ops = getattr(torch.ops, namespace)
    takes_needs = _takes(ops.memory_write_backward, "needs_input_grad")

    def backward(ctx, grad_keys: Tensor | None, grad_values: Tensor | None):
        inputs = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:WRITE_INPUTS])
        shape = (inputs[0].shape[0], inputs[1].shape[1], inputs[0].shape[2])
        grads = [
            inputs[0].new_zeros(shape, dtype=ctx.keys_dtype) if g is None else g.contiguous()
            for g in (grad_keys, grad_values)
        ]
        result = ops.memory_write_backward(*grads, *inputs, *([needs] if takes_needs else []))
        extra = len(ctx.needs_input_grad) - WRITE_INPUTS  # memory_write's dtype, where it has one
        return (*(g if need else None for g, need in zip(result, needs)), *(None,) * extra)

    torch.library.register_fake(f"{namespace}::memory_write")(_write_fake)
    torch.library.register_fake(f"{namespace}::memory_write_backward")(_write_backward_fake)
    torch.library.register_autograd(f"{namespace}::memory_write", backward, setup_context=_save_write_inputs)


def register_memory_read(namespace: str) -> None:
    """Fake shapes and autograd for ``<namespace>::memory_read`` (+ ``memory_read_backward``)."""
    ops = getattr(torch.ops, namespace)

    def backward(ctx, grad_out: Tensor | None, _grad_attention: None):
        if grad_out is None:  # only the attention map was used: it has no gradient
            return (None,) * 8
        img, keys, values, pad_mask, gate_w, gate_b = ctx.saved_tensors
        grads = ops.memory_read_backward(
            like_image(grad_out, img), img, keys, values, pad_mask, gate_w, gate_b, ctx.legacy_mask
        )
        needs = [ctx.needs_input_grad[i] for i in (0, 1, 2, 4, 5)]
        grad_img, grad_keys, grad_values, grad_gate_w, grad_gate_b = (
            g if need else None for g, need in zip(grads, needs)
        )
        return grad_img, grad_keys, grad_values, None, grad_gate_w, grad_gate_b, None, None

    torch.library.register_fake(f"{namespace}::memory_read")(_read_fake)
    torch.library.register_fake(f"{namespace}::memory_read_backward")(_read_backward_fake)
    torch.library.register_autograd(f"{namespace}::memory_read", backward, setup_context=_save_read_inputs)


def register_memory_ops(namespace: str) -> None:
    """Both ops of a namespace that defines all four (the C++ schemas)."""
    register_memory_write(namespace)
    register_memory_read(namespace)
