"""What the command lines (train, sample, evaluate, demo, convert) share: the help layout, the
default device, and the flags that several of them take, each spelled and explained once."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from dmgan.ops import BACKENDS

WEIGHTS = ("ema", "raw")

# The positional argument of every command that loads a model (dmgan.pipeline.TextToImage.load).
MODEL_HELP = (
    "a training checkpoint (runs/<preset>/checkpoints/latest.pt), an exported model folder, or the "
    "Hugging Face Hub repo id (OWNER/NAME) of an exported model"
)


def default_device() -> str:
    """Where models run unless told otherwise: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


# Flag name -> argparse keywords. Defaults that depend on the machine are filled in when a
# parser is built (see add_shared_flags).
SHARED_FLAGS: dict[str, dict[str, Any]] = {
    "device": {"help": "cpu, cuda or cuda:N (default: cuda when available)"},
    "seed": {"type": int, "default": 0, "help": "random seed"},
    "weights": {
        "default": "ema",
        "choices": WEIGHTS,
        "help": "the generator's averaged (EMA) weights, as the reference samples with, or its raw ones",
    },
    "memory-backend": {
        "default": "auto",
        "choices": BACKENDS,
        "help": "backend of the dynamic-memory op (auto: the fastest that runs here; see docs/memory-op.md)",
    },
    "inception-weights": {"default": None, "help": "torchvision Inception-v3 weights file"},
}


def add_shared_flags(parser: argparse.ArgumentParser, *names: str) -> None:
    """Add the named flags of :data:`SHARED_FLAGS` (``"device"``, ``"seed"``, ...) to ``parser``."""
    for name in names:
        options = dict(SHARED_FLAGS[name])
        if name == "device":
            options["default"] = default_device()
        parser.add_argument(f"--{name}", **options)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each default once: not where the help text already states it, nor for
    unset (None) options and off switches."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "default" in (action.help or "") or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


@contextmanager
def one_line_errors(prog: str) -> Iterator[None]:
    """Inside, a ``FileNotFoundError`` or ``ValueError`` (what loading a model or reading the
    input raises, each one line that names the file and the problem) ends the command with that
    line, ``prog: ...``, and no traceback. Wrap loading and input only: an error of the work that
    follows is a bug, whose traceback is wanted."""
    try:
        yield
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"{prog}: {e}") from None
