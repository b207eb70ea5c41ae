"""``python train.py``: the command line of a training run. The work is in :mod:`dmgan.trainer`.

    python train.py                                  # built-in shapes data, end to end on a CPU
    python train.py --preset bird --data-dir data/birds --text-encoder text_encoder200.pth \\
        --image-encoder image_encoder200.pth --inception-weights inception_v3_google-1a9a5a14.pth
    python train.py --set train.batch_size=8 --set model.r_num=3 --print-config
    torchrun --nproc_per_node 4 train.py --preset coco --data-dir data/coco ...

Each flag is a field of :class:`dmgan.runtime.RunOptions` (``--max-steps`` is ``max_steps``); every
model and training setting is a config field, set with ``--set GROUP.FIELD=VALUE``. A run writes
the options and configuration it resolved to ``config.json`` in its output folder;
``--print-config`` prints them and exits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from collections.abc import Sequence
from typing import Any

import torch

from dmgan.cli import HelpFormatter, default_device
from dmgan.config import load_config_file
from dmgan.runtime import RunOptions, describe
from dmgan.trainer import train
from dmgan.training_step import TrainingState


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set expects GROUP.FIELD=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


# --help's sections: every field of RunOptions in one of them.
OPTION_GROUPS: dict[str, tuple[str, ...]] = {
    "what to train": (
        "preset", "overrides", "data_dir", "out", "stage", "text_encoder", "image_encoder", "inception_weights",
    ),
    "a run's life (resuming, checkpoints, evaluation, samples, logs)": (
        "resume", "init_from", "max_steps", "checkpoint_every", "keep_checkpoints", "eval_every", "eval_images",
        "sample_every", "num_samples", "log_every", "report_to", "max_nonfinite",
    ),
    "how it computes (the results do not depend on these but for rounding)": (
        "device", "amp", "memory_backend", "compile", "channels_last", "accumulate", "seed", "workers",
        "threads", "deterministic",
    ),
    "several processes (torchrun)": ("sync_bn", "dist_timeout", "main_work_timeout"),
    "the built-in shapes data": ("shapes_train", "shapes_test", "shapes_seed"),
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """One flag per field of :class:`RunOptions`, with the field's help, choices and default,
    in the sections of :data:`OPTION_GROUPS`."""
    p = argparse.ArgumentParser(
        description="Train DM-GAN: DAMSM pretraining, then the GAN, then a short evaluation. With no "
        "arguments: the built-in shapes data end to end (sized for about 15 minutes on two CPU cores).",
        formatter_class=HelpFormatter,
    )
    hints = typing.get_type_hints(RunOptions)
    fields = {f.name: f for f in dataclasses.fields(RunOptions)}
    grouped = [name for names in OPTION_GROUPS.values() for name in names]
    if sorted(grouped) != sorted(fields):  # a new option needs its section
        raise AssertionError(f"OPTION_GROUPS lists {sorted(set(grouped) ^ set(fields))} wrongly")
    for title, names in OPTION_GROUPS.items():
        group = p.add_argument_group(title)
        for name in names:
            f = fields[name]
            meta = dict(f.metadata)
            flag = meta.pop("flag", "--" + f.name.replace("_", "-"))
            if f.name == "overrides":
                group.add_argument(
                    flag, dest=f.name, action="append", default=[], type=_parse_override, **meta
                )
            elif hints[f.name] is bool:
                group.add_argument(flag, dest=f.name, action="store_true", **meta)
            else:
                kind = next(
                    (t for t in (int, float) if t in (hints[name], *typing.get_args(hints[name]))), str
                )
                group.add_argument(flag, dest=f.name, type=kind, default=f.default, **meta)
    p.add_argument(
        "--config",
        metavar="FILE",
        help="a JSON file of options and config fields (a run's config.json replays that run); the "
        "flags and --set given beside it win over it",
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved options and config, then exit"
    )
    return p


def parse_options(argv: Sequence[str] | None = None) -> tuple[RunOptions, bool]:
    """(the run's options, whether only to print its configuration) from a command line: a
    ``--config`` file first, then the flags and ``--set`` values given beside it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    file_overrides: dict[str, Any] = {}
    if args.config is not None:
        try:
            file_options, file_overrides = load_config_file(args.config, RunOptions)
        except (OSError, ValueError) as e:
            raise SystemExit(f"train.py: --config {args.config}: {e}") from None
        file_options.pop("resume", None)  # how that run went on in its folder, not its recipe
        parser.set_defaults(**file_options)
        args = parser.parse_args(argv)
    args = vars(args)
    print_only = args.pop("print_config")
    args.pop("config")
    args["overrides"] = {**file_overrides, **dict(args["overrides"])}
    try:
        options = RunOptions(**args)
        options.config()  # refuse unknown config fields and wrong types before anything starts
    except ValueError as e:
        raise SystemExit(f"train.py: {e}") from e
    return options, print_only


def train_from_command_line(argv: Sequence[str] | None = None) -> tuple[dict[str, Any], TrainingState | None]:
    """What a command line asks for: the final metrics and the training state (None when no GAN
    stage ran)."""
    options, print_only = parse_options(argv)
    if print_only:
        device = torch.device(options.device or default_device())
        print(json.dumps(describe(options.resolved(device), options.config()), indent=2))
        raise SystemExit(0)
    return train(options)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``train.py``: run the stages the arguments ask for; returns the final metrics."""
    return train_from_command_line(argv)[0]


if __name__ == "__main__":
    main()
