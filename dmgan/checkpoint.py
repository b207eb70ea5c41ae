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

Reading classifies what is wrong with a file in one place: a missing file raises
``FileNotFoundError``; an empty, cut-off or damaged file, a file of other content (text, a
safetensors file, a pickle of Python objects, a state dict of one network) and a broken export
raise ``ValueError``, each with one line that names the file and the problem (the command lines
print it as it is). A config of another dmgan version is the pipeline's to judge (it knows the
config's fields).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import string
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
    """A file ``torch.save`` wrote, read weights-only; a file that is missing raises
    ``FileNotFoundError``, one that cannot be read ``ValueError`` saying why (:func:`unreadable`)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except OSError as e:  # permissions, I/O errors: nothing about the content
        raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, struct.error, ...
        raise ValueError(unreadable(path, e)) from None


ZIP_START, ZIP_END = b"PK\x03\x04", b"PK\x05\x06"  # torch.save's archive: a zip file
ZIP_END_SPAN = 22 + 65_535  # the end record and the longest comment after it


SAFETENSORS_FILE = (
    "{path}: a safetensors file: pass the exported model's folder (with config.json and vocab.json)"
)


def is_safetensors(path: Path) -> bool:
    """Whether ``path`` starts as a safetensors file does: its header's length, then its JSON."""
    with open(path, "rb") as f:
        head = f.read(9)
    return (
        len(head) == 9 and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size and head[8:] == b"{"
    )


def unreadable(path: Path, error: Exception) -> str:
    """One line on why ``torch.load`` failed on ``path``: cut off, damaged or another kind of file
    (read from its first and last bytes: torch's own messages are long and name none of this)."""
    size = path.stat().st_size
    if size == 0:
        return f"{path}: the file is empty (0 bytes): an interrupted copy or download?"
    with open(path, "rb") as f:
        head = f.read(64)
        f.seek(max(0, size - ZIP_END_SPAN))
        tail = f.read()
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, pickle.UnpicklingError) and "weights only" in str(error).lower():
        return (
            f"{path}: not a dmgan checkpoint: it holds Python objects, not only tensors and plain data "
            "(dmgan reads checkpoints weights-only and runs no code from a file)"
        )
    if head.startswith(ZIP_START):
        if ZIP_END not in tail:
            return f"{path}: the file is cut off ({size} bytes, the end of its archive is missing): an interrupted copy or download?"
        return f"{path}: a damaged PyTorch file ({first_line})"
    if head.startswith(b"\x80"):  # a pickle: the legacy torch.save format, or another program's
        return (
            f"{path}: a cut-off or damaged legacy PyTorch file, or a pickle of something else ({first_line})"
        )
    if is_safetensors(path):
        return SAFETENSORS_FILE.format(path=path)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if text and all(c in string.printable for c in text):
        return f"{path}: not a PyTorch checkpoint but text (it begins {text.splitlines()[0][:40]!r})"
    return f"{path}: not a PyTorch checkpoint (it begins {head[:12]!r})"


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
    if os.path.isfile(path) and is_safetensors(Path(path)):  # torch.load reads these too, as a flat dict
        raise ValueError(SAFETENSORS_FILE.format(path=path))
    state = read_export(path) if os.path.isdir(path) else load(path)
    if not isinstance(state, dict):
        raise ValueError(
            f"{path} is not a dmgan model or training checkpoint: it holds a {type(state).__name__}, "
            "not a dictionary"
        )
    missing = MODEL_KEYS - state.keys()
    if missing:
        hint = ""
        if state and all(isinstance(v, torch.Tensor) for v in state.values()):
            hint = (
                f": it is the state dict of one network ({len(state)} tensors); "
                "the reference's released files become a dmgan model with python -m dmgan.convert reference"
            )
        raise ValueError(
            f"{path} is not a dmgan model or training checkpoint (missing {sorted(missing)}){hint}"
        )
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
    try:
        info = json.loads((folder / "config.json").read_text())
        vocab = json.loads((folder / "vocab.json").read_text())
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{folder}: config.json or vocab.json is not valid JSON ({e})") from None
    if not (isinstance(info, dict) and isinstance(info.get("config"), dict) and isinstance(vocab, list)):
        raise ValueError(
            f"{folder} is not an exported dmgan model: its config.json holds no dmgan config, "
            "or its vocab.json no list of words"
        )
    try:
        tensors = load_file(str(folder / SAFETENSORS))
    except Exception as e:  # safetensors raises its own SafetensorError for cut-off or foreign files
        raise ValueError(f"{folder / SAFETENSORS}: cut off or not a safetensors file ({e})") from None
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in EXPORTED_PARTS}
    for key, value in tensors.items():
        name, _, rest = key.partition(".")
        if name not in parts:
            raise ValueError(f"{folder / SAFETENSORS}: tensor {key!r} belongs to no part of a dmgan model")
        parts[name][rest] = value
    model = {
        "config": info["config"],
        "gan": {"netG": parts["netG"]},
        "text_encoder": parts["text_encoder"],
        "image_encoder": parts["image_encoder"],
        "vocab": vocab,
    }
    if "data_dir" in info:
        model["data_dir"] = info["data_dir"]
    return model
