"""Where a training run reports its numbers and pictures: ``metrics.jsonl`` always, and TensorBoard or
Weights & Biases when asked (``--report-to``).

:func:`open_tracker` gives the trainer one object to call, whatever the backend::

    tracker = open_tracker("tensorboard", Path("runs/shapes"), run_name="shapes", config={}, enabled=True)
    tracker.scalars("gan", 25, {"g_loss": 1.5, "d_loss": 0.7})
    tracker.images("gan", 500, {"samples": Path("runs/shapes/samples/step000500.png")})
    tracker.close()

``metrics.jsonl`` in the output folder gets one line per :meth:`Tracker.scalars` call,
``{"stage", "step", "time", **values}``, with every backend: other tools and the tests read it.
Images go only to a backend (the trainer writes its PNGs itself). A backend that is asked for but not
installed is an error when the tracker opens (:func:`check_report_to` lets the command line say so
before anything runs), never a silent no-op: a run that was meant to be watched and is not is found
out only when it is too late.

- ``tensorboard``: logs in ``<out>/tensorboard``; scalars as ``<stage>/<name>``, images as image
  summaries ``<stage>/<name>``, the run's configuration as the text summary ``config``.
- ``wandb``: a run in ``<out>/wandb`` (project ``dmgan``), offline unless ``WANDB_MODE`` says
  otherwise, so it needs no account or network (``wandb sync <out>/wandb/offline-run-*`` uploads it
  later). Each stage has its own x-axis ``<stage>/step``: the stages count their steps from 0 each,
  and W&B drops, without a word, what is logged at a global step lower than one already logged.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

REPORT_TO = ("none", "tensorboard", "wandb")
# The package each backend imports; the install extra of setup.py has the same name.
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}

ImageLike = Image.Image | str | os.PathLike | np.ndarray


class MissingBackendError(ImportError):
    """``report_to`` names a backend whose package is not installed."""


def check_report_to(name: str) -> None:
    """Raise unless ``name`` is a backend this environment can use: ``ValueError`` for a name not in
    :data:`REPORT_TO`, :class:`MissingBackendError` (naming the package and the extra) for one not
    installed. Importing the package here, not only looking it up, also catches a broken install."""
    if name not in REPORT_TO:
        raise ValueError(f"report_to must be one of {', '.join(REPORT_TO)}; got {name!r}")
    if name == "none":
        return
    package = _PACKAGES[name]
    try:
        importlib.import_module(package)
    except ImportError as e:
        raise MissingBackendError(
            f"--report-to {name} needs the {package!r} package, which cannot be imported here ({e}); "
            f'install it with: pip install "dmgan[{name}]" (in a checkout: pip install -e ".[{name}]")'
        ) from e


def to_pixels(image: ImageLike) -> np.ndarray:
    """An image as H x W x 3 uint8 RGB: a PIL image, an image file's path, or such an array."""
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            return np.asarray(opened.convert("RGB"))
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 uint8 array, got {pixels.dtype} of shape {pixels.shape}")
    return pixels


def _numbers(values: Mapping[str, Any]) -> dict[str, float]:
    """The values a backend can plot: numbers (``metrics.jsonl`` keeps the others as they are)."""
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float, np.number))}


class _Backend(Protocol):
    def scalars(self, stage: str, step: int, values: dict[str, float]) -> None: ...
    def images(self, stage: str, step: int, images: dict[str, np.ndarray]) -> None: ...
    def close(self) -> None: ...


class Tracker:
    """The run's metrics log and, when asked, one backend. A disabled tracker (the processes other
    than rank 0) writes nothing; every method is then a no-op."""

    def __init__(self, jsonl: Path | None, backend: _Backend | None = None) -> None:
        self.jsonl, self.backend = jsonl, backend

    @property
    def enabled(self) -> bool:
        return self.jsonl is not None

    def scalars(self, stage: str, step: int, values: Mapping[str, float]) -> None:
        """One line of ``metrics.jsonl``; ``<stage>/<name>`` at ``step`` in the backend."""
        if self.jsonl is None:
            return
        # Opened per line, not held open: the file is complete after every line, for anyone reading
        # it while the run goes on and after a crash.
        with open(self.jsonl, "a") as f:
            f.write(json.dumps({"stage": stage, "step": step, "time": time.time(), **values}) + "\n")
        if self.backend is not None:
            self.backend.scalars(stage, step, _numbers(values))

    def images(self, stage: str, step: int, images: Mapping[str, ImageLike]) -> None:
        """Images (sample grids, word-attention maps) as ``<stage>/<name>`` at ``step``; only a backend
        records them."""
        if self.backend is not None and images:
            self.backend.images(stage, step, {name: to_pixels(image) for name, image in images.items()})

    def close(self) -> None:
        """Flush and close the backend (a W&B run is finished); safe to call twice."""
        backend, self.backend = self.backend, None
        if backend is not None:
            backend.close()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _TensorBoard:
    def __init__(self, log_dir: Path, config: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))
        # A code block, so TensorBoard's markdown shows the JSON as written.
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```")

    def scalars(self, stage: str, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"{stage}/{name}", value, step)

    def images(self, stage: str, step: int, images: dict[str, np.ndarray]) -> None:
        for name, pixels in images.items():
            self.writer.add_image(f"{stage}/{name}", pixels, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, out_dir: Path, run_name: str | None, config: Mapping[str, Any]) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project="dmgan",
            dir=str(out_dir),
            name=run_name,
            config=dict(config),
            mode=os.environ.get("WANDB_MODE", "offline"),  # no account or network unless asked for
        )
        self.stages: set[str] = set()

    def _log(self, stage: str, step: int, row: dict[str, Any]) -> None:
        if stage not in self.stages:  # the stage's own x-axis (see the module's docstring)
            self.run.define_metric(f"{stage}/step")
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
            self.stages.add(stage)
        self.run.log({f"{stage}/step": step, **{f"{stage}/{k}": v for k, v in row.items()}})

    def scalars(self, stage: str, step: int, values: dict[str, float]) -> None:
        self._log(stage, step, values)

    def images(self, stage: str, step: int, images: dict[str, np.ndarray]) -> None:
        self._log(stage, step, {name: self.wandb.Image(pixels) for name, pixels in images.items()})

    def close(self) -> None:
        self.run.finish()
        # finish() leaves W&B's service process (wandb-core) running until the interpreter exits;
        # the run is over, so stop it now rather than leave it behind a long-lived process.
        teardown = getattr(self.wandb, "teardown", None)
        if teardown is not None:
            teardown()


def open_tracker(
    report_to: str,
    out_dir: Path,
    *,
    run_name: str | None = None,
    config: Mapping[str, Any] | None = None,
    enabled: bool = True,
) -> Tracker:
    """The tracker of a run writing into ``out_dir``: ``metrics.jsonl`` plus the ``report_to``
    backend (one of :data:`REPORT_TO`). Raises :class:`MissingBackendError` when the backend is not
    installed. With ``enabled=False`` (ranks other than 0) nothing is imported, created or written;
    only the name is checked (the command line runs :func:`check_report_to` on every rank, so all of
    them stop together on a missing package)."""
    if report_to not in REPORT_TO:
        raise ValueError(f"report_to must be one of {', '.join(REPORT_TO)}; got {report_to!r}")
    if not enabled:
        return Tracker(None)
    check_report_to(report_to)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    backend: _Backend | None = None
    if report_to == "tensorboard":
        backend = _TensorBoard(out_dir / "tensorboard", config or {})
    elif report_to == "wandb":
        backend = _Wandb(out_dir, run_name, config or {})
    return Tracker(out_dir / "metrics.jsonl", backend)
