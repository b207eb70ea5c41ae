"""The DM-GAN generator: CA-Net → G0 (base_size²) → two dynamic-memory refinement stages.

Read top to bottom: CA_NET, INIT_STAGE_G, NEXT_STAGE_G (the memory stage), G_NET. Module and
parameter names follow the reference ``model.py`` so its released ``netG`` checkpoints load with
``strict=True``; the ``bird`` preset has exactly the 21,449,042 trainable parameters of the seed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dmgan import ops
from dmgan.checks import ShapeChecker
from dmgan.config import ModelConfig
from dmgan.models.layers import GET_IMAGE_G, GLU, ResBlock, upBlock, weights_init


class CA_NET(nn.Module):  # noqa: N801 (reference name)
    """Conditioning augmentation: sentence (B x nef) → c = μ + s ε ⊙ exp(½ log σ²), μ and log σ²
    (B x c_dim); s = ``noise_scale``, 1 in the reference."""

    def __init__(self, t_dim: int, c_dim: int, noise_scale: float = 1.0) -> None:
        super().__init__()
        self.t_dim = t_dim
        self.c_dim = c_dim
        self.noise_scale = noise_scale  # ModelConfig.ca_noise_scale
        self.fc = nn.Linear(t_dim, c_dim * 4, bias=True)
        self.relu = GLU()  # the reference's name for it

    def encode(self, text_embedding: Tensor) -> tuple[Tensor, Tensor]:
        x = self.relu(self.fc(text_embedding))
        return x[:, : self.c_dim], x[:, self.c_dim :]

    def forward(self, text_embedding: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encode(text_embedding)
        c_code = mu + torch.randn_like(mu) * (self.noise_scale * torch.exp(0.5 * logvar))
        return c_code, mu, logvar


class INIT_STAGE_G(nn.Module):  # noqa: N801
    """cat(c, z) → Linear → BN1d → GLU → ngf x 4 x 4 → upBlocks → ngf / 2^k x base x base."""

    def __init__(self, ngf: int, ncf: int, z_dim: int, num_up: int = 4) -> None:
        super().__init__()
        self.gf_dim = ngf
        self.in_dim = z_dim + ncf
        self.fc = nn.Sequential(
            nn.Linear(self.in_dim, ngf * 4 * 4 * 2, bias=False), nn.BatchNorm1d(ngf * 4 * 4 * 2), GLU()
        )
        for i in range(num_up):  # named upsample1..upsampleN as the reference
            self.add_module(f"upsample{i + 1}", upBlock(ngf // 2**i, ngf // 2 ** (i + 1)))
        self.num_up = num_up

    def forward(self, z_code: Tensor, c_code: Tensor) -> Tensor:
        out_code = self.fc(torch.cat((c_code, z_code), 1)).view(-1, self.gf_dim, 4, 4)
        for i in range(self.num_up):
            out_code = getattr(self, f"upsample{i + 1}")(out_code)
        return out_code


class NEXT_STAGE_G(nn.Module):  # noqa: N801
    """A refinement stage with the dynamic memory (math in :mod:`dmgan.ops.reference`).

    h (B x ngf x H x W), words (B x nef x T), pad mask (B x T) → memory writing → key addressing and
    value reading → response gate → cat(r', r') → R_NUM ResBlocks → upBlock: B x ngf x 2H x 2W.
    The layers own the memory parameters; the computation runs in :func:`dmgan.ops.memory_write`
    and :func:`dmgan.ops.memory_read` on the configured backend.
    """

    def __init__(
        self,
        ngf: int,
        nef: int,
        ncf: int,
        r_num: int = 2,
        backend: str = "auto",
        legacy_mask: bool = False,
    ) -> None:
        super().__init__()
        self.gf_dim = ngf
        self.ef_dim = nef
        self.cf_dim = ncf
        self.backend = backend
        self.legacy_mask = legacy_mask
        self.A = nn.Linear(nef, 1, bias=False)
        self.B = nn.Linear(ngf, 1, bias=False)
        self.M_r = nn.Sequential(nn.Conv1d(ngf, ngf * 2, kernel_size=1), nn.ReLU())
        self.M_w = nn.Sequential(nn.Conv1d(nef, ngf * 2, kernel_size=1), nn.ReLU())
        self.key = nn.Sequential(nn.Conv1d(ngf * 2, ngf, kernel_size=1), nn.ReLU())
        self.value = nn.Sequential(nn.Conv1d(ngf * 2, ngf, kernel_size=1), nn.ReLU())
        self.response_gate = nn.Sequential(nn.Conv2d(ngf * 2, 1, kernel_size=1), nn.Sigmoid())
        self.residual = nn.Sequential(*[ResBlock(ngf * 2) for _ in range(r_num)])
        self.upsample = upBlock(ngf * 2, ngf)

    def writing_weights(self) -> tuple[Tensor, ...]:
        """The memory-writing layers' weights, in the order of :func:`dmgan.ops.memory_write`."""
        layers = (self.M_w[0], self.M_r[0], self.key[0], self.value[0])
        return (self.A.weight, self.B.weight, *(t for layer in layers for t in (layer.weight, layer.bias)))

    def forward(
        self, h_code: Tensor, word_embs: Tensor, pad_mask: Tensor, return_attention: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        rbar = h_code.mean(dim=(2, 3)).detach()  # the reference detaches the pooled feature
        keys, values = ops.memory_write(word_embs, rbar, *self.writing_weights(), backend=self.backend)
        gate = self.response_gate[0]
        options = dict(backend=self.backend, return_attention=return_attention, legacy_mask=self.legacy_mask)
        h_new, attention = ops.memory_read(h_code, keys, values, pad_mask, gate.weight, gate.bias, **options)
        out_code = self.residual(torch.cat((h_new, h_new), 1))
        return self.upsample(out_code), attention


class G_NET(nn.Module):  # noqa: N801
    """The generator: (z, sentence, words, pad mask) → images at each stage.

    ``forward`` returns ``(fake_imgs, att_maps, mu, logvar)`` like the reference: images
    B x 3 x S x S for S in ``cfg.image_sizes``, and, when ``return_attention``, the key-addressing
    maps B x T x S x S of the refinement stages (an empty list otherwise). ``memory_backend``
    chooses how the dynamic-memory op runs (:data:`dmgan.ops.BACKENDS`); every backend computes
    the same function, so it is a choice of the process, not part of the model or its checkpoint.
    """

    def __init__(self, cfg: ModelConfig | None = None, memory_backend: str = "auto") -> None:
        super().__init__()
        cfg = cfg or ModelConfig()
        if memory_backend not in ops.BACKENDS:
            raise ValueError(f"unknown memory backend {memory_backend!r}; choose one of {list(ops.BACKENDS)}")
        num_up = math.log2(cfg.base_size / 4)
        if cfg.base_size < 8 or num_up != int(num_up):
            raise ValueError(f"base_size must be a power of two >= 8, got {cfg.base_size}")
        if not 1 <= cfg.branch_num <= 3:
            raise ValueError(f"branch_num must be 1, 2 or 3, got {cfg.branch_num}")
        self.cfg = cfg
        ngf, nef, ncf = cfg.gf_dim, cfg.embedding_dim, cfg.condition_dim
        self.ca_net = CA_NET(nef, ncf, cfg.ca_noise_scale)
        self.h_net1 = INIT_STAGE_G(ngf * 2 ** int(num_up), ncf, cfg.z_dim, int(num_up))
        self.img_net1 = GET_IMAGE_G(ngf)
        for i in range(2, cfg.branch_num + 1):
            self.add_module(
                f"h_net{i}",
                NEXT_STAGE_G(ngf, nef, ncf, cfg.r_num, memory_backend, cfg.legacy_mask),
            )
            self.add_module(f"img_net{i}", GET_IMAGE_G(ngf))
        self.apply(weights_init)

    def forward(
        self,
        z_code: Tensor,
        sent_emb: Tensor,
        word_embs: Tensor,
        mask: Tensor,
        cap_lens: Tensor | None = None,
        *,
        return_attention: bool = False,
    ) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
        """``z_code`` B x z_dim, ``sent_emb`` B x nef, ``word_embs`` B x nef x T, ``mask`` B x T bool
        (True = padding). ``cap_lens`` is accepted for the reference's signature and unused."""
        cfg = self.cfg
        check = ShapeChecker("G_NET")
        check("z_code", z_code, ("B", cfg.z_dim))
        check("sent_emb", sent_emb, ("B", cfg.embedding_dim))
        check("word_embs", word_embs, ("B", cfg.embedding_dim, "T"))
        check("mask", mask, ("B", "T"), dtype=torch.bool)

        c_code, mu, logvar = self.ca_net(sent_emb)
        h_code = self.h_net1(z_code, c_code)
        fake_imgs = [self.img_net1(h_code)]
        att_maps = []
        for i in range(2, cfg.branch_num + 1):
            h_code, attention = getattr(self, f"h_net{i}")(h_code, word_embs, mask, return_attention)
            fake_imgs.append(getattr(self, f"img_net{i}")(h_code))
            if attention is not None:
                att_maps.append(attention)
        return fake_imgs, att_maps, mu, logvar
