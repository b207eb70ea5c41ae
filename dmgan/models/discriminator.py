"""DM-GAN discriminators: spectral norm with biases, no BatchNorm, an unconditional and a
sentence-conditional head on a shared image code.

``D_NET(S)`` encodes an S x S image down to 8ndf x 4 x 4 with the reference's layer names
(``img_code_s16``, ``img_code_s32``, ``img_code_s64``, ...); ``D_NET64/128/256`` are the reference's
three. The heads return **logits**: the reference ends them with a Sigmoid and trains with BCELoss,
which autocast refuses; BCE-with-logits is the same loss, computed stably (see dmgan.losses).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmgan.models.layers import Block3x3_leakRelu, downBlock, encode_image, weights_init

Pairs = tuple[Tensor, Tensor]  # (image index, sentence index), K each


class D_GET_LOGITS(nn.Module):  # noqa: N801 (reference name)
    """Image code (B x 8ndf x 4 x 4) [+ sentence B x nef, tiled to 4 x 4] → one logit per sample (B)."""

    def __init__(self, ndf: int, nef: int, bcondition: bool = False) -> None:
        super().__init__()
        self.df_dim = ndf
        self.ef_dim = nef
        self.bcondition = bcondition
        if bcondition:
            self.jointConv = Block3x3_leakRelu(ndf * 8 + nef, ndf * 8)
        self.outlogits = nn.Sequential(nn.Conv2d(ndf * 8, 1, kernel_size=4, stride=4))

    def forward(self, h_code: Tensor, c_code: Tensor | None = None, pairs: Pairs | None = None) -> Tensor:
        """Logits for image b with sentence b, or for the given (image index, sentence index)
        pairs: K logits from Nh image codes and Nc sentences (the D loss scores real, fake and
        mismatched pairs in one call, each image and sentence encoded once)."""
        if self.bcondition and c_code is not None:
            h_code = self.joint_code(h_code, c_code.view(-1, self.ef_dim), pairs)
        elif pairs is not None:
            raise ValueError("pairs need the conditional head and a sentence code")
        return self.outlogits(h_code).view(-1)

    def joint_code(self, h_code: Tensor, c_code: Tensor, pairs: Pairs | None = None) -> Tensor:
        """``jointConv(cat(h, c tiled to H x W))``, computed without tiling.

        The conv is linear in its input, so it splits into an image term, conv(h, W_h) per image
        (Nh x 8ndf x H x W), and a sentence term per sentence. The sentence is the same at every
        pixel, so its term is the 9 taps W_c[:, :, k] c (Nc x 8ndf x 9), each summed into the
        pixels whose 3x3 window puts that tap inside the zero-padded map. This costs half the
        tiled conv, and the D loss reuses each term across the pairs it scores.
        """
        conv, activation = self.jointConv
        weight = conv.normalized_weight()
        image_width = self.df_dim * 8
        image_term = F.conv2d(h_code, weight[:, :image_width], conv.module.bias, padding=1)
        height, width = image_term.shape[2:]
        taps = torch.einsum("ock,nc->nok", weight[:, image_width:].flatten(2), c_code.to(image_term.dtype))
        inside = F.unfold(image_term.new_ones(1, 1, height, width), kernel_size=3, padding=1)[0]  # 9 x HW
        sentence_term = (taps @ inside).view(-1, image_width, height, width)
        if pairs is None:
            if h_code.shape[0] != c_code.shape[0]:
                raise ValueError(f"{h_code.shape[0]} image codes but {c_code.shape[0]} sentences; give pairs")
            return activation(image_term + sentence_term)
        image_index, sentence_index = pairs
        return activation(image_term[image_index] + sentence_term[sentence_index])


class D_NET(nn.Module):  # noqa: N801
    """Discriminator for S x S images (S a power of two >= 8).

    Layout for S >= 64 (the reference): ``img_code_s16`` (S → S/16, 8ndf channels), then
    log2(S/64) ``downBlock`` layers doubling the width to 4 x 4, then as many ``Block3x3_leakRelu``
    layers halving it back to 8ndf. For S < 64 the first encoder has fewer strided layers.
    """

    def __init__(self, image_size: int, ndf: int = 32, nef: int = 256, b_jcu: bool = True) -> None:
        super().__init__()
        levels = math.log2(image_size)
        if image_size < 8 or levels != int(levels):
            raise ValueError(f"image_size must be a power of two >= 8, got {image_size}")
        self.image_size = image_size
        self.df_dim = ndf
        self.ef_dim = nef
        num_extra = max(0, int(levels) - 6)  # downBlocks after the S/16 encoder
        self.img_code_s16 = encode_image(ndf, num_down=min(4, int(levels) - 2))
        for i in range(num_extra):
            self.add_module(f"img_code_s{32 * 2**i}", downBlock(ndf * 8 * 2**i, ndf * 16 * 2**i))
        # Back down to 8ndf, named as the reference: s32_1 for 128; s64_1, s64_2 for 256.
        last = f"img_code_s{16 * 2**num_extra}"
        for i in range(num_extra):
            width = ndf * 8 * 2 ** (num_extra - i)
            self.add_module(f"{last}_{i + 1}", Block3x3_leakRelu(width, width // 2))
        self._encoder_names = [name for name, _ in self.named_children()]
        self.UNCOND_DNET = D_GET_LOGITS(ndf, nef, bcondition=False) if b_jcu else None
        self.COND_DNET = D_GET_LOGITS(ndf, nef, bcondition=True)
        self.apply(weights_init)

    def forward(self, x_var: Tensor) -> Tensor:
        """B x 3 x S x S → image code B x 8ndf x 4 x 4."""
        if x_var.dim() != 4 or x_var.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(
                f"D_NET{self.image_size}: images must have shape (B, 3, {self.image_size}, "
                f"{self.image_size}), got {tuple(x_var.shape)}"
            )
        for name in self._encoder_names:
            x_var = getattr(self, name)(x_var)
        return x_var


def D_NET64(ndf: int = 32, nef: int = 256, b_jcu: bool = True) -> D_NET:  # noqa: N802
    return D_NET(64, ndf, nef, b_jcu)


def D_NET128(ndf: int = 32, nef: int = 256, b_jcu: bool = True) -> D_NET:  # noqa: N802
    return D_NET(128, ndf, nef, b_jcu)


def D_NET256(ndf: int = 32, nef: int = 256, b_jcu: bool = True) -> D_NET:  # noqa: N802
    return D_NET(256, ndf, nef, b_jcu)
