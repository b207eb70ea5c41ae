"""Presets as small dataclasses: ``bird`` and ``coco`` (the reference configs) and ``shapes``.

``bird`` is ``cfg/bird_DMGAN.yml`` of the reference code plus the defaults of its ``miscc/config.py``;
``coco`` is ``cfg/coco_DMGAN.yml``. ``shapes`` keeps the architecture and shrinks it to a size that
trains on two CPU cores, for the built-in procedurally drawn dataset.

    >>> cfg = get_preset("bird")
    >>> cfg.model.gf_dim, cfg.train.batch_size
    (64, 10)
    >>> override(cfg, **{"train.batch_size": 4}).train.batch_size
    4

Every value is checked against its field's type (``--set`` reads its values as JSON, else as text):

    >>> override(cfg, **{"train.batch_size": "abc"})
    Traceback (most recent call last):
    ...
    ValueError: train.batch_size: expected int, got 'abc' (str)
    >>> override(cfg, **{"train.betas": [0.5, 0.9], "train.g_lr": 1}).train
    TrainConfig(batch_size=10, ..., g_lr=1.0, ..., betas=(0.5, 0.9), ...)

:func:`load_config_file` reads a run's ``config.json`` (to replay it) or a hand-written file.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
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
    # DAMSM image encoder: "inception" (reference), "small", or "small_coord" (small, with x / y
    # coordinate channels: placement read from the pixels, not from the zero padding alone)
    image_encoder: str = "inception"
    # CA-Net's noise times this (1: the reference). At 1 two draws for one caption differ about 20
    # times more than captions that differ in one position or background word, so the first stage,
    # the only one that can place the object, barely sees those words (docs/experiments.md).
    ca_noise_scale: float = 1.0
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
    # Built-in shapes only (switched off, with a line saying so, on other data): the DAMSM loss's
    # negatives decided by the captions (a pair is left out only when the caption is true of the
    # image) instead of by the (colour, shape) class, which left no negative differing in position
    # or background alone; in DAMSM pretraining and in G's DAMSM term.
    damsm_consistent_mask: bool = False
    # ... and one counterfactual caption per caption (one named attribute word swapped) as a
    # further candidate for its image in the DAMSM loss (pretraining and G's term)
    damsm_counterfactuals: bool = False
    # ... and in every matching-aware D, real image b with caption b's counterfactual as a
    # mismatched pair
    d_counterfactuals: bool = False
    # Weight of losses.stage_consistency_loss in G's loss: each stage's image against the next
    # stage's at half size, so that the stages agree on background and placement. 0 (off) in the
    # reference's recipe.
    stage_consistency: float = 0.0


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
            image_encoder="small_coord",
            ca_noise_scale=0.1,
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
            # Position and background priced as colour is (issue 30; docs/experiments.md).
            damsm_consistent_mask=True,
            damsm_counterfactuals=True,
            d_counterfactuals=True,
            # Without it the 8- and 16-pixel stages draw a gray background whatever the caption
            # says; weights of 1 and 10 left them gray (docs/experiments.md, issue 30 point 2).
            stage_consistency=30.0,
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


# Fields that older checkpoints and config files stored in the model config but that are choices of
# a run, not of the model (the memory op's backend is an argument of the generator and of the
# command lines): the run option of the same name now.
RUNTIME_CHOICES_ONCE_STORED = frozenset({"memory_backend"})

# Model fields added after checkpoints were first written, each with the value that gives what a
# checkpoint without it was trained with (CA-Net's noise at its full scale before the field).
MODEL_FIELDS_ADDED_LATER: dict[str, Any] = {"ca_noise_scale": 1.0}


def overrides_as_flags(changes: dict[str, Any]) -> list[str]:
    """``--set GROUP.FIELD=VALUE`` command-line arguments for config changes (values written as JSON,
    as ``--set`` reads them, so ``True`` and tuples survive the trip; text stays text)."""
    return [
        arg
        for key, value in changes.items()
        for arg in ("--set", f"{key}={value if isinstance(value, str) else json.dumps(value)}")
    ]


def get_preset(name: str) -> Config:
    """Return a fresh copy of the named preset."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


# --------------------------------------------------------------------------------------------
# Values checked against their fields' types


class _MismatchError(Exception):
    """A value that does not fit an annotation; :func:`check_type` words the error."""


