"""Training: one DM-GAN iteration as the reference runs it, and the ``train.py`` entry point.

For now ``main`` runs a smoke of the whole iteration (G forward, one step per D, G step with
DAMSM and KL, EMA) on synthetic captions and images; datasets, checkpoints and the full loop
come with the training issue.
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dmgan.config import PRESETS, Config, get_preset
from dmgan.ema import ParameterEMA
from dmgan.losses import discriminator_loss, generator_loss, kl_loss
from dmgan.models import G_NET, build_discriminators, build_image_encoder, build_text_encoder


@dataclass
class Batch:
    """Images per stage (each B x 3 x S x S in [-1, 1]), captions B x L, lengths B, classes B."""

    images: list[Tensor]
    captions: Tensor
    cap_lens: Tensor
    class_ids: Tensor | None = None


@dataclass
class GAN:
    """Everything one iteration touches."""

    cfg: Config
    netG: G_NET
    netsD: list[nn.Module]
    text_encoder: nn.Module
    image_encoder: nn.Module
    optimizerG: torch.optim.Optimizer
    optimizersD: list[torch.optim.Optimizer]
    ema: ParameterEMA

    @classmethod
    def build(cls, cfg: Config, vocab_size: int, device: torch.device | str = "cpu") -> GAN:
        netG = G_NET(cfg.model).to(device)
        netsD = [d.to(device) for d in build_discriminators(cfg.model)]
        text_encoder = build_text_encoder(cfg.model, vocab_size).to(device).eval()
        image_encoder = (
            build_image_encoder(cfg.model.image_encoder, cfg.model.embedding_dim).to(device).eval()
        )
        for encoder in (text_encoder, image_encoder):  # frozen during GAN training
            encoder.requires_grad_(False)
        t = cfg.train
        return cls(
            cfg=cfg,
            netG=netG,
            netsD=netsD,
            text_encoder=text_encoder,
            image_encoder=image_encoder,
            optimizerG=torch.optim.Adam(netG.parameters(), lr=t.g_lr, betas=t.betas),
            optimizersD=[torch.optim.Adam(d.parameters(), lr=t.d_lr, betas=t.betas) for d in netsD],
            ema=ParameterEMA(netG, t.ema_decay),
        )

    def step(self, batch: Batch, autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
        """One iteration: text → G once → each D steps on (real, fake) → G steps against the
        updated Ds on the same fakes (adversarial + λ DAMSM + KL) → EMA.

        ``autocast_dtype`` (e.g. torch.bfloat16) runs the forward passes under autocast; losses
        are fp32 and backward runs outside it. fp16 needs gradient scaling, which the training
        loop owns, so it is refused here.
        """
        if autocast_dtype == torch.float16:
            raise ValueError("GAN.step: fp16 autocast needs gradient scaling; use bfloat16 here")
        t = self.cfg.train
        device_type = batch.captions.device.type
        autocast = functools.partial(
            torch.autocast, device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None
        )
        with torch.no_grad(), autocast():
            words_emb, sent_emb = self.text_encoder(batch.captions, batch.cap_lens)
        mask = (batch.captions == 0)[:, : words_emb.shape[2]]
        noise = torch.randn(batch.captions.shape[0], self.cfg.model.z_dim, device=words_emb.device)
        with autocast():
            fake_imgs, _, mu, logvar = self.netG(noise, sent_emb, words_emb, mask)

        logs: dict[str, float] = {}
        for i, (netD, optD) in enumerate(zip(self.netsD, self.optimizersD)):
            optD.zero_grad(set_to_none=True)
            with autocast():
                errD = discriminator_loss(netD, batch.images[i], fake_imgs[i], sent_emb)
            errD.backward()
            optD.step()
            logs[f"d_loss{i}"] = errD.item()

        self.optimizerG.zero_grad(set_to_none=True)
        with autocast():
            errG, parts = generator_loss(
                self.netsD, self.image_encoder, fake_imgs, words_emb, sent_emb, batch.cap_lens,
                batch.class_ids, t.damsm_lambda, (t.gamma1, t.gamma2, t.gamma3),
            )  # fmt: skip
            kl = kl_loss(mu, logvar)
        (errG + t.kl_weight * kl).backward()
        self.optimizerG.step()
        self.ema.update(self.netG)
        logs.update({k: v.item() for k, v in parts.items()}, g_loss=errG.item(), kl=kl.item())
        return logs


def synthetic_batch(cfg: Config, vocab_size: int, batch_size: int, device: torch.device | str) -> Batch:
    """Random captions (lengths 1..words_num, padded with 0) and random images: a smoke input."""
    words_num = cfg.text.words_num
    cap_lens = torch.randint(1, words_num + 1, (batch_size,))
    captions = torch.randint(1, vocab_size, (batch_size, words_num))
    captions[torch.arange(words_num)[None, :] >= cap_lens[:, None]] = 0
    images = [torch.rand(batch_size, 3, s, s, device=device) * 2 - 1 for s in cfg.model.image_sizes]
    return Batch(images, captions.to(device), cap_lens.to(device), torch.arange(batch_size, device=device))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="DM-GAN training. For now: a smoke of full training iterations on synthetic data."
    )
    parser.add_argument("--preset", default="shapes", choices=sorted(PRESETS), help="model/training preset")
    parser.add_argument("--steps", type=int, default=3, help="iterations to run")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--vocab-size", type=int, default=100, help="size of the synthetic vocabulary")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    cfg = get_preset(args.preset)
    batch_size = args.batch_size or cfg.train.batch_size
    gan = GAN.build(cfg, args.vocab_size, args.device)
    print(f"preset {cfg.name}: G {sum(p.numel() for p in gan.netG.parameters()):,} parameters, "
          f"stages {cfg.model.image_sizes}, batch {batch_size}, device {args.device}")  # fmt: skip
    for step in range(1, args.steps + 1):
        batch = synthetic_batch(cfg, args.vocab_size, batch_size, args.device)
        start = time.perf_counter()
        logs = gan.step(batch)
        elapsed = time.perf_counter() - start
        losses = " ".join(f"{k} {v:.3f}" for k, v in logs.items())
        print(f"step {step}/{args.steps}  {batch_size / elapsed:.1f} img/s  {losses}")
        if not all(map(math.isfinite, logs.values())):
            raise SystemExit(f"step {step}: non-finite loss: {logs}")
    print("smoke finished: every loss is finite")


if __name__ == "__main__":
    main()
