"""Eager PyTorch dynamic memory: the specification every other backend is tested against.

Notation (as in the reference code): B batch, N_w word-feature size, N_r image-feature size,
N_m = 2 N_r memory size, T words, H x W pixels, N = H W.

Memory writing (per word, the image enters only through its spatial mean r̄)::

    g_i   = σ(A w_i + B r̄)                                  B x 1 x T
    m_i   = ReLU(M_w w_i + b_w) g_i + ReLU(M_r r̄ + b_r)(1 - g_i)   B x N_m x T
    k_i   = ReLU(K m_i + b_k),  v_i = ReLU(V m_i + b_v)      B x N_r x T

Memory reading (per pixel j)::

    s_ji  = r_j · k_i          (unscaled; padded words i get -inf)   B x N x T
    α_j   = softmax_i(s_j)                                            B x N x T
    o_j   = Σ_i α_ji v_i                                              B x N_r x N
    g_j   = σ(W [r_j; o_j] + b)                                       B x 1 x N
    r'_j  = r_j (1 - g_j) + o_j g_j                                   B x N_r x N

A pixel whose every word is masked (an all-padding caption, or the legacy mask landing on one)
reads nothing: α_j = 0, o_j = 0, so r'_j = r_j (1 - σ(W_r r_j + b)). No NaN, forward or backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
) -> tuple[Tensor, Tensor]:
    """Keys and values (B x N_r x T each) from words (B x N_w x T) and r̄ (B x N_r)."""
    gate = torch.sigmoid(torch.einsum("ow,bwt->bot", A, words) + F.linear(rbar, B)[:, :, None])  # B x 1 x T
    from_words = F.relu(F.conv1d(words, M_w, M_w_b))  # B x N_m x T
    from_image = F.relu(F.conv1d(rbar[:, :, None], M_r, M_r_b))  # B x N_m x 1
    memory = from_words * gate + from_image * (1 - gate)
    keys = F.relu(F.conv1d(memory, key_w, key_b))
    values = F.relu(F.conv1d(memory, value_w, value_b))
    return keys, values


def expand_pad_mask(pad_mask: Tensor, num_pixels: int, legacy: bool = False) -> Tensor:
    """Per-pixel padding mask, B x N x T (True = masked word).

    The correct mask gives every pixel of sample b the mask of sample b. ``legacy=True`` reproduces
    the reference's ``mask.repeat(queryL, 1)`` on batch-major rows ``r = b N + q``: row r gets
    ``pad_mask[r mod B]``, i.e. mostly another sample's mask.
    """
    batch = pad_mask.shape[0]
    if not legacy:
        return pad_mask[:, None, :].expand(batch, num_pixels, pad_mask.shape[1])
    rows = torch.arange(batch * num_pixels, device=pad_mask.device).view(batch, num_pixels)
    return pad_mask[rows % batch]


def memory_read(
    img: Tensor,
    keys: Tensor,
    values: Tensor,
    pad_mask: Tensor,
    gate_w: Tensor,
    gate_b: Tensor,
    return_attention: bool = False,
    legacy_mask: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """New image features r' (B x N_r x H x W) and, if asked, the attention α (B x T x H x W)."""
    batch, channels, height, width = img.shape
    num_words = keys.shape[2]
    pixels = img.reshape(batch, channels, height * width)  # B x N_r x N
    scores = torch.bmm(pixels.transpose(1, 2), keys)  # B x N x T
    masked = expand_pad_mask(pad_mask, height * width, legacy_mask)
    reads_nothing = masked.all(dim=2, keepdim=True)  # B x N x 1
    # Rows with every word masked are left unmasked for the softmax and zeroed after it, so that
    # neither the forward nor the backward pass sees a softmax over nothing.
    scores = scores.masked_fill(masked & ~reads_nothing, float("-inf"))
    attention = torch.softmax(scores, dim=2).masked_fill(reads_nothing, 0.0)
    memory_out = torch.bmm(values, attention.transpose(1, 2))  # B x N_r x N
    # The response gate, a 1x1 convolution of [r; o] to one channel, as a linear layer per pixel
    # (the same under autocast, and an image without pixels, N = 0, goes through too).
    gate_in = torch.cat((pixels, memory_out), dim=1).transpose(1, 2)  # B x N x 2N_r
    gate = torch.sigmoid(F.linear(gate_in, gate_w.reshape(1, -1), gate_b)).transpose(1, 2)  # B x 1 x N
    r_new = pixels * (1 - gate) + memory_out * gate
    r_new = r_new.view(batch, channels, height, width)
    if not return_attention:
        return r_new, None
    return r_new, attention.transpose(1, 2).reshape(batch, num_words, height, width)