def check_type(name: str, value: Any, annotation: Any) -> Any:
    """``value`` as a field annotated ``annotation`` holds it, else a ValueError naming the field, the
    value and the expected type. Strict where a loose reading would hide a typo (a bool is only
    true or false, not 1 or "yes"; an int is no float and no bool), lenient where JSON cannot say
    more (a float takes an int, a fixed-length tuple a list; both are converted).

    >>> check_type("train.betas", [0.5, 1], tuple[float, float])
    (0.5, 1.0)
    >>> check_type("eval_every", None, int | None) is None
    True
    >>> check_type("resume", 1, bool)
    Traceback (most recent call last):
    ...
    ValueError: resume: expected bool (true or false), got 1 (int)
    """
    try:
        return _coerce(value, annotation)
    except _MismatchError:
        raise ValueError(
            f"{name}: expected {_type_name(annotation)}, got {value!r} ({type(value).__name__})"
        ) from None


def _coerce(value: Any, annotation: Any) -> Any:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):  # e.g. int | None: the first that fits
        for option in args:
            try:
                return _coerce(value, option)
            except _MismatchError:
                pass
    elif annotation is type(None):
        if value is None:
            return None
    elif annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):  # bool is an int in Python
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(v, args[0]) for v in value)
            if len(value) == len(args):
                return tuple(_coerce(v, a) for v, a in zip(value, args))
    elif origin is dict:
        if isinstance(value, dict):
            key_type, value_type = args or (Any, Any)
            return {_coerce(k, key_type): _coerce(v, value_type) for k, v in value.items()}
    elif isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
    else:
        return value  # an annotation this checker does not read: no check, rather than a false error
    raise _MismatchError


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    if annotation is bool:
        return "bool (true or false)"
    if isinstance(annotation, type):
        return annotation.__name__
    return repr(annotation).replace("typing.", "")  # tuple[float, float], dict[str, Any]


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """A dataclass's fields and their annotations, resolved (``from __future__ import annotations``
    leaves them as strings)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


GROUPS = ("model", "text", "train")


def check_override(dotted: str, value: Any) -> Any:
    """``value`` checked (and converted, see :func:`check_type`) for the config field ``dotted``
    (``GROUP.FIELD``); a ValueError names an unknown group or field, or a value of the wrong type."""
    group, _, name = dotted.partition(".")
    if not name or group not in GROUPS:
        raise ValueError(f"override {dotted!r} is not of the form model|text|train.<field>")
    known = _field_types(_field_types(Config)[group])
    if name not in known:
        moved = group == "model" and name in RUNTIME_CHOICES_ONCE_STORED
        hint = f" (a run option now: --{name.replace('_', '-')})" if moved else ""
        raise ValueError(f"{group} has no field {name!r}{hint}; known: {sorted(known)}")
    return check_type(dotted, value, known[name])


def override(cfg: Config, **changes: Any) -> Config:
    """Return ``cfg`` with dotted fields replaced, e.g. ``override(cfg, **{"model.r_num": 3})``; each
    value is checked against its field's type (:func:`check_override`)."""
    groups: dict[str, dict[str, Any]] = {}
    for dotted, value in changes.items():
        group, _, name = dotted.partition(".")
        groups.setdefault(group, {})[name] = check_override(dotted, value)
    return dataclasses.replace(
        cfg, **{g: dataclasses.replace(getattr(cfg, g), **kv) for g, kv in groups.items()}
    )


def config_fields(cfg: Config) -> dict[str, Any]:
    """Every field of ``cfg`` under its dotted name.

    >>> cfg = get_preset("coco")
    >>> config_fields(cfg)["model.r_num"]
    3
    >>> override(get_preset("bird"), **config_fields(cfg)) == dataclasses.replace(cfg, name="bird")
    True
    """
    return {f"{g}.{k}": v for g in GROUPS for k, v in dataclasses.asdict(getattr(cfg, g)).items()}


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


# --------------------------------------------------------------------------------------------
# Config files: a run's config.json, replayed, or a hand-written one

# Keys of a run's config.json that record the run rather than ask anything of it: read past.
RECORD_ONLY_KEYS = frozenset({"environment"})


