"""DAMSM encoders: RNN_ENCODER for captions, CNN_ENCODER (Inception-v3) for images.

State-dict keys are the reference's, so released ``text_encoder*.pth`` and ``image_encoder*.pth``
load with ``strict=True``. Nothing is downloaded: ImageNet weights for the Inception trunk are read
from a local file when one is given.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from dmgan.checks import ShapeChecker
from dmgan.models.layers import conv1x1


def check_word_ids(captions: Tensor, vocab_size: int) -> None:
    """Refuse word indices outside the vocabulary [0, vocab_size) with an error that says so (on
    a GPU an out-of-range embedding lookup is a device assert, not an exception)."""
    if captions.numel() and (int(captions.min()) < 0 or int(captions.max()) >= vocab_size):
        raise ValueError(f"RNN_ENCODER: captions hold word indices outside the vocabulary [0, {vocab_size})")


class RNN_ENCODER(nn.Module):  # noqa: N801 (reference name)
    """Embedding(ntoken, 300) → Dropout → bidirectional LSTM (2 x nhidden/2), packed sequences.

    ``forward(captions B x L, cap_lens B)`` returns word features B x nhidden x T (T = longest
    caption, or ``total_length``; padded positions are 0) and the sentence feature B x nhidden
    (final hidden states of both directions).
    """

    def __init__(
        self,
        ntoken: int,
        ninput: int = 300,
        drop_prob: float = 0.5,
        nhidden: int = 256,
        nlayers: int = 1,
        bidirectional: bool = True,
    ) -> None:
        super().__init__()
        self.ntoken = ntoken
        self.ninput = ninput
        self.drop_prob = drop_prob
        self.nlayers = nlayers
        self.num_directions = 2 if bidirectional else 1
        self.nhidden = nhidden // self.num_directions
        self.encoder = nn.Embedding(ntoken, ninput)
        self.drop = nn.Dropout(drop_prob)
        self.rnn = nn.LSTM(
            ninput,
            self.nhidden,
            nlayers,
            batch_first=True,
            dropout=drop_prob if nlayers > 1 else 0.0,
            bidirectional=bidirectional,
        )
        self.encoder.weight.data.uniform_(-0.1, 0.1)

    def forward(
        self, captions: Tensor, cap_lens: Tensor, total_length: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """``cap_lens`` may stay on the host while ``captions`` are on a device: packing needs the
        lengths there, so lengths given on the host cost no wait for the device, and the whole
        forward is queued without one (lengths on the device are copied to the host first)."""
        check = ShapeChecker("RNN_ENCODER")
        check("captions", captions, ("B", "L"), dtype=torch.long)
        on_host = ShapeChecker("RNN_ENCODER")  # the lengths may be on another device: own checker
        on_host.dims = check.dims
        on_host("cap_lens", cap_lens, ("B",), dtype=torch.long)
        lens = cap_lens.cpu()
        if captions.numel() and (int(lens.min()) < 1 or int(lens.max()) > captions.shape[1]):
            raise ValueError(
                f"RNN_ENCODER: cap_lens must lie in [1, {captions.shape[1]}], got {lens.tolist()}"
            )
        if captions.device.type == "cpu":  # on a GPU the caller checks its host copy (check_word_ids)
            check_word_ids(captions, self.ntoken)
        emb = self.drop(self.encoder(captions))
        # Longest caption first, as packing needs. This is pack_padded_sequence(enforce_sorted=
        # False)'s sort (so the same order among equal lengths and the same features), but its
        # permutation is applied with host indices: that function copies its sort indices to the
        # device and pad_packed_sequence copies them back, a wait for the device each.
        sorted_lens, order = torch.sort(lens, descending=True)
        order_list = order.tolist()
        packed = pack_padded_sequence(take(emb, order_list, 0), sorted_lens, batch_first=True)
        output, (h_n, _) = self.rnn(packed)
        output = pad_packed_sequence(output, batch_first=True, total_length=total_length)[0]
        restore = inverse_permutation(order_list)  # back to the captions' order
        words_emb = take(output, restore, 0).transpose(1, 2)  # B x nhidden*dirs x T
        sent_emb = take(h_n[-self.num_directions :], restore, 1)  # dirs x B x nhidden
        return words_emb, sent_emb.transpose(0, 1).reshape(captions.shape[0], -1)


def inverse_permutation(order: list[int]) -> list[int]:
    """The permutation that undoes ``order``: ``inverse[order[k]] = k``."""
    inverse = [0] * len(order)
    for k, i in enumerate(order):
        inverse[i] = k
    return inverse


def take(x: Tensor, index: list[int], dim: int) -> Tensor:
    """``x.index_select(dim, torch.tensor(index))`` with the index kept on the host: the slices
    of ``x`` stacked in that order. Exact copies, as index_select makes, but no index tensor goes
    to x's device (on a GPU a copy that waits, and nothing a CUDA graph can capture). ``x`` itself
    when the index is the identity."""
    if index == list(range(x.shape[dim])):
        return x
    slices = x.unbind(dim)
    return torch.stack([slices[i] for i in index], dim)


_INCEPTION_TRUNK = (
    "Conv2d_1a_3x3",
    "Conv2d_2a_3x3",
    "Conv2d_2b_3x3",
    "Conv2d_3b_1x1",
    "Conv2d_4a_3x3",
    "Mixed_5b",
    "Mixed_5c",
    "Mixed_5d",
    "Mixed_6a",
    "Mixed_6b",
    "Mixed_6c",
    "Mixed_6d",
    "Mixed_6e",
    "Mixed_7a",
    "Mixed_7b",
    "Mixed_7c",
)


def load_inception_v3(weights: str | os.PathLike | None = None) -> nn.Module:
    """torchvision's Inception-v3, with ImageNet weights from a local file when ``weights`` is given.

    The file is torchvision's ``inception_v3_google-*.pth`` (the reference used ``-1a9a5a14``).
    """
    from torchvision.models import inception_v3

    model = inception_v3(weights=None, aux_logits=True, init_weights=weights is None)
    if weights is not None:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"Inception-v3 weights file not found: {weights}")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return model


class CNN_ENCODER(nn.Module):  # noqa: N801 (reference name)
    """Inception-v3 trunk (frozen) + two trainable projections to ``nef``.

    Input: images in [-1, 1], any size (resized bilinearly to 299, no ImageNet normalisation, as
    the reference). Returns local features B x nef x 17 x 17 (from Mixed_6e) and the global code
    B x nef (Mixed_7c, average-pooled).
    """

    def __init__(self, nef: int = 256, inception_weights: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.nef = nef
        model = load_inception_v3(inception_weights)
        for param in model.parameters():
            param.requires_grad = False
        for name in _INCEPTION_TRUNK:
            setattr(self, name, getattr(model, name))
        self.emb_features = conv1x1(768, nef)
        self.emb_cnn_code = nn.Linear(2048, nef)
        self.emb_features.weight.data.uniform_(-0.1, 0.1)
        self.emb_cnn_code.weight.data.uniform_(-0.1, 0.1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=True)
        x = self.Conv2d_1a_3x3(x)
        x = self.Conv2d_2a_3x3(x)
        x = self.Conv2d_2b_3x3(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_3b_1x1(x)
        x = self.Conv2d_4a_3x3(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in _INCEPTION_TRUNK[5:13]:  # Mixed_5b .. Mixed_6e
            x = getattr(self, name)(x)
        features = x  # B x 768 x 17 x 17
        for name in _INCEPTION_TRUNK[13:]:  # Mixed_7a .. Mixed_7c
            x = getattr(self, name)(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # B x 2048 (avg_pool2d(8) at 299 input)
        return self.emb_features(features), self.emb_cnn_code(x)


class SMALL_CNN_ENCODER(nn.Module):  # noqa: N801
    """A small trainable image encoder with CNN_ENCODER's interface, for the CPU-sized ``shapes`` preset.

    Images in [-1, 1] of any size are resized to 32 (the preset's last stage: no upsampling
    cost); four conv blocks give local features B x nef x 8 x 8 (64 regions) and a pooled global
    code B x nef. With ``coordinates`` two channels holding each pixel's x and y join the image.
    """

    def __init__(self, nef: int = 256, width: int = 32, coordinates: bool = False) -> None:
        super().__init__()
        self.nef = nef
        self.coordinates = coordinates

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.LeakyReLU(0.2, inplace=True),
            )

        self.trunk = nn.Sequential(
            block(5 if coordinates else 3, width),
            nn.MaxPool2d(2),  # 16
            block(width, 2 * width),
            nn.MaxPool2d(2),  # 8
            block(2 * width, 4 * width),
            block(4 * width, 4 * width),
        )
        self.emb_features = conv1x1(4 * width, nef)
        self.emb_cnn_code = nn.Linear(4 * width, nef)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.shape[-2:] != (32, 32):
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        if self.coordinates:  # x and y in [-1, 1], the same for every image
            ramp = torch.linspace(-1, 1, 32, device=x.device, dtype=x.dtype)
            grid = torch.stack([ramp[None, :].expand(32, 32), ramp[:, None].expand(32, 32)])
            x = torch.cat([x, grid.expand(len(x), -1, -1, -1)], 1)
        x = self.trunk(x)
        return self.emb_features(x), self.emb_cnn_code(x.mean(dim=(2, 3)))


def build_image_encoder(kind: str, nef: int, inception_weights: str | os.PathLike | None = None) -> nn.Module:
    """The DAMSM image encoder a config names: ``"inception"`` (reference), ``"small"`` or
    ``"small_coord"`` (the small one with coordinate channels)."""
    if kind == "inception":
        return CNN_ENCODER(nef, inception_weights)
    if kind in ("small", "small_coord"):
        return SMALL_CNN_ENCODER(nef, coordinates=kind == "small_coord")
    raise ValueError(f"unknown image encoder {kind!r}; choose 'inception', 'small' or 'small_coord'")
