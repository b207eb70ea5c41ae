"""Fused memory reading: key addressing, masked softmax over words, value reading, response gate.

Per program: one sample b and a tile of BLOCK_N pixels; the sample's keys, values and padding
mask (C x T each, tiny) stay in registers. With r the C x BLOCK_N pixel tile::

    s = rᵀ K                  BLOCK_N x T   (unscaled; padded words -> -inf)
    α = softmax_T(s)          BLOCK_N x T   (0 where every word is masked)
    o = V αᵀ                  C x BLOCK_N
    g = σ(w_rᵀ r + w_oᵀ o + b)     BLOCK_N
    r' = r + (o - r) g        C x BLOCK_N   (= r (1 - g) + o g)

The backward recomputes α instead of storing it; dK, dV and the gate gradients leave each program
as fp32 partials that are summed afterwards, so gradients are deterministic. Registered as
``torch.ops.dmgan_triton.memory_read`` (+ ``memory_read_backward``) with fake and autograd
implementations, so torch.compile traces it without graph breaks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels._common import alloc, dot_in_fp32, word_block


def launch_config(channels: int, t_pad: int, backward: bool, fp32: bool) -> tuple[int, int]:
    """(pixels per program, warps). The C x T key / value tiles and the C x BLOCK_N pixel tiles
    share the registers; the backward holds about twice as many tiles, and fp32 operands (3xTF32
    dots) take more registers still. Chosen from the register / spill reports of
    ``python -m kernels.compile_gate`` (no spills for N_r <= 64, T <= 32 in every dtype, and for
    every supported size in 16-bit)."""
    size = channels * max(t_pad, 32)
    if fp32:
        if backward:
            return 16, 8
        return (64, 4) if size <= 1024 else (32, 8) if size <= 2048 else (16, 8)
    if backward:
        return (32, 4) if size <= 1024 else (32, 8) if size <= 2048 else (16, 8)
    return (64, 4) if size <= 2048 else (32, 8) if size <= 4096 else (16, 8)


@triton.jit
def _dot(a, b, DTYPE: tl.constexpr, DOT_FP32: tl.constexpr):
    """a @ b with fp32 accumulation: on fp32 operands as 3xTF32 (fp32 accuracy on tensor cores;
    exact under the interpreter), else on DTYPE (bf16 / fp16) operands."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32x3")
    else:
        return tl.dot(a.to(DTYPE), b.to(DTYPE))


@triton.jit
def _load_tile(ptr, offs_c, offs_x, size_x, x_ok):
    """C x X tile of a row-major C x size_x matrix, as fp32 (0 outside)."""
    return tl.load(ptr + offs_c[:, None] * size_x + offs_x[None, :], mask=x_ok[None, :], other=0.0).to(
        tl.float32
    )


@triton.jit
def _key_addressing(r, keys, mask_ptr, b, offs_n, n_ok, offs_t, N, T, B,
                    DTYPE: tl.constexpr, DOT_FP32: tl.constexpr, LEGACY_MASK: tl.constexpr):  # fmt: skip
    """α = masked softmax over words of rᵀ K: BLOCK_N x T_PAD, rows of all-masked pixels are 0."""
    scores = _dot(tl.trans(r), keys, DTYPE, DOT_FP32)  # BLOCK_N x T_PAD
    t_ok = offs_t < T
    if LEGACY_MASK:
        # the reference's mask.repeat(queryL, 1): batch-major row b*N + q takes mask[row % B]
        rows = (b * N + offs_n) % B
        padded = tl.load(
            mask_ptr + rows[:, None] * T + offs_t[None, :], mask=n_ok[:, None] & t_ok[None, :], other=1
        )
    else:
        padded = tl.load(mask_ptr + b * T + offs_t, mask=t_ok, other=1)[None, :]
    masked = (padded != 0) | (offs_t[None, :] >= T)
    scores = tl.where(masked, float("-inf"), scores)
    row_max = tl.max(scores, axis=1)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    p = tl.where(masked, 0.0, tl.exp(scores - row_max[:, None]))
    total = tl.sum(p, axis=1)
    return p / tl.where(total == 0.0, 1.0, total)[:, None]


