"""Fused memory reading: key addressing, masked softmax over words, value reading, response gate.

With r the C x BLOCK_N tile of a sample's pixels and its keys K, values V (C x T, kept in
registers with the padding mask)::

    s = rᵀ K                  BLOCK_N x T   (unscaled; padded words -> -inf)
    α = softmax_T(s)          BLOCK_N x T   (0 where every word is masked)
    o = V αᵀ                  C x BLOCK_N
    g = σ(w_rᵀ r + w_oᵀ o + b)     BLOCK_N
    r' = r + (o - r) g        C x BLOCK_N   (= r (1 - g) + o g)

Images are addressed through (channel, pixel) strides, so they come contiguous or channels-last
(``CHANNELS_LAST``; the layouts of :mod:`dmgan.ops.library`) and r' and dr keep the layout. The
forward runs a persistent grid (one wave: as many programs as the multiprocessors hold), each
program looping over its tiles with the next one's loads issued early. The backward recomputes α instead of storing it and runs a few
persistent programs per sample, each looping over a fixed set of its tiles with dK, dV and the
gate gradients accumulated in registers; each program stores its sums once (C x T, not the padded
width) and one small kernel (:func:`dmgan.kernels._common.plan_finish_sums`) adds a sample's
programs' sums in a fixed order into each gradient's dtype: deterministic, no atomics. The kernels
take the gate's weights in their own dtype (fp32 parameters under autocast) and round them to the
image's dtype in registers, and the padding mask as the bool tensor it is (viewed as bytes, any
strides): no cast or copy runs around them.
Registered as ``torch.ops.dmgan_triton.memory_read`` (+ ``memory_read_backward``); fake shapes and
autograd come from :mod:`dmgan.ops.library`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from dmgan.kernels._common import (
    Launch,
    alloc,
    alloc_like,
    dot,
    dot_in_fp32,
    load_tile,
    plan_finish_sums,
    word_block,
)
from dmgan.ops import library


def launch_config(channels: int, t_pad: int, backward: bool, fp32: bool) -> dict[str, int]:
    """Pixels per tile, warps and pipeline stages. The C x T key / value tiles and the C x BLOCK_N
    pixel tiles share the registers; the backward holds about twice as many tiles plus its dK / dV
    sums, and fp32 operands take more registers still (fp32 tiles, and dots in IEEE fp32 on the FMA
    units: :func:`dmgan.kernels._common.dot`). 16-bit launches use four warps, so that two programs
    fit a multiprocessor's registers whatever ptxas allots (at most 255 a thread), and two stages:
    the next tile's pixels (and dy) load while this one computes. fp32 ones would spill with the
    prefetch buffers: one stage. From the register / spill / residency reports of
    ``python -m dmgan.kernels.compile_gate``."""
    size = channels * max(t_pad, 32)
    if fp32:
        if backward:
            block_n, num_warps = 16, 8
        else:
            block_n, num_warps = (32, 4) if size <= 1024 else (32, 8) if size <= 2048 else (16, 8)
    elif backward:
        block_n, num_warps = 16, 4  # 32 pixels spill a few bytes on sm_80 / 86 at N_r 64
    else:
        block_n, num_warps = (
            (32, 4) if size <= 1024 else (64, 4) if size <= 2048 else (32, 8) if size <= 4096 else (16, 8)
        )
    config = dict(BLOCK_N=block_n, num_warps=num_warps, num_stages=1 if fp32 else 2)
    if backward:  # fp32 keys and values are fetched again per tile: their registers are short there
        config["RESIDENT_KV"] = not fp32
    return config


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # under the interpreter: a few programs per sample, several tiles each, in the tests
    return torch.cuda.get_device_properties(device).multi_processor_count


def resident_programs(num_warps: int) -> int:
    """Programs of ``num_warps`` warps that one multiprocessor holds at once, at the least: its
    65,536 registers over the at most 255 a thread ptxas allots (rounded to 256), so 2 of four
    warps, 1 of eight (``python -m dmgan.kernels.compile_gate`` reports the real residency)."""
    return max(1, 65_536 // (256 * 32 * num_warps))


def programs_per_sample(batch: int, num_tiles: int, num_warps: int, multiprocessors: int) -> int:
    """Persistent programs per sample: the GPU's resident programs shared among the samples (one
    wave while B <= the slots), at least one and at most one per tile."""
    slots = multiprocessors * resident_programs(num_warps)
    return max(1, min(num_tiles, slots // max(batch, 1)))


def backward_programs(
    batch: int, channels: int, num_pixels: int, num_words: int, dtype: torch.dtype, multiprocessors: int
) -> int:
    """The backward's :func:`programs_per_sample`. Each program adds its tiles' dK / dV / gate
    sums in registers and stores them once, so fewer programs mean fewer partial sums to add."""
    config = launch_config(channels, word_block(num_words), backward=True, fp32=dot_in_fp32(dtype))
    num_tiles = triton.cdiv(num_pixels, config["BLOCK_N"])
    return programs_per_sample(batch, num_tiles, config["num_warps"], multiprocessors)


@triton.jit
def _key_addressing(
    r,
    keys,
    mask_ptr,
    b,
    offs_n,
    n_ok,
    offs_t,
    N,
    T,
    B,
    stride_mask_b,
    stride_mask_t,
    DTYPE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    LEGACY_MASK: tl.constexpr,
):
    """α = masked softmax over words of rᵀ K: BLOCK_N x T_PAD, rows of all-masked pixels are 0.
    The mask (B x T bytes, nonzero = padding) is addressed through its strides."""
    scores = dot(tl.trans(r), keys, DTYPE, DOT_FP32)  # BLOCK_N x T_PAD
    t_ok = offs_t < T
    if LEGACY_MASK:
        # the reference's mask.repeat(queryL, 1): batch-major row b*N + q takes mask[row % B]
        rows = (((b * N) % B).to(tl.int32) + offs_n) % B  # 32-bit per pixel: fewer registers
        padded = tl.load(
            mask_ptr + rows[:, None] * stride_mask_b + offs_t[None, :] * stride_mask_t,
            mask=n_ok[:, None] & t_ok[None, :],
            other=1,
        )
    else:
        padded = tl.load(mask_ptr + b * stride_mask_b + offs_t * stride_mask_t, mask=t_ok, other=1)[None, :]
    masked = (padded != 0) | (offs_t[None, :] >= T)
    scores = tl.where(masked, float("-inf"), scores)
    row_max = tl.max(scores, axis=1)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    p = tl.exp(scores - row_max[:, None])  # exp(-inf) = 0 for the masked words
    total = tl.sum(p, axis=1)
    return p / tl.where(total == 0.0, 1.0, total)[:, None]


@triton.jit
def _pixel_strides(N, C: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """(channel, pixel) strides of an image, as dmgan.ops.library lays them out: both known at
    compile time for a channels-last one, the pixel stride for a contiguous one."""
    if CHANNELS_LAST:
        return 1, C
    else:
        return N, 1


@triton.jit
def _response_gate(r, o, w_r, w_o, bias):
    """g = σ(w_rᵀ r + w_oᵀ o + b), one per pixel of the tile."""
    return tl.sigmoid(tl.sum(w_r[:, None] * r, axis=0) + tl.sum(w_o[:, None] * o, axis=0) + bias)


@triton.jit
def memory_read_forward_kernel(
    img_ptr,
    keys_ptr,
    values_ptr,
    mask_ptr,
    gate_w_ptr,
    gate_b_ptr,
    out_ptr,
    attn_ptr,
    N,
    T,
    B,
    num_tiles,
    programs,
    stride_mask_b,
    stride_mask_t,
    C: tl.constexpr,
    T_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LEGACY_MASK: tl.constexpr,
    WRITE_ATTENTION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
):
    # Persistent: program p of sample b takes tiles p, p + programs, ... (one flat grid axis: the
    # second and third hold at most 65,535 programs), the next tile's pixels loading early.
    part = tl.program_id(0)
    b = (part // programs).to(tl.int64)
    DTYPE: tl.constexpr = img_ptr.dtype.element_ty
    stride_c, stride_n = _pixel_strides(N, C, CHANNELS_LAST)
    offs_c = tl.arange(0, C)
    offs_t = tl.arange(0, T_PAD)
    t_ok = offs_t < T
    keys = load_tile(keys_ptr + b * C * T, offs_c, offs_t, T, 1, t_ok)  # C x T_PAD
    values = load_tile(values_ptr + b * C * T, offs_c, offs_t, T, 1, t_ok)
    # The gate's weights in their own dtype, rounded to the image's as autocast would cast them.
    w_r = tl.load(gate_w_ptr + offs_c).to(DTYPE).to(tl.float32)
    w_o = tl.load(gate_w_ptr + C + offs_c).to(DTYPE).to(tl.float32)
    bias = tl.load(gate_b_ptr).to(DTYPE).to(tl.float32)
    # Prefetched by hand, one tile ahead, in registers: Triton's pipeliner leaves this loop alone
    # (its one load feeds a transposed dot), so the next tile's pixels are asked for before this
    # tile's math and arrive while it runs.
    first = part % programs
    offs_next = first * BLOCK_N + tl.arange(0, BLOCK_N)
    r_next = load_tile(img_ptr + b * C * N, offs_c, offs_next, stride_c, stride_n, offs_next < N)
    for tile in range(first, num_tiles, programs):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        pixel_offs = offs_c[:, None] * stride_c + offs_n[None, :] * stride_n  # C x BLOCK_N, either layout
        r = r_next  # C x BLOCK_N
        offs_next = offs_n + programs * BLOCK_N
        r_next = load_tile(img_ptr + b * C * N, offs_c, offs_next, stride_c, stride_n, offs_next < N)
        alpha = _key_addressing(
            r, keys, mask_ptr, b, offs_n, n_ok, offs_t, N, T, B, stride_mask_b, stride_mask_t, DTYPE, DOT_FP32,
            LEGACY_MASK,
        )  # fmt: skip
        o = dot(values, tl.trans(alpha), DTYPE, DOT_FP32)  # C x BLOCK_N
        gate = _response_gate(r, o, w_r, w_o, bias)
        out = r + (o - r) * gate[None, :]
        tl.store(out_ptr + b * C * N + pixel_offs, out.to(DTYPE), mask=n_ok[None, :])
        if WRITE_ATTENTION:
            attn_offs = offs_t[None, :] * N + offs_n[:, None]
            tl.store(attn_ptr + b * T * N + attn_offs, alpha.to(DTYPE), mask=n_ok[:, None] & t_ok[None, :])


@triton.jit
def memory_read_backward_kernel(
    img_ptr,
    keys_ptr,
    values_ptr,
    mask_ptr,
    gate_w_ptr,
    gate_b_ptr,
    grad_out_ptr,
    grad_img_ptr,
    grad_keys_part_ptr,
    grad_values_part_ptr,
    grad_gate_part_ptr,
    N,
    T,
    B,
    num_tiles,
    programs,
    stride_mask_b,
    stride_mask_t,
    C: tl.constexpr,
    T_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LEGACY_MASK: tl.constexpr,
    DOT_FP32: tl.constexpr,
    RESIDENT_KV: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
):
    # Program p of sample b takes tiles p, p + programs, ... in that order.
    part = tl.program_id(0).to(tl.int64)  # = b * programs + p: this program's slot in the partial sums
    b = (part // programs).to(tl.int64)
    DTYPE: tl.constexpr = img_ptr.dtype.element_ty
    stride_c, stride_n = _pixel_strides(N, C, CHANNELS_LAST)
    offs_c = tl.arange(0, C)
    offs_t = tl.arange(0, T_PAD)
    t_ok = offs_t < T
    keys = load_tile(keys_ptr + b * C * T, offs_c, offs_t, T, 1, t_ok)
    values = load_tile(values_ptr + b * C * T, offs_c, offs_t, T, 1, t_ok)
    w_r = tl.load(gate_w_ptr + offs_c).to(DTYPE).to(tl.float32)  # rounded as in the forward
    w_o = tl.load(gate_w_ptr + C + offs_c).to(DTYPE).to(tl.float32)
    bias = tl.load(gate_b_ptr).to(DTYPE).to(tl.float32)
    d_keys = tl.zeros((C, T_PAD), tl.float32)
    d_values = tl.zeros((C, T_PAD), tl.float32)
    d_w_r = tl.zeros((C,), tl.float32)
    d_w_o = tl.zeros((C,), tl.float32)
    d_bias = tl.zeros((BLOCK_N,), tl.float32)

    for tile in range(part % programs, num_tiles, programs):
        if not RESIDENT_KV:  # fetched again for each tile (from cache) to free their registers
            keys = load_tile(keys_ptr + b * C * T, offs_c, offs_t, T, 1, t_ok)
            values = load_tile(values_ptr + b * C * T, offs_c, offs_t, T, 1, t_ok)
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        # Recompute the forward for this tile.
        r = load_tile(img_ptr + b * C * N, offs_c, offs_n, stride_c, stride_n, n_ok)
        alpha = _key_addressing(
            r, keys, mask_ptr, b, offs_n, n_ok, offs_t, N, T, B, stride_mask_b, stride_mask_t, DTYPE, DOT_FP32,
            LEGACY_MASK,
        )  # fmt: skip
        o = dot(values, tl.trans(alpha), DTYPE, DOT_FP32)
        gate = _response_gate(r, o, w_r, w_o, bias)
        # Response gate: r' = r + (o - r) g. Pixels past N have dy = 0, so they add nothing below.
        dy = load_tile(grad_out_ptr + b * C * N, offs_c, offs_n, stride_c, stride_n, n_ok)
        d_pre_gate = tl.sum(dy * (o - r), axis=0) * gate * (1.0 - gate)  # BLOCK_N
        dr = dy * (1.0 - gate)[None, :] + w_r[:, None] * d_pre_gate[None, :]
        do = dy * gate[None, :] + w_o[:, None] * d_pre_gate[None, :]
        # Value reading o = V αᵀ and the softmax.
        d_values += dot(do, alpha, DTYPE, DOT_FP32)  # C x T_PAD
        d_alpha = dot(tl.trans(do), values, DTYPE, DOT_FP32)  # BLOCK_N x T_PAD
        d_scores = alpha * (d_alpha - tl.sum(alpha * d_alpha, axis=1)[:, None])
        # Key addressing s = rᵀ K.
        dr += dot(keys, tl.trans(d_scores), DTYPE, DOT_FP32)  # C x BLOCK_N
        d_keys += dot(r, d_scores, DTYPE, DOT_FP32)  # C x T_PAD
        pixel_offs = offs_c[:, None] * stride_c + offs_n[None, :] * stride_n
        tl.store(grad_img_ptr + b * C * N + pixel_offs, dr.to(DTYPE), mask=n_ok[None, :])
        d_w_r += tl.sum(r * d_pre_gate[None, :], axis=1)
        d_w_o += tl.sum(o * d_pre_gate[None, :], axis=1)
        d_bias += d_pre_gate

    part_offs = part * C * T + offs_c[:, None] * T + offs_t[None, :]
    tl.store(grad_keys_part_ptr + part_offs, d_keys, mask=t_ok[None, :])
    tl.store(grad_values_part_ptr + part_offs, d_values, mask=t_ok[None, :])
    gate_part = grad_gate_part_ptr + part * (2 * C + 1)
    tl.store(gate_part + offs_c, d_w_r)
    tl.store(gate_part + C + offs_c, d_w_o)
    tl.store(gate_part + 2 * C, tl.sum(d_bias, axis=0))


def _prepare(img: Tensor, keys: Tensor, values: Tensor, pad_mask: Tensor, gate_w: Tensor, gate_b: Tensor):
    """The kernels' tensor arguments, copied only where they are not laid out as the kernels read
    them (in the model: never). The bool mask is viewed as bytes, in its own strides."""
    mask = pad_mask.view(torch.uint8) if pad_mask.dtype == torch.bool else pad_mask.to(torch.uint8)
    gate_w, gate_b = gate_w.reshape(-1).contiguous(), gate_b.reshape(-1).contiguous()
    return library.dense_image(img), keys.contiguous(), values.contiguous(), mask, gate_w, gate_b


def _tiling(img: Tensor, num_words: int, backward: bool) -> tuple[dict[str, object], int]:
    """A launch's options (the kernel's sizes, ``launch_config``) and its tiles per sample."""
    channels, height, width = img.shape[1:]
    fp32, t_pad = dot_in_fp32(img.dtype), word_block(num_words)
    options = dict(C=channels, T_PAD=t_pad, DOT_FP32=fp32, **launch_config(channels, t_pad, backward, fp32))
    return options, triton.cdiv(height * width, options["BLOCK_N"])


def plan_forward(
    img, keys, values, pad_mask, gate_w, gate_b, out, attention, legacy_mask, multiprocessors: int
) -> Launch:
    """The forward's launch: a persistent grid, one wave on ``multiprocessors`` (while the batch
    fits the resident programs)."""
    batch, _, height, width = img.shape
    num_words = keys.shape[2]
    options, num_tiles = _tiling(img, num_words, backward=False)
    options.update(LEGACY_MASK=legacy_mask, WRITE_ATTENTION=attention.numel() > 0)
    inputs = _prepare(img, keys, values, pad_mask, gate_w, gate_b)
    options.update(CHANNELS_LAST=library.is_channels_last(inputs[0]))
    programs = programs_per_sample(batch, num_tiles, options["num_warps"], multiprocessors)
    sizes = (height * width, num_words, batch, num_tiles, programs, *inputs[3].stride())
    return Launch(memory_read_forward_kernel, (batch * programs,), (*inputs, out, attention, *sizes), options)


def backward_buffers(img: Tensor, num_words: int, programs: int) -> dict[str, Tensor]:
    """grad_img and the fp32 partial sums of the backward (one slot per persistent program)."""
    batch, channels = img.shape[:2]
    return dict(
        grad_img=alloc_like(img),
        keys=alloc((batch, programs, channels, num_words), torch.float32, img.device),
        values=alloc((batch, programs, channels, num_words), torch.float32, img.device),
        gate=alloc((batch * programs, 2 * channels + 1), torch.float32, img.device),
    )


def plan_backward(grad_out, img, keys, values, pad_mask, gate_w, gate_b, buffers, legacy_mask) -> Launch:
    batch, _, height, width = img.shape
    num_words, programs = keys.shape[2], buffers["keys"].shape[1]
    options, num_tiles = _tiling(img, num_words, backward=True)
    options.update(LEGACY_MASK=legacy_mask)
    inputs = _prepare(img, keys, values, pad_mask, gate_w, gate_b)
    outputs = (buffers["grad_img"], buffers["keys"], buffers["values"], buffers["gate"])
    options.update(CHANNELS_LAST=library.is_channels_last(inputs[0]))
    sizes = (height * width, num_words, batch, num_tiles, programs, *inputs[3].stride())
    args = (*inputs, library.like_image(grad_out, inputs[0]), *outputs, *sizes)
    return Launch(memory_read_backward_kernel, (batch * programs,), args, options)


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
    """(r' B x C x H x W, α B x T x H x W or an empty tensor), computed in the image's dtype;
    keys and values in it too, the gate's weights in any float dtype, the mask bool (or bytes)."""
    batch, _, height, width = img.shape
    img = library.dense_image(img)
    out = alloc_like(img)
    attention_shape = (batch, keys.shape[2], height, width) if return_attention else (0,)
    attention = alloc(attention_shape, img.dtype, img.device)
    multiprocessors = _multiprocessors(img.device)
    plan_forward(img, keys, values, pad_mask, gate_w, gate_b, out, attention, legacy_mask, multiprocessors)()
    return out, attention


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
    """Gradients for (img, keys, values, gate_w, gate_b), each in its input's dtype and shape. Two
    launches: the kernel, and the one that finishes the partial sums."""
    batch, channels, height, width = img.shape
    img = library.dense_image(img)
    num_words = keys.shape[2]
    programs = backward_programs(
        batch, channels, height * width, num_words, img.dtype, _multiprocessors(img.device)
    )
    # With no pixel (H W = 0) each program still runs once and stores zero sums.
    buffers = backward_buffers(img, num_words, programs)
    plan_backward(grad_out, img, keys, values, pad_mask, gate_w, gate_b, buffers, legacy_mask)()
    grads = tuple(alloc(t.shape, t.dtype, t.device) for t in (keys, values, gate_w, gate_b))
    finish = plan_finish(buffers, *grads)
    if finish is not None:
        finish()
    return (buffers["grad_img"], *grads)


def plan_finish(
    buffers: dict[str, Tensor],
    grad_keys: Tensor,
    grad_values: Tensor,
    grad_gate_w: Tensor,
    grad_gate_b: Tensor,
) -> Launch | None:
    """The launch that adds the backward's partial sums, in a fixed order, into the gradients of
    the keys and values (per sample, over its programs) and of the gate (over every program), each
    in its own dtype."""
    batch, programs, channels, num_words = buffers["keys"].shape
    gate = buffers["gate"][None]  # 1 x (B programs) x (2C + 1)
    return plan_finish_sums([
        (buffers["keys"].view(batch, programs, channels * num_words), grad_keys),
        (buffers["values"].view(batch, programs, channels * num_words), grad_values),
        (gate[:, :, : 2 * channels], grad_gate_w),
        (gate[:, :, 2 * channels :], grad_gate_b),
    ])  # fmt: skip


def backward_bytes(
    batch: int, channels: int, num_pixels: int, num_words: int, dtype: torch.dtype, multiprocessors: int
) -> dict[str, int]:
    """Bytes the backward moves to and from memory, each tensor counted once per load, against
    the op's essential traffic (read r and dr', write dr; keys, values and the gate once)."""
    size = torch.empty((), dtype=dtype).element_size()
    programs = backward_programs(batch, channels, num_pixels, num_words, dtype, multiprocessors)
    images = 3 * batch * channels * num_pixels * size  # r, dr' in; dr out
    per_sample = (2 * channels * num_words + 2 * channels + 1) * size + num_words  # K, V, gate, mask
    partial_floats = batch * programs * (2 * channels * num_words + 2 * channels + 1)
    return dict(
        essential=images + batch * per_sample + batch * 2 * channels * num_words * size,
        moved=(
            images
            + batch * programs * per_sample  # every program loads its sample's K, V, gate and mask
            + 2 * 4 * partial_floats  # the partial sums, stored and read back once
            + batch * 2 * channels * num_words * size  # dK, dV out
        ),
        programs_per_sample=programs,
    )


library.register_memory_read("dmgan_triton")
