"""Implementations of memory reading that the benchmarks time besides the dmgan.ops backends.

``literal`` is the reference code's form (DM-GAN model.py, Memory + response gate: bmm,
mask.repeat, masked softmax, transposed copies, cat, 1x1 conv, sigmoid, blends), with the
per-sample mask. ``sdpa`` is the strongest eager form: one scaled_dot_product_attention call with
scale 1 and a boolean mask, which equals the bmm form. Both take the arguments of
dmgan.ops.memory_read and return r_new.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def literal(
    img: Tensor, keys: Tensor, values: Tensor, pad_mask: Tensor, gate_w: Tensor, gate_b: Tensor
) -> Tensor:
    batch, _, ih, iw = img.shape
    query_len, source_len = ih * iw, keys.size(2)
    target_T = torch.transpose(img.view(batch, -1, query_len), 1, 2).contiguous()
    weight = torch.bmm(target_T, keys).view(batch * query_len, source_len)
    mask = pad_mask[:, None, :].expand(batch, query_len, source_len).reshape(batch * query_len, source_len)
    weight = weight.masked_fill(mask, -float("inf"))
    weight = torch.softmax(weight, dim=1).view(batch, query_len, source_len)
    weight = torch.transpose(weight, 1, 2).contiguous()
    memory_out = torch.matmul(values, weight).view(batch, -1, ih, iw)
    gate = torch.sigmoid(F.conv2d(torch.cat((img, memory_out), 1), gate_w, gate_b))
    return img * (1 - gate) + gate * memory_out


def sdpa(
    img: Tensor, keys: Tensor, values: Tensor, pad_mask: Tensor, gate_w: Tensor, gate_b: Tensor
) -> Tensor:
    batch, channels, ih, iw = img.shape
    query = img.flatten(2).transpose(1, 2)[:, None]  # B x 1 x N x C
    out = F.scaled_dot_product_attention(
        query,
        keys.transpose(1, 2)[:, None],
        values.transpose(1, 2)[:, None],
        attn_mask=~pad_mask[:, None, None, :],
        scale=1.0,
    )  # B x 1 x N x C
    memory_out = out[:, 0].transpose(1, 2).reshape(batch, channels, ih, iw)
    gate = torch.sigmoid(F.conv2d(torch.cat((img, memory_out), 1), gate_w, gate_b))
    return img + (memory_out - img) * gate