@triton.jit
def memory_read_forward_kernel(
    img_ptr, keys_ptr, values_ptr, mask_ptr, gate_w_ptr, gate_b_ptr, out_ptr, attn_ptr,
    N, T, B,
    C: tl.constexpr, T_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    LEGACY_MASK: tl.constexpr, WRITE_ATTENTION: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    DTYPE: tl.constexpr = img_ptr.dtype.element_ty
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, C)
    offs_t = tl.arange(0, T_PAD)
    n_ok = offs_n < N
    t_ok = offs_t < T

    r = _load_tile(img_ptr + b * C * N, offs_c, offs_n, N, n_ok)  # C x BLOCK_N
    keys = _load_tile(keys_ptr + b * C * T, offs_c, offs_t, T, t_ok)  # C x T_PAD
    values = _load_tile(values_ptr + b * C * T, offs_c, offs_t, T, t_ok)
    alpha = _key_addressing(r, keys, mask_ptr, b, offs_n, n_ok, offs_t, N, T, B, DTYPE, DOT_FP32, LEGACY_MASK)
    o = _dot(values, tl.trans(alpha), DTYPE, DOT_FP32)  # C x BLOCK_N

    w_r = tl.load(gate_w_ptr + offs_c).to(tl.float32)
    w_o = tl.load(gate_w_ptr + C + offs_c).to(tl.float32)
    bias = tl.load(gate_b_ptr).to(tl.float32)
    gate = tl.sigmoid(tl.sum(w_r[:, None] * r, axis=0) + tl.sum(w_o[:, None] * o, axis=0) + bias)
    out = r + (o - r) * gate[None, :]
    out_offs = offs_c[:, None] * N + offs_n[None, :]
    tl.store(out_ptr + b * C * N + out_offs, out.to(DTYPE), mask=n_ok[None, :])
    if WRITE_ATTENTION:
        attn_offs = offs_t[None, :] * N + offs_n[:, None]
        tl.store(attn_ptr + b * T * N + attn_offs, alpha.to(DTYPE), mask=n_ok[:, None] & t_ok[None, :])


