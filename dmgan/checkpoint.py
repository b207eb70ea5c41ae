"""The on-disk formats: atomic checkpoints, and exported models.

``save`` writes to a temporary file in the same folder, flushes it to disk and renames it over the
target (``os.replace`` is atomic on POSIX), so a crash mid-write never leaves a broken or missing
checkpoint; ``load`` reads with ``weights_only=True``, so a checkpoint can hold tensors, numbers,
strings and containers of them, never arbitrary objects.

A *model* is the dictionary that sampling needs, whether a training checkpoint, a converted
reference model or an export holds it (:data:`MODEL_KEYS`)::

    {"config": asdict(Config), "gan": {"netG": ..., "ema": ... (training checkpoints only)},
     "text_encoder": ..., "image_encoder": ..., "vocab": [word of index 0, 1, ...],
     "data_dir": "..." (where known)}

A training checkpoint adds the discriminators, optimizers, RNG states and the loop's position
(:func:`dmgan.trainer.save_training_checkpoint`). An export is a folder of ``model.safetensors``
(every tensor, named ``<part>.<key>``), ``config.json`` and ``vocab.json``: the format weights are
shared in, with no pickle anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

MODEL_KEYS = frozenset({"config", "gan", "text_encoder", "image_encoder", "vocab"})
SAFETENSORS = "model.safetensors"
EXPORT_FILES = (SAFETENSORS, "config.json", "vocab.json")
EXPORTED_PARTS = ("netG", "text_encoder", "image_encoder")


def save(state: dict[str, Any], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def link_atomically(target: str | os.PathLike, link: str | os.PathLike) -> None:
    """Make ``link`` another name of ``target``'s file (a hard link: the bytes are written once),
    swapped in atomically, so a crash leaves the old ``link`` or the new one. A copy where the
    file system has no hard links."""
    link = Path(link)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(target, tmp)
    except OSError:
        shutil.copyfile(target, tmp)
    os.replace(tmp, link)


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


def load_state_checked(
    module: torch.nn.Module,
    state: dict[str, torch.Tensor],
    source: str | os.PathLike,
    what: str,
    hint: str = "",
) -> None:
    """Load ``state`` into ``module``, or say which keys or shapes do not fit (naming ``source``
    and ``what`` it was expected to hold). Batch norms' ``num_batches_tracked`` may be missing
    (files of PyTorch 0.4 have none); they start fresh."""
    expected = module.state_dict()
    wanted = {k for k in expected if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(wanted - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"{source}: expected the {what}; {len(missing)} of its keys are missing (e.g. {missing[:3]}) and "
            f"{len(unexpected)} keys are not its (e.g. {unexpected[:3]}){hint}"
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ValueError(
                f"{source}: expected the {what}, but {key} has shape {tuple(value.shape)}, "
                f"not {tuple(expected[key].shape)}"
            )
    module.load_state_dict(state, strict=False)


def all_finite(state_dict: dict[str, Any]) -> bool:
    """True when every floating-point tensor of a (nested) state dict is finite."""
    stack: list[Any] = [state_dict]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            if item.is_floating_point() and not torch.isfinite(item).all():
                return False
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return True


def read_model(path: str | os.PathLike) -> dict[str, Any]:
    """The model a training checkpoint, a converted reference model (both files) or an export
    (a folder) holds, checked to have every part of :data:`MODEL_KEYS`."""
    state = read_export(path) if os.path.isdir(path) else load(path)
    missing = MODEL_KEYS - state.keys()
    if missing:
        raise ValueError(f"{path} is not a dmgan model or training checkpoint (missing {sorted(missing)})")
    return state


def write_export(model: dict[str, Any], folder: str | os.PathLike, weights: str) -> Path:
    """Write ``model`` (one generator: ``model["gan"]`` has no "ema") as an export folder;
    ``weights`` ("ema" or "raw") records which of the training run's weights it is."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parts = {
        "netG": model["gan"]["netG"],
        "text_encoder": model["text_encoder"],
        "image_encoder": model["image_encoder"],
    }
    tensors = {
        f"{name}.{key}": value.contiguous() for name, state in parts.items() for key, value in state.items()
    }
    save_file(tensors, str(folder / SAFETENSORS))
    info = {"format": "dmgan sampling model", "weights": weights, "config": model["config"]}
    if model.get("data_dir") is not None:
        info["data_dir"] = model["data_dir"]
    (folder / "config.json").write_text(json.dumps(info, indent=2) + "\n")
    (folder / "vocab.json").write_text(json.dumps(list(model["vocab"])) + "\n")
    return folder


def read_export(folder: str | os.PathLike) -> dict[str, Any]:
    """An export folder as the model dictionary (see the module docstring)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in EXPORT_FILES:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not an exported dmgan model: {name} is missing")
    info = json.loads((folder / "config.json").read_text())
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in EXPORTED_PARTS}
    for key, value in load_file(str(folder / SAFETENSORS)).items():
        name, _, rest = key.partition(".")
        if name not in parts:
            raise ValueError(f"{folder / SAFETENSORS}: tensor {key!r} belongs to no part of a dmgan model")
        parts[name][rest] = value
    model = {
        "config": info["config"],
        "gan": {"netG": parts["netG"]},
        "text_encoder": parts["text_encoder"],
        "image_encoder": parts["image_encoder"],
        "vocab": json.loads((folder / "vocab.json").read_text()),
    }
    if "data_dir" in info:
        model["data_dir"] = info["data_dir"]
    return model
