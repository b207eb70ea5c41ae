"""Building blocks, named and shaped exactly as in the reference ``model.py``.

The ``nn.Sequential`` indices matter: they are part of the state_dict keys that released
checkpoints use (``upsample1.1.weight`` is the conv of an upBlock, ``.2`` its BatchNorm).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GLU(nn.Module):
    """Gated linear unit over channels: x[:, :C/2] * σ(x[:, C/2:])."""

    def forward(self, x: Tensor) -> Tensor:
        channels = x.shape[1]
        if channels % 2:
            raise ValueError(f"GLU needs an even number of channels, got {channels}")
        half = channels // 2
        return x[:, :half] * torch.sigmoid(x[:, half:])


def conv1x1(in_planes: int, out_planes: int, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=1, padding=0, bias=bias)


def conv3x3(in_planes: int, out_planes: int, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=bias)


def upBlock(in_planes: int, out_planes: int) -> nn.Sequential:  # noqa: N802 (reference name)
    """Nearest x2 upsampling → conv3x3 → BN → GLU: in_planes x H x W → out_planes x 2H x 2W."""
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        conv3x3(in_planes, out_planes * 2),
        nn.BatchNorm2d(out_planes * 2),
        GLU(),
    )


class ResBlock(nn.Module):
    """conv3x3(C→2C) → BN → GLU → conv3x3(C→C) → BN, plus the input; no activation after the sum."""

    def __init__(self, channel_num: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            conv3x3(channel_num, channel_num * 2),
            nn.BatchNorm2d(channel_num * 2),
            GLU(),
            conv3x3(channel_num, channel_num),
            nn.BatchNorm2d(channel_num),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x) + x


class GET_IMAGE_G(nn.Module):  # noqa: N801 (reference name)
    """Image features (ngf x H x W) → RGB image in [-1, 1]."""

    def __init__(self, ngf: int) -> None:
        super().__init__()
        self.gf_dim = ngf
        self.img = nn.Sequential(conv3x3(ngf, 3), nn.Tanh())

    def forward(self, h_code: Tensor) -> Tensor:
        return self.img(h_code)


class SpectralNorm(nn.Module):
    """Spectral normalisation as the reference's ``spectral.py`` does it.

    The wrapped module's ``weight`` becomes ``weight_bar`` (trainable) plus the power-iteration
    vectors ``weight_u`` / ``weight_v`` (buffers here, frozen parameters in the reference: same
    state_dict keys, and not counted as trainable either way). Every forward call, in train or
    eval, runs one power iteration and uses ``weight_bar / σ`` with σ = uᵀ W v; gradients flow
    through W only.
    """

    def __init__(self, module: nn.Module, name: str = "weight", power_iterations: int = 1) -> None:
        super().__init__()
        self.module = module
        self.name = name
        self.power_iterations = power_iterations
        weight = getattr(module, name)
        height = weight.shape[0]
        width = weight[0].numel()
        del module._parameters[name]
        module.register_buffer(name + "_u", F.normalize(weight.new_empty(height).normal_(), dim=0, eps=1e-12))
        module.register_buffer(name + "_v", F.normalize(weight.new_empty(width).normal_(), dim=0, eps=1e-12))
        module.register_parameter(name + "_bar", nn.Parameter(weight.detach().clone()))

    @staticmethod
    def _l2normalize(v: Tensor, eps: float = 1e-12) -> Tensor:
        return v / (v.norm() + eps)

    def normalized_weight(self) -> Tensor:
        """``weight_bar / σ``, one power iteration on (u, v) per call."""
        u = getattr(self.module, self.name + "_u")
        v = getattr(self.module, self.name + "_v")
        w_bar = getattr(self.module, self.name + "_bar")
        # σ in fp32 (or wider) even under autocast: a bf16 σ would scale the whole layer by up
        # to ±0.4%.
        dtype = torch.promote_types(w_bar.dtype, torch.float32)
        with torch.autocast(w_bar.device.type, enabled=False):
            w = w_bar.to(dtype).reshape(w_bar.shape[0], -1)
            with torch.no_grad():
                for _ in range(self.power_iterations):
                    v.copy_(self._l2normalize(w.t().mv(u.to(dtype))))
                    u.copy_(self._l2normalize(w.mv(v.to(dtype))))
            # Copies: the next call updates u and v in place while this graph may still need them.
            sigma = torch.dot(u.to(dtype, copy=True), w.mv(v.to(dtype, copy=True)))
        return w_bar / sigma.to(w_bar.dtype)

    def forward(self, x: Tensor) -> Tensor:
        # The normalised weight is passed to the conv, never stored on the module, so no stale
        # graph-carrying tensor outlives the call (deepcopy and pickling stay safe).
        return self.module._conv_forward(x, self.normalized_weight(), self.module.bias)


def downBlock(in_planes: int, out_planes: int) -> nn.Sequential:  # noqa: N802
    """SN(conv 4x4, stride 2, bias) → LeakyReLU(0.2): halves the resolution."""
    return nn.Sequential(
        SpectralNorm(nn.Conv2d(in_planes, out_planes, 4, 2, 1, bias=True)),
        nn.LeakyReLU(0.2, inplace=True),
    )


def Block3x3_leakRelu(in_planes: int, out_planes: int) -> nn.Sequential:  # noqa: N802
    """SN(conv3x3, bias) → LeakyReLU(0.2): keeps the resolution."""
    return nn.Sequential(
        SpectralNorm(conv3x3(in_planes, out_planes, bias=True)), nn.LeakyReLU(0.2, inplace=True)
    )


def encode_image(ndf: int, num_down: int = 4) -> nn.Sequential:
    """``num_down`` SN strided convs ending at 8 ndf channels: 3 x S x S → 8ndf x S/2^n x S/2^n.

    ``num_down=4`` is the reference's ``encode_image_by_16times`` (3→ndf→2ndf→4ndf→8ndf); smaller
    images (the ``shapes`` preset) drop the first layers and start at a wider width.
    """
    widths = [3] + [ndf * 2 ** (i + 4 - num_down) for i in range(num_down)]
    layers: list[nn.Module] = []
    for c_in, c_out in zip(widths, widths[1:]):
        layers += [SpectralNorm(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=True)), nn.LeakyReLU(0.2, inplace=True)]
    return nn.Sequential(*layers)


def weights_init(m: nn.Module) -> None:
    """The DM-GAN ``weights_init``: orthogonal convs and linears, BN weight ~ N(1, 0.02), bias 0.

    Conv biases keep PyTorch's default; spectral-normalised convs are initialised through
    ``weight_bar``. Use as ``model.apply(weights_init)``.
    """
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        weight = m.weight if "weight" in m._parameters else m.weight_bar
        nn.init.orthogonal_(weight.data, 1.0)
    elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        m.weight.data.normal_(1.0, 0.02)
        m.bias.data.fill_(0)
    elif isinstance(m, nn.Linear):
        nn.init.orthogonal_(m.weight.data, 1.0)
        if m.bias is not None:
            m.bias.data.fill_(0.0)
