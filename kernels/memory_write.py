"""Fused memory writing: the writing gate, M_w / M_r projections, mixing, key and value projections.

One program per sample b and block of 16 words; the per-word work is tiny (T x (N_w → N_m → N_r)),
so the gain is one launch instead of about a dozen. With words W (N_w x T) and r̄ (N_r)::

    g   = σ(A W + B r̄)                          T
    F_w = ReLU(M_w W + b_w)                      N_m x T
    f_r = ReLU(M_r r̄ + b_r)                      N_m
    M   = F_w g + f_r (1 - g)                    N_m x T
    K   = ReLU(W_k M + b_k),  V = ReLU(W_v M + b_v)    N_r x T

The kernels compute in the dtype of the keys and values (the autocast dtype under autocast) and
take every other input as it is: weights in their own dtype (fp32 parameters under autocast),
words in any dtype, contiguous or as the text encoder's B x N_w x T transpose, each rounded to
the compute dtype in registers as autocast's casts would round it, so no cast kernel runs first.
The backward recomputes the forward per program; gradients summed over words leave each program
as fp32 partials that one small kernel (:func:`dmgan.kernels._common.plan_finish_sums`) adds in a
fixed order and stores in each input's dtype, so they are deterministic. It computes only the
gradients asked for: the frozen encoder's words and the detached r̄ need none. Registered as
``torch.ops.dmgan_triton.memory_write`` (+ ``memory_write_backward``); fake shapes and autograd
come from :mod:`dmgan.ops.library`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from dmgan.kernels._common import Launch, alloc, alloc_like, dot, dot_in_fp32, plan_finish_sums
from dmgan.ops import library

NUM_INPUTS = 12  # words, r̄ and the ten weights
BLOCK_T = 16  # words per program (tl.dot needs >= 16); BLOCK_K chunks N_w, BLOCK_R the N_r rows


def launch_config(channels: int, backward: bool, fp32: bool) -> dict[str, int]:
    """Chunk sizes, warps and pipeline stages: N_m x BLOCK_T tiles (memory, its gradient, ...)
    stay in registers, so wider memories, the backward and fp32 operands get smaller chunks and
    more warps (from the reports of ``python -m dmgan.kernels.compile_gate``). The loops over N_w
    chunks are not pipelined (one stage): at N_r = 128 in fp32, Triton's default of three stages
    needs more shared memory than sm_86 / sm_89 / sm_120 give a block, and the op is too small
    for the prefetch to pay."""
    units = channels * (2 if fp32 else 1) * (2 if backward else 1)
    block = 32 if units < 64 else 16
    return dict(BLOCK_K=block, BLOCK_R=min(block, channels), num_warps=4 if units < 64 else 8, num_stages=1)


@triton.jit
def _words_offsets(b, offs_k, offs_t, NW, T, WORDS_T: tl.constexpr):
    """Offsets of sample b's words offs_k x offs_t (features x words): B x N_w x T in memory, or
    with WORDS_T B x T x N_w (the text encoder's output, transposed to B x N_w x T). The layout
    is a compile-time choice: general strides would hold two more sizes in registers, which
    spilled in the fp32 backward."""
    if WORDS_T:
        return b * NW * T + offs_k[:, None] + offs_t[None, :] * NW
    else:
        return b * NW * T + offs_k[:, None] * T + offs_t[None, :]


@triton.jit
def _write_forward(
    words_ptr,
    rbar_ptr,
    A_ptr,
    B_ptr,
    M_w_ptr,
    M_w_b_ptr,
    M_r_ptr,
    M_r_b_ptr,
    b,
    offs_t,
    T,
    NW,
    NR: tl.constexpr,
    NM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DTYPE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    WORDS_T: tl.constexpr,
):
    """Recomputable part of the forward for sample b, words offs_t: F_w and f_r before their
    ReLUs, and g. Weights are streamed in chunks so no N_m x N_w or N_m x N_r tile is held. Every
    input is rounded to DTYPE as it is loaded (what autocast's casts would have stored)."""
    offs_m = tl.arange(0, NM)
    t_ok = offs_t < T
    image_pre = tl.load(M_r_b_ptr + offs_m).to(DTYPE).to(tl.float32)
    gate_pre = tl.zeros((BLOCK_T,), tl.float32)
    for r0 in range(0, NR, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        rbar = tl.load(rbar_ptr + b * NR + offs_r).to(DTYPE).to(tl.float32)
        M_r = tl.load(M_r_ptr + offs_m[:, None] * NR + offs_r[None, :]).to(DTYPE).to(tl.float32)
        image_pre += tl.sum(M_r * rbar[None, :], axis=1)
        gate_pre += tl.sum(tl.load(B_ptr + offs_r).to(DTYPE).to(tl.float32) * rbar, axis=0)
    words_pre = tl.zeros((NM, BLOCK_T), tl.float32)
    for k0 in range(0, NW, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < NW
        w = tl.load(
            words_ptr + _words_offsets(b, offs_k, offs_t, NW, T, WORDS_T),
            mask=k_ok[:, None] & t_ok[None, :],
            other=0.0,
        ).to(DTYPE)
        M_w = tl.load(M_w_ptr + offs_m[:, None] * NW + offs_k[None, :], mask=k_ok[None, :], other=0.0)
        words_pre += dot(M_w.to(DTYPE), w, DTYPE, DOT_FP32)
        A = tl.load(A_ptr + offs_k, mask=k_ok, other=0.0).to(DTYPE).to(tl.float32)
        gate_pre += tl.sum(A[:, None] * w.to(tl.float32), axis=0)
    words_pre += tl.load(M_w_b_ptr + offs_m).to(DTYPE).to(tl.float32)[:, None]
    return words_pre, image_pre, tl.sigmoid(gate_pre)


@triton.jit
def memory_write_forward_kernel(
    words_ptr,
    rbar_ptr,
    A_ptr,
    B_ptr,
    M_w_ptr,
    M_w_b_ptr,
    M_r_ptr,
    M_r_b_ptr,
    key_w_ptr,
    key_b_ptr,
    value_w_ptr,
    value_b_ptr,
    keys_ptr,
    values_ptr,
    T,
    NW,
    NR: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_FP32: tl.constexpr,
    WORDS_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    NM: tl.constexpr = 2 * NR
    DTYPE: tl.constexpr = keys_ptr.dtype.element_ty  # the compute dtype
    words_pre, image_pre, gate = _write_forward(
        words_ptr,
        rbar_ptr,
        A_ptr,
        B_ptr,
        M_w_ptr,
        M_w_b_ptr,
        M_r_ptr,
        M_r_b_ptr,
        b,
        offs_t,
        T,
        NW,
        NR,
        NM,
        BLOCK_T,
        BLOCK_K,
        BLOCK_R,
        DTYPE,
        DOT_FP32,
        WORDS_T,
    )
    image = tl.maximum(image_pre, 0.0)
    memory = tl.maximum(words_pre, 0.0) * gate[None, :] + image[:, None] * (1.0 - gate)[None, :]
    offs_m = tl.arange(0, NM)
    t_ok = (offs_t < T)[None, :]
    for r0 in range(0, NR, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        w_offs = offs_r[:, None] * NM + offs_m[None, :]
        out_offs = b * NR * T + offs_r[:, None] * T + offs_t[None, :]
        keys = (
            dot(tl.load(key_w_ptr + w_offs).to(DTYPE), memory, DTYPE, DOT_FP32)
            + tl.load(key_b_ptr + offs_r).to(DTYPE)[:, None]
        )
        tl.store(keys_ptr + out_offs, tl.maximum(keys, 0.0).to(DTYPE), mask=t_ok)
        values = (
            dot(tl.load(value_w_ptr + w_offs).to(DTYPE), memory, DTYPE, DOT_FP32)
            + tl.load(value_b_ptr + offs_r).to(DTYPE)[:, None]
        )
        tl.store(values_ptr + out_offs, tl.maximum(values, 0.0).to(DTYPE), mask=t_ok)


@triton.jit
def _project_backward(
    w_ptr,
    b_ptr,
    grad_out_ptr,
    grad_w_part,
    grad_b_part,
    memory,
    part,
    b,
    offs_t,
    T,
    NR: tl.constexpr,
    NM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DTYPE: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """Y = ReLU(W M + b): stores this program's dW and db partials, returns Wᵀ dY_pre (NM x BLOCK_T)."""
    offs_m = tl.arange(0, NM)
    t_ok = (offs_t < T)[None, :]
    d_memory = tl.zeros((NM, offs_t.shape[0]), tl.float32)
    for r0 in range(0, NR, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        weight = tl.load(w_ptr + offs_r[:, None] * NM + offs_m[None, :]).to(DTYPE)
        pre = dot(weight, memory, DTYPE, DOT_FP32) + tl.load(b_ptr + offs_r).to(DTYPE).to(tl.float32)[:, None]
        grad = tl.load(
            grad_out_ptr + b * NR * T + offs_r[:, None] * T + offs_t[None, :], mask=t_ok, other=0.0
        )
        grad = tl.where(pre > 0.0, grad.to(tl.float32), 0.0)  # padded words: 0
        tl.store(
            grad_w_part + part * NR * NM + offs_r[:, None] * NM + offs_m[None, :],
            dot(grad, tl.trans(memory), DTYPE, DOT_FP32),
        )
        tl.store(grad_b_part + part * NR + offs_r, tl.sum(grad, axis=1))
        d_memory += dot(tl.trans(weight), grad, DTYPE, DOT_FP32)
    return d_memory


@triton.jit
def memory_write_backward_kernel(
    words_ptr,
    rbar_ptr,
    A_ptr,
    B_ptr,
    M_w_ptr,
    M_w_b_ptr,
    M_r_ptr,
    M_r_b_ptr,
    key_w_ptr,
    key_b_ptr,
    value_w_ptr,
    value_b_ptr,
    grad_keys_ptr,
    grad_values_ptr,
    grad_words_ptr,
    grad_rbar_part,
    grad_A_part,
    grad_B_part,
    grad_M_w_part,
    grad_M_w_b_part,
    grad_M_r_part,
    grad_M_r_b_part,
    grad_key_w_part,
    grad_key_b_part,
    grad_value_w_part,
    grad_value_b_part,
    T,
    NW,
    NR: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_FP32: tl.constexpr,
    WORDS_T: tl.constexpr,
    WORDS_GRAD: tl.constexpr,
    RBAR_GRAD: tl.constexpr,
):
    """The forward recomputed, then every gradient: the words' stored where the words lie, the
    rest as this program's fp32 partial sums. WORDS_GRAD / RBAR_GRAD off: those
    gradients are neither computed nor stored (their pointers may be anything)."""
    b = tl.program_id(0).to(tl.int64)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    part = b * tl.num_programs(1) + tl.program_id(1)  # this program's slot in the partial buffers
    NM: tl.constexpr = 2 * NR
    DTYPE: tl.constexpr = grad_keys_ptr.dtype.element_ty  # the compute dtype (the keys' own)
    offs_m = tl.arange(0, NM)
    t_ok = offs_t < T
    words_pre, image_pre, gate = _write_forward(
        words_ptr,
        rbar_ptr,
        A_ptr,
        B_ptr,
        M_w_ptr,
        M_w_b_ptr,
        M_r_ptr,
        M_r_b_ptr,
        b,
        offs_t,
        T,
        NW,
        NR,
        NM,
        BLOCK_T,
        BLOCK_K,
        BLOCK_R,
        DTYPE,
        DOT_FP32,
        WORDS_T,
    )
    from_words = tl.maximum(words_pre, 0.0)
    image = tl.maximum(image_pre, 0.0)
    memory = from_words * gate[None, :] + image[:, None] * (1.0 - gate)[None, :]

    # Key and value projections.
    d_memory = _project_backward(
        key_w_ptr,
        key_b_ptr,
        grad_keys_ptr,
        grad_key_w_part,
        grad_key_b_part,
        memory,
        part,
        b,
        offs_t,
        T,
        NR,
        NM,
        BLOCK_R,
        DTYPE,
        DOT_FP32,
    )
    d_memory += _project_backward(
        value_w_ptr,
        value_b_ptr,
        grad_values_ptr,
        grad_value_w_part,
        grad_value_b_part,
        memory,
        part,
        b,
        offs_t,
        T,
        NR,
        NM,
        BLOCK_R,
        DTYPE,
        DOT_FP32,
    )

    # Mixing M = F_w g + f_r (1 - g) and the writing gate g = σ(A W + B r̄). Padded words have
    # d_memory = 0, so they add nothing.
    d_words_pre = tl.where(words_pre > 0.0, d_memory * gate[None, :], 0.0)  # NM x BLOCK_T
    d_image_pre = tl.where(image_pre > 0.0, tl.sum(d_memory * (1.0 - gate)[None, :], axis=1), 0.0)  # NM
    d_gate_pre = tl.sum(d_memory * (from_words - image[:, None]), axis=0) * gate * (1.0 - gate)  # BLOCK_T
    d_gate_total = tl.sum(d_gate_pre, axis=0)
    tl.store(grad_M_w_b_part + part * NM + offs_m, tl.sum(d_words_pre, axis=1))
    tl.store(grad_M_r_b_part + part * NM + offs_m, d_image_pre)
    for r0 in range(0, NR, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        rbar = tl.load(rbar_ptr + b * NR + offs_r).to(DTYPE).to(tl.float32)
        M_r_offs = offs_m[:, None] * NR + offs_r[None, :]
        tl.store(grad_M_r_part + part * NM * NR + M_r_offs, d_image_pre[:, None] * rbar[None, :])
        tl.store(grad_B_part + part * NR + offs_r, d_gate_total * rbar)
        if RBAR_GRAD:
            M_r = tl.load(M_r_ptr + M_r_offs).to(DTYPE).to(tl.float32)
            d_rbar = tl.sum(M_r * d_image_pre[:, None], axis=0)
            d_rbar += d_gate_total * tl.load(B_ptr + offs_r).to(DTYPE).to(tl.float32)
            tl.store(grad_rbar_part + part * NR + offs_r, d_rbar)

    for k0 in range(0, NW, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < NW
        words_offs = _words_offsets(b, offs_k, offs_t, NW, T, WORDS_T)
        words = tl.load(words_ptr + words_offs, mask=k_ok[:, None] & t_ok[None, :], other=0.0).to(DTYPE)
        grad_M_w = dot(d_words_pre, tl.trans(words), DTYPE, DOT_FP32)  # NM x BLOCK_K
        tl.store(
            grad_M_w_part + part * NM * NW + offs_m[:, None] * NW + offs_k[None, :],
            grad_M_w,
            mask=k_ok[None, :],
        )
        tl.store(
            grad_A_part + part * NW + offs_k,
            tl.sum(words.to(tl.float32) * d_gate_pre[None, :], axis=1),
            mask=k_ok,
        )
        if WORDS_GRAD:
            M_w = tl.load(M_w_ptr + offs_m[:, None] * NW + offs_k[None, :], mask=k_ok[None, :], other=0.0)
            A = tl.load(A_ptr + offs_k, mask=k_ok, other=0.0).to(DTYPE).to(tl.float32)
            d_words = (
                dot(tl.trans(M_w.to(DTYPE)), d_words_pre, DTYPE, DOT_FP32) + A[:, None] * d_gate_pre[None, :]
            )
            # In DTYPE, as autocast computes it, then in the words' own dtype.
            d_words = d_words.to(DTYPE).to(grad_words_ptr.dtype.element_ty)
            tl.store(grad_words_ptr + words_offs, d_words, mask=k_ok[:, None] & t_ok[None, :])


def _options(dtype: torch.dtype, rbar: Tensor, backward: bool) -> dict[str, object]:
    nr, fp32 = rbar.shape[1], dot_in_fp32(dtype)
    return dict(NR=nr, BLOCK_T=BLOCK_T, DOT_FP32=fp32, **launch_config(nr, backward, fp32))


def _grid(words: Tensor) -> tuple[int, int]:
    return (words.shape[0], triton.cdiv(words.shape[2], BLOCK_T))  # samples x word blocks


def _words_transposed(words: Tensor) -> bool:
    """Whether the words lie B x T x N_w in memory (the text encoder's output, transposed), the
    layout the kernels read besides the contiguous one (:func:`words_as_read`)."""
    return not words.is_contiguous() and words.transpose(1, 2).is_contiguous()


def words_as_read(words: Tensor) -> Tensor:
    """The words themselves when contiguous or transposed (B x T x N_w in memory), else a
    contiguous copy."""
    return words if words.is_contiguous() or _words_transposed(words) else words.contiguous()


def plan_forward(
    words: Tensor, rbar: Tensor, weights: tuple[Tensor, ...], keys: Tensor, values: Tensor
) -> Launch:
    """The forward launch; it computes in the dtype of ``keys`` and ``values``."""
    words = words_as_read(words)
    tensors = (words, rbar.contiguous(), *(w.contiguous() for w in weights))
    return Launch(
        memory_write_forward_kernel,
        _grid(words),
        (*tensors, keys, values, words.shape[2], words.shape[1]),
        dict(_options(keys.dtype, rbar, backward=False), WORDS_T=_words_transposed(words)),
    )


def _all_inputs(needs_input_grad: Sequence[bool] | None) -> tuple[bool, ...]:
    return (True,) * NUM_INPUTS if needs_input_grad is None else tuple(needs_input_grad[:NUM_INPUTS])


def backward_buffers(
    words: Tensor, rbar: Tensor, weights: tuple[Tensor, ...], needs_input_grad: Sequence[bool] | None = None
) -> dict[str, object]:
    """grad_words (in the words' dtype and layout) and the per-program fp32 partial sums of r̄'s
    and the weights' gradients, all partials in one buffer. The words' and r̄'s are None when
    ``needs_input_grad`` (one flag per input, words first) does not ask for them; the weights'
    partials are always stored (the kernel computes them together), only finished when asked."""
    needs = _all_inputs(needs_input_grad)
    batch, tiles = _grid(words)
    rbar_shape = (batch, tiles, rbar.shape[1]) if needs[1] else (0,)
    shapes = [rbar_shape, *((batch * tiles, *w.shape) for w in weights)]
    sizes = [math.prod(shape) for shape in shapes]
    scratch = alloc((sum(sizes),), torch.float32, words.device)
    parts = [part.view(shape) for part, shape in zip(scratch.split(sizes), shapes)]
    return dict(
        grad_words=alloc_like(words) if needs[0] else None,
        rbar=parts[0] if needs[1] else None,
        weights=parts[1:],
        scratch=scratch,
    )


def plan_backward(grad_keys, grad_values, words, rbar, weights, buffers) -> Launch:
    """The backward launch; it computes in the dtype of ``grad_keys`` (the keys' own)."""
    grad_words, grad_rbar = buffers["grad_words"], buffers["rbar"]
    words = words_as_read(words)
    if grad_words is not None:  # stored where the words lie
        assert _same_strides(grad_words, words), "grad_words must lie like the words as read"
    tensors = (words, rbar.contiguous(), *(w.contiguous() for w in weights))
    unused = buffers["scratch"]  # stands in for a gradient not computed: never written
    return Launch(
        memory_write_backward_kernel,
        _grid(words),
        (
            *tensors,
            grad_keys.contiguous(),
            grad_values.contiguous(),
            unused if grad_words is None else grad_words,
            unused if grad_rbar is None else grad_rbar,
            *buffers["weights"],
            words.shape[2],
            words.shape[1],
        ),
        dict(
            _options(grad_keys.dtype, rbar, backward=True),
            WORDS_T=_words_transposed(words),
            WORDS_GRAD=grad_words is not None,
            RBAR_GRAD=grad_rbar is not None,
        ),
    )


def _same_strides(a: Tensor, b: Tensor) -> bool:
    """Same shape and the same strides along every dimension longer than 1."""
    return a.shape == b.shape and all(x == y for x, y, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def plan_finish(
    buffers: dict[str, object], grad_rbar: Tensor | None, weight_grads: Sequence[Tensor | None]
) -> Launch | None:
    """The launch that adds the partial sums into the gradients asked for (r̄'s per sample over
    its word blocks, the weights' over every program), each in its output's dtype."""
    segments = []
    if grad_rbar is not None:
        segments.append((buffers["rbar"], grad_rbar))
    for part, grad in zip(buffers["weights"], weight_grads):
        if grad is not None:
            segments.append((part.view(1, part.shape[0], grad.numel()), grad))
    return plan_finish_sums(segments)


@torch.library.custom_op("dmgan_triton::memory_write", mutates_args=())
def memory_write(
    words: Tensor,
    rbar: Tensor,
    A: Tensor,
    B: Tensor,
    M_w: Tensor,
    M_w_b: Tensor,
    M_r: Tensor,
    M_r_b: Tensor,
    key_w: Tensor,
    key_b: Tensor,
    value_w: Tensor,
    value_b: Tensor,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """(keys, values), each B x N_r x T, computed in and returned in ``dtype`` (default: the
    words'). The inputs may have any float dtypes; the words are read where they lie when
    contiguous or transposed (:func:`words_as_read`)."""
    weights = (A, B, M_w, M_w_b, M_r, M_r_b, key_w, key_b, value_w, value_b)
    shape = (words.shape[0], rbar.shape[1], words.shape[2])
    dtype = dtype or words.dtype
    keys, values = alloc(shape, dtype, words.device), alloc(shape, dtype, words.device)
    plan_forward(words, rbar, weights, keys, values)()
    return keys, values


@torch.library.custom_op("dmgan_triton::memory_write_backward", mutates_args=())
def memory_write_backward(
    grad_keys: Tensor,
    grad_values: Tensor,
    words: Tensor,
    rbar: Tensor,
    A: Tensor,
    B: Tensor,
    M_w: Tensor,
    M_w_b: Tensor,
    M_r: Tensor,
    M_r_b: Tensor,
    key_w: Tensor,
    key_b: Tensor,
    value_w: Tensor,
    value_b: Tensor,
    needs_input_grad: list[bool] | None = None,
) -> list[Tensor]:
    """Gradients for (words, rbar, A, B, M_w, M_w_b, M_r, M_r_b, key_w, key_b, value_w, value_b),
    each in its input's dtype, computed in the dtype of ``grad_keys``; an empty tensor for each
    input that ``needs_input_grad`` says needs none. Two launches: the kernel, and the one that
    finishes the partial sums."""
    weights = (A, B, M_w, M_w_b, M_r, M_r_b, key_w, key_b, value_w, value_b)
    needs = _all_inputs(needs_input_grad)
    words = words_as_read(words)  # grad_words is allocated like these
    buffers = backward_buffers(words, rbar, weights, needs)
    plan_backward(grad_keys, grad_values, words, rbar, weights, buffers)()
    grad_rbar = alloc(rbar.shape, rbar.dtype, rbar.device) if needs[1] else None
    weight_grads = [
        alloc(w.shape, w.dtype, w.device) if need else None for w, need in zip(weights, needs[2:])
    ]
    finish = plan_finish(buffers, grad_rbar, weight_grads)
    if finish is not None:
        finish()
    grads = (buffers["grad_words"], grad_rbar, *weight_grads)
    return [g if g is not None else t.new_empty(0) for g, t in zip(grads, (words, rbar, *weights))]


library.register_memory_write("dmgan_triton")