def load_config_file(path: str | Path, options_class: type) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run options, config overrides under dotted names) from a JSON file, for a command line to
    apply first, its flags and ``--set`` values then winning over the file's.

    ``options_class`` is the run options' dataclass (``dmgan.runtime.RunOptions``, passed in since
    the runtime imports this module): option names are checked against its fields and values against
    their types, as config values are against theirs. The options returned never hold
    ``overrides``: those are the second value. The file is one of two shapes:

    - **A run's** ``config.json``, as ``dmgan.runtime.describe`` writes it: ``{"options": {...},
      "config": {"name": ..., "model": {...}, "text": {...}, "train": {...}}}``. The ``config``
      section is what the run used, so it decides: the overrides are the run's own
      ``options.overrides`` (each must agree with ``config``) plus every field in which ``config``
      differs from the preset ``config.name``; that gives the run's configuration even where the
      preset's defaults have changed since. Either section may be missing; keys in
      :data:`RECORD_ONLY_KEYS` (``environment``) are records and read past.
    - **Hand-written**: run options at the top level and config groups holding only the fields to
      change, e.g. ``{"preset": "shapes", "max_steps": 100, "train": {"batch_size": 8}}``; a dotted
      ``"overrides": {"train.batch_size": 8}`` is read too (a field set in both is an error).

    ``model.memory_backend`` (a model field in older files) becomes the run option
    ``memory_backend``. Unknown keys, options and fields, and values of the wrong type, raise a
    ValueError that names them and the file.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON config file: {e}") from e
    try:
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        if "options" in data or "config" in data:
            options, overrides = _from_run_record(data, options_class)
        else:
            options, overrides = _from_hand_written(data)
        return _checked(options, overrides, options_class)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _object(where: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected an object, got {value!r} ({type(value).__name__})")
    return dict(value)


def _from_hand_written(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    options = {k: v for k, v in data.items() if k not in GROUPS}
    overrides = _object("overrides", options.pop("overrides", None))
    for group in GROUPS:
        for name, value in _object(group, data.get(group)).items():
            if f"{group}.{name}" in overrides:
                raise ValueError(f"{group}.{name} is set both in 'overrides' and in '{group}'")
            overrides[f"{group}.{name}"] = value
    return options, overrides


def _from_run_record(data: dict[str, Any], options_class: type) -> tuple[dict[str, Any], dict[str, Any]]:
    unknown = set(data) - {"options", "config"} - RECORD_ONLY_KEYS
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)} beside 'options' and 'config'")
    options = _object("options", data.get("options"))
    config = _object("config", data.get("config"))
    if unknown := set(config) - {"name", *GROUPS}:
        raise ValueError(f"config: unknown keys {sorted(unknown)}")
    asked = _object("options.overrides", options.pop("overrides", None))
    used = {f"{g}.{k}": v for g in GROUPS for k, v in _object(f"config.{g}", config.get(g)).items()}
    _move_run_choices(asked, options)
    _move_run_choices(used, options)
    if "name" in config and options.setdefault("preset", config["name"]) != config["name"]:
        raise ValueError(f"options.preset {options['preset']!r} and config.name {config['name']!r} differ")
    preset = options.get("preset", {f.name: f.default for f in dataclasses.fields(options_class)}["preset"])
    defaults = config_fields(get_preset(check_type("preset", preset, str)))
    asked = {k: check_override(k, v) for k, v in asked.items()}
    used = {k: check_override(k, v) for k, v in used.items()}
    for key, value in asked.items():
        if key in used and used[key] != value:
            raise ValueError(
                f"options.overrides sets {key}={value!r} but config holds {used[key]!r}; the config "
                "section decides: change both, or remove the override"
            )
    return options, {**asked, **{k: v for k, v in used.items() if k not in asked and v != defaults[k]}}


def _move_run_choices(overrides: dict[str, Any], options: dict[str, Any]) -> None:
    """Old files' ``model.memory_backend`` (and the like) to the run option it is now."""
    for name in RUNTIME_CHOICES_ONCE_STORED:
        if f"model.{name}" in overrides:
            value = overrides.pop(f"model.{name}")
            if options.setdefault(name, value) != value:
                raise ValueError(f"model.{name} is {value!r} but the run option {name} is {options[name]!r}")


def _checked(
    options: dict[str, Any], overrides: dict[str, Any], options_class: type
) -> tuple[dict[str, Any], dict[str, Any]]:
    _move_run_choices(overrides, options)
    known = {k: v for k, v in _field_types(options_class).items() if k != "overrides"}
    if unknown := sorted(set(options) - set(known)):
        raise ValueError(f"unknown run options {unknown}; known: {sorted(known)}")
    return (
        {k: check_type(k, v, known[k]) for k, v in options.items()},
        {k: check_override(k, v) for k, v in overrides.items()},
    )