@triton.jit
def memory_read_backward_kernel(
    img_ptr, keys_ptr, values_ptr, mask_ptr, gate_w_ptr, gate_b_ptr, grad_out_ptr,
    grad_img_ptr, grad_keys_part_ptr, grad_values_part_ptr, grad_gate_part_ptr,
    N, T, B,
    C: tl.constexpr, T_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    LEGACY_MASK: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    num_tiles = tl.num_programs(0)
    DTYPE: tl.constexpr = img_ptr.dtype.element_ty
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, C)
    offs_t = tl.arange(0, T_PAD)
    n_ok = offs_n < N
    t_ok = offs_t < T

    # Recompute the forward for this tile.
    r = _load_tile(img_ptr + b * C * N, offs_c, offs_n, N, n_ok)
    keys = _load_tile(keys_ptr + b * C * T, offs_c, offs_t, T, t_ok)
    values = _load_tile(values_ptr + b * C * T, offs_c, offs_t, T, t_ok)
    alpha = _key_addressing(r, keys, mask_ptr, b, offs_n, n_ok, offs_t, N, T, B, DTYPE, DOT_FP32, LEGACY_MASK)
    o = _dot(values, tl.trans(alpha), DTYPE, DOT_FP32)
    w_r = tl.load(gate_w_ptr + offs_c).to(tl.float32)
    w_o = tl.load(gate_w_ptr + C + offs_c).to(tl.float32)
    bias = tl.load(gate_b_ptr).to(tl.float32)
    gate = tl.sigmoid(tl.sum(w_r[:, None] * r, axis=0) + tl.sum(w_o[:, None] * o, axis=0) + bias)

    # Response gate: r' = r + (o - r) g. Pixels past N have dy = 0, so they add nothing below.
    dy = _load_tile(grad_out_ptr + b * C * N, offs_c, offs_n, N, n_ok)
    d_pre_gate = tl.sum(dy * (o - r), axis=0) * gate * (1.0 - gate)  # BLOCK_N
    dr = dy * (1.0 - gate)[None, :] + w_r[:, None] * d_pre_gate[None, :]
    do = dy * gate[None, :] + w_o[:, None] * d_pre_gate[None, :]
    # Value reading o = V αᵀ and the softmax.
    d_values = _dot(do, alpha, DTYPE, DOT_FP32)  # C x T_PAD
    d_alpha = _dot(tl.trans(do), values, DTYPE, DOT_FP32)  # BLOCK_N x T_PAD
    d_scores = alpha * (d_alpha - tl.sum(alpha * d_alpha, axis=1)[:, None])
    # Key addressing s = rᵀ K.
    dr += _dot(keys, tl.trans(d_scores), DTYPE, DOT_FP32)  # C x BLOCK_N
    d_keys = _dot(r, d_scores, DTYPE, DOT_FP32)  # C x T_PAD

    out_offs = offs_c[:, None] * N + offs_n[None, :]
    tl.store(grad_img_ptr + b * C * N + out_offs, dr.to(DTYPE), mask=n_ok[None, :])
    part = (b * num_tiles + tile) * C * T_PAD + offs_c[:, None] * T_PAD + offs_t[None, :]
    tl.store(grad_keys_part_ptr + part, d_keys)
    tl.store(grad_values_part_ptr + part, d_values)
    gate_part = grad_gate_part_ptr + (b * num_tiles + tile) * (2 * C + 1)
    tl.store(gate_part + offs_c, tl.sum(r * d_pre_gate[None, :], axis=1))
    tl.store(gate_part + C + offs_c, tl.sum(o * d_pre_gate[None, :], axis=1))
    tl.store(gate_part + 2 * C, tl.sum(d_pre_gate, axis=0))


def _prepare(img: Tensor, keys: Tensor, values: Tensor, pad_mask: Tensor, gate_w: Tensor, gate_b: Tensor):
    batch, channels, height, width = img.shape
    return (
        img.contiguous(), keys.contiguous(), values.contiguous(), pad_mask.to(torch.uint8).contiguous(),
        gate_w.reshape(-1).contiguous(), gate_b.reshape(-1).contiguous(),
        (batch, channels, height * width, keys.shape[2]),
    )  # fmt: skip


@torch.library.custom_op("dmgan_triton::memory_read", mutates_args=())
def memory_read(
    img: Tensor,
    keys: Tensor,
    values: Tensor,
    pad_mask: Tensor,
    gate_w: Tensor,
    gate_b: Tensor,
    return_attention: bool,
    legacy_mask: bool,
) -> tuple[Tensor, Tensor]:
    """(r' B x C x H x W, α B x T x H x W or an empty tensor). All float inputs share one dtype."""
    img_c, keys_c, values_c, mask_c, gate_w_c, gate_b_c, (batch, channels, num_pixels, num_words) = _prepare(
        img, keys, values, pad_mask, gate_w, gate_b
    )
    out = alloc(img.shape, img.dtype, img.device)
    attention = alloc((batch, num_words, *img.shape[2:]) if return_attention else (0,), img.dtype, img.device)
    t_pad = word_block(num_words)
    block_n, num_warps = launch_config(channels, t_pad, backward=False, fp32=dot_in_fp32(img.dtype))
    memory_read_forward_kernel[(triton.cdiv(num_pixels, block_n), batch)](
        img_c, keys_c, values_c, mask_c, gate_w_c, gate_b_c, out, attention,
        num_pixels, num_words, batch,
        C=channels, T_PAD=t_pad, BLOCK_N=block_n, LEGACY_MASK=legacy_mask,
        WRITE_ATTENTION=return_attention, DOT_FP32=dot_in_fp32(img.dtype), num_warps=num_warps,
    )  # fmt: skip
    return out, attention


