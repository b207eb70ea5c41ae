"""Presets as small dataclasses: ``bird`` and ``coco`` (the reference configs) and ``shapes``.

``bird`` is ``cfg/bird_DMGAN.yml`` of the reference code plus the defaults of its ``miscc/config.py``;
``coco`` is ``cfg/coco_DMGAN.yml``. ``shapes`` keeps the architecture and shrinks it to a size that
trains on two CPU cores, for the built-in procedurally drawn dataset.

    >>> cfg = get_preset("bird")
    >>> cfg.model.gf_dim, cfg.train.batch_size
    (64, 10)
    >>> override(cfg, **{"train.batch_size": 4}).train.batch_size
    4
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of the networks (``GAN.*``, ``TEXT.*`` and ``TREE.*`` of the reference config)."""

    gf_dim: int = 64  # N_r: image-feature channels of the refinement stages
    df_dim: int = 32
    z_dim: int = 100
    condition_dim: int = 100  # CA-Net output c
    embedding_dim: int = 256  # N_w: word / sentence feature size
    word_dim: int = 300  # RNN input (word embedding) size
    r_num: int = 2  # residual blocks per refinement stage
    branch_num: int = 3  # stages: base_size, 2*base_size, 4*base_size
    base_size: int = 64
    image_encoder: str = "inception"  # DAMSM image encoder: "inception" (reference) or "small"
    legacy_mask: bool = False  # reproduce the reference's mask broadcast (released checkpoints)

    @property
    def image_sizes(self) -> tuple[int, ...]:
        return tuple(self.base_size * 2**i for i in range(self.branch_num))


@dataclass(frozen=True)
class TextConfig:
    words_num: int = 18  # T_max for GAN training (captions are sub-sampled, not cut, beyond it)
    captions_per_image: int = 10
    eval_words_num: int = 25


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 10
    max_epoch: int = 800
    snapshot_interval: int = 25  # epochs
    g_lr: float = 2e-4
    d_lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    gamma1: float = 4.0  # DAMSM: attention sharpness over regions
    gamma2: float = 5.0  # DAMSM: word-to-caption aggregation
    gamma3: float = 10.0  # DAMSM: score scale
    damsm_lambda: float = 5.0  # weight of the DAMSM word + sentence losses in the G loss
    kl_weight: float = 1.0
    ema_decay: float = 0.999
    # DAMSM pretraining
    encoder_lr: float = 2e-3
    encoder_batch_size: int = 48
    encoder_max_epoch: int = 600
    rnn_grad_clip: float = 0.25
    # Built-in shapes only: a random background for images whose caption names none
    # (dmgan.data.shapes.recolour_unnamed_backgrounds). Off in the preset: it lifts the encoders'
    # shape retrieval but not the generator's shape (docs/experiments.md).
    encoder_recolour_backgrounds: bool = False


@dataclass(frozen=True)
class Config:
    name: str
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _bird() -> Config:
    return Config(name="bird")


def _coco() -> Config:
    return Config(
        name="coco",
        model=ModelConfig(r_num=3),
        text=TextConfig(words_num=12, captions_per_image=5, eval_words_num=20),
        train=TrainConfig(batch_size=16, max_epoch=200, snapshot_interval=5, damsm_lambda=50.0),
    )


def _shapes() -> Config:
    # Sized for the 15 minutes `python train.py` (DAMSM, GAN, evaluation) may take on two CPU
    # cores: 8/16/32 stages, 16 DAMSM epochs, 2000 GAN steps. The runs that chose these
    # settings, with their timings: docs/experiments.md.
    return Config(
        name="shapes",
        model=ModelConfig(
            gf_dim=32,
            df_dim=16,
            z_dim=64,
            condition_dim=64,
            embedding_dim=128,
            word_dim=64,
            r_num=1,
            base_size=8,
            image_encoder="small",
        ),
        text=TextConfig(words_num=16, captions_per_image=10, eval_words_num=16),
        train=TrainConfig(
            batch_size=16,
            max_epoch=8,  # 2000 steps
            # A short run is limited by steps, not images: twice the reference's 2e-4 learns
            # shape faster than the reference's rate or a larger batch (docs/experiments.md).
            g_lr=4e-4,
            d_lr=4e-4,
            snapshot_interval=1,
            encoder_batch_size=48,
            # A few epochs teach the encoders colour but not shape; 16 teach both
            # (docs/experiments.md).
            encoder_max_epoch=16,
            ema_decay=0.99,  # a short run: 0.999 would still hold a tenth of the initial weights
            # With weight 1 the KL term keeps |mu| far below sigma: the sentence barely
            # reaches the first stage within a short run (docs/experiments.md).
            kl_weight=0.02,
        ),
    )


def _custom() -> Config:
    # Your own captioned images (python -m dmgan.data.build): the reference architecture, one
    # caption per image unless --set text.captions_per_image says more, CUB's other settings.
    return Config(name="custom", text=TextConfig(captions_per_image=1))


PRESETS = {"bird": _bird, "coco": _coco, "shapes": _shapes, "custom": _custom}


# Shrinks any preset to a model that trains in seconds on a CPU: for the tests, smoke runs and the
# device script's dry run (e.g. ``override(get_preset("shapes"), **TINY_OVERRIDES)``).
TINY_OVERRIDES: dict[str, Any] = {
    "model.gf_dim": 8,
    "model.df_dim": 4,
    "model.embedding_dim": 16,
    "model.word_dim": 8,
    "model.z_dim": 8,
    "model.condition_dim": 8,
    "train.encoder_batch_size": 8,
    "train.batch_size": 4,
}


def overrides_as_flags(changes: dict[str, Any]) -> list[str]:
    """``--set GROUP.FIELD=VALUE`` command-line arguments for config changes."""
    return [arg for key, value in changes.items() for arg in ("--set", f"{key}={value}")]


def get_preset(name: str) -> Config:
    """Return a fresh copy of the named preset."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def override(cfg: Config, **changes: Any) -> Config:
    """Return ``cfg`` with dotted fields replaced, e.g. ``override(cfg, **{"model.r_num": 3})``."""
    groups: dict[str, dict[str, Any]] = {}
    for dotted, value in changes.items():
        group, _, name = dotted.partition(".")
        if not name or group not in {"model", "text", "train"}:
            raise ValueError(f"override {dotted!r} is not of the form model|text|train.<field>")
        known = {f.name for f in dataclasses.fields(getattr(cfg, group))}
        if name not in known:
            raise ValueError(f"{group} has no field {name!r}; known: {sorted(known)}")
        groups.setdefault(group, {})[name] = value
    return dataclasses.replace(
        cfg, **{g: dataclasses.replace(getattr(cfg, g), **kv) for g, kv in groups.items()}
    )


# Fields that older checkpoints stored in the model config but that are choices of a run, not of
# the model (the memory op's backend is an argument of the generator and of the command lines).
RUNTIME_CHOICES_ONCE_STORED = frozenset({"memory_backend"})


def config_from_dict(data: dict[str, Any]) -> Config:
    """Inverse of ``dataclasses.asdict(cfg)`` (as stored in checkpoints).

    >>> cfg = get_preset("coco")
    >>> config_from_dict(dataclasses.asdict(cfg)) == cfg
    True
    """
    train = dict(data["train"])
    train["betas"] = tuple(train["betas"])
    model = {k: v for k, v in data["model"].items() if k not in RUNTIME_CHOICES_ONCE_STORED}
    return Config(
        name=data["name"],
        model=ModelConfig(**model),
        text=TextConfig(**data["text"]),
        train=TrainConfig(**train),
    )
