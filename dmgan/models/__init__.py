"""The DM-GAN networks, named as in the reference code."""

from __future__ import annotations

from dmgan.config import ModelConfig
from dmgan.models.discriminator import D_GET_LOGITS, D_NET, D_NET64, D_NET128, D_NET256
from dmgan.models.generator import CA_NET, G_NET, INIT_STAGE_G, NEXT_STAGE_G
from dmgan.models.text import (
    CNN_ENCODER,
    RNN_ENCODER,
    SMALL_CNN_ENCODER,
    build_image_encoder,
    load_inception_v3,
)


def build_discriminators(cfg: ModelConfig) -> list[D_NET]:
    """One discriminator per stage, for images of ``cfg.image_sizes``."""
    return [D_NET(size, cfg.df_dim, cfg.embedding_dim) for size in cfg.image_sizes]


def build_text_encoder(cfg: ModelConfig, vocab_size: int) -> RNN_ENCODER:
    return RNN_ENCODER(vocab_size, ninput=cfg.word_dim, nhidden=cfg.embedding_dim)


def count_trainable(module) -> int:
    """Parameters with requires_grad, as the reference's ``count_parameters`` counts them."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


__all__ = [
    "CA_NET",
    "CNN_ENCODER",
    "D_GET_LOGITS",
    "D_NET",
    "D_NET64",
    "D_NET128",
    "D_NET256",
    "G_NET",
    "INIT_STAGE_G",
    "NEXT_STAGE_G",
    "RNN_ENCODER",
    "SMALL_CNN_ENCODER",
    "build_discriminators",
    "build_image_encoder",
    "build_text_encoder",
    "count_trainable",
    "load_inception_v3",
]