@memory_read.register_fake
def _(img, keys, values, pad_mask, gate_w, gate_b, return_attention, legacy_mask):
    batch, _, height, width = img.shape
    attention_shape = (batch, keys.shape[2], height, width) if return_attention else (0,)
    return img.new_empty(img.shape), img.new_empty(attention_shape)


@torch.library.custom_op("dmgan_triton::memory_read_backward", mutates_args=())
def memory_read_backward(
    grad_out: Tensor,
    img: Tensor,
    keys: Tensor,
    values: Tensor,
    pad_mask: Tensor,
    gate_w: Tensor,
    gate_b: Tensor,
    legacy_mask: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients for (img, keys, values, gate_w, gate_b), each in its input's dtype and shape."""
    img_c, keys_c, values_c, mask_c, gate_w_c, gate_b_c, (batch, channels, num_pixels, num_words) = _prepare(
        img, keys, values, pad_mask, gate_w, gate_b
    )
    t_pad = word_block(num_words)
    block_n, num_warps = launch_config(channels, t_pad, backward=True, fp32=dot_in_fp32(img.dtype))
    num_tiles = triton.cdiv(num_pixels, block_n)
    grad_img = alloc(img.shape, img.dtype, img.device)
    grad_keys_part = alloc((batch, num_tiles, channels, t_pad), torch.float32, img.device)
    grad_values_part = alloc((batch, num_tiles, channels, t_pad), torch.float32, img.device)
    grad_gate_part = alloc((batch * num_tiles, 2 * channels + 1), torch.float32, img.device)
    memory_read_backward_kernel[(num_tiles, batch)](
        img_c, keys_c, values_c, mask_c, gate_w_c, gate_b_c, grad_out.contiguous(),
        grad_img, grad_keys_part, grad_values_part, grad_gate_part,
        num_pixels, num_words, batch,
        C=channels, T_PAD=t_pad, BLOCK_N=block_n, LEGACY_MASK=legacy_mask,
        DOT_FP32=dot_in_fp32(img.dtype), num_warps=num_warps,
    )  # fmt: skip
    return (
        grad_img,
        grad_keys_part[..., :num_words].sum(1).to(keys.dtype),
        grad_values_part[..., :num_words].sum(1).to(values.dtype),
        grad_gate_part[:, : 2 * channels].sum(0).view(gate_w.shape).to(gate_w.dtype),
        grad_gate_part[:, 2 * channels :].sum(0).view(gate_b.shape).to(gate_b.dtype),
    )


@memory_read_backward.register_fake
def _(grad_out, img, keys, values, pad_mask, gate_w, gate_b, legacy_mask):
    return tuple(t.new_empty(t.shape) for t in (img, keys, values, gate_w, gate_b))


def _setup_context(ctx, inputs, output) -> None:
    img, keys, values, pad_mask, gate_w, gate_b, _, legacy_mask = inputs
    ctx.save_for_backward(img, keys, values, pad_mask, gate_w, gate_b)
    ctx.legacy_mask = legacy_mask
    ctx.mark_non_differentiable(output[1])  # the attention map is for looking at, not training


def _backward(ctx, grad_out: Tensor, _grad_attention: Tensor):
    img, keys, values, pad_mask, gate_w, gate_b = ctx.saved_tensors
    grads = memory_read_backward(
        grad_out.contiguous(), img, keys, values, pad_mask, gate_w, gate_b, ctx.legacy_mask
    )
    grad_img, grad_keys, grad_values, grad_gate_w, grad_gate_b = grads
    return grad_img, grad_keys, grad_values, None, grad_gate_w, grad_gate_b, None, None


memory_read.register_autograd(_backward, setup_context=_setup_context)
