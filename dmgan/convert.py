"""Bring the reference's released models into dmgan, and share a dmgan model without pickles.

    python -m dmgan.convert reference --preset bird --netG netG_epoch_600.pth \\
        --text-encoder text_encoder200.pth --image-encoder image_encoder200.pth \\
        --captions data/birds/captions.pickle --data-dir data/birds --out bird_dmgan.pt
    python -m dmgan.convert export runs/shapes/checkpoints/latest.pt shapes_model/
    python -m dmgan.convert export runs/shapes/checkpoints/latest.pt shapes_model/ --push-to-hub OWNER/NAME

``reference`` writes one self-contained dmgan checkpoint (the preset's configuration with the
reference's padding mask, ``legacy_mask=True``, the generator, the DAMSM encoders and the
vocabulary) that ``dmgan.sample``, ``dmgan.evaluate`` and ``dmgan.demo`` take. It reads files saved
by the reference's PyTorch 0.4 / Python 2 code: protocol-2 pickles, ``module.`` prefixes left by
DataParallel, batch norms without ``num_batches_tracked``. A file that is not what it claims (another
network, another vocabulary size, a discriminator in place of the generator) is refused with an
error that names the file, what was expected and what was found.

``export`` writes a trained run as a sampling-only model in the format weights are shared in: a
folder of ``model.safetensors`` (the EMA generator and the encoders), ``config.json`` and
``vocab.json``, which the same commands load, and its model card ``README.md``
(:mod:`dmgan.model_card`: the Hub's metadata, training data, configuration, evaluation, license,
citation, how to load it). ``--push-to-hub OWNER/NAME`` then uploads the folder to that Hugging
Face Hub repo (made when missing; a token from ``hf auth login`` or ``HF_TOKEN``), from where
``TextToImage.from_pretrained("OWNER/NAME")`` and every command load it.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dmgan import checkpoint
from dmgan.cli import MODEL_HELP, HelpFormatter, add_shared_flags
from dmgan.config import PRESETS, get_preset, override
from dmgan.data import Vocabulary
from dmgan.model_card import find_evaluation, model_card
from dmgan.models import G_NET, build_discriminators, build_image_encoder, build_text_encoder
from dmgan.pipeline import TextToImage, fetch_model


class _PlainData(pickle.Unpickler):
    """Unpickles lists, dicts, strings and numbers only: a captions file needs nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a captions file holds plain data only"
        )


def read_vocabulary(path: str | Path) -> Vocabulary:
    """The words of a reference ``captions.pickle`` ([train captions, test captions, ixtoword,
    wordtoix], protocol 2), by index."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path}")
    try:
        data = _PlainData(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except Exception as e:
        raise ValueError(f"{path}: not a captions.pickle ({type(e).__name__}: {e})") from None
    if not (isinstance(data, list | tuple) and len(data) == 4 and isinstance(data[2], dict)):
        raise ValueError(
            f"{path}: expected [train_captions, test_captions, ixtoword, wordtoix], found {type(data).__name__}"
        )
    ixtoword = {int(k): v for k, v in data[2].items()}
    if sorted(ixtoword) != list(range(len(ixtoword))):
        raise ValueError(f"{path}: ixtoword does not map 0..{len(ixtoword) - 1} to words")
    return Vocabulary(ixtoword, {word: i for i, word in ixtoword.items()})


def read_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A state dict as the reference saved it, with DataParallel's ``module.`` prefixes removed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # legacy format and protocol 2 too
    except Exception as e:
        raise ValueError(
            f"{path}: not a PyTorch state dict ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"{path}: expected the state dict of the {what}, found a {type(state).__name__} of other things"
        )
    return {k.removeprefix("module."): v for k, v in state.items()}


def convert_reference(
    preset: str,
    netG: str | Path,
    text_encoder: str | Path,
    image_encoder: str | Path,
    captions: str | Path,
    out: str | Path,
    data_dir: str | Path | None = None,
) -> Path:
    """One dmgan checkpoint from the reference's released files (see the module docstring)."""
    cfg = override(get_preset(preset), **{"model.legacy_mask": True})
    vocab = read_vocabulary(captions)
    generator = G_NET(cfg.model)
    g_state = read_state_dict(netG, "generator (netG)")
    d_keys = {k for d in build_discriminators(cfg.model) for k in d.state_dict()}
    hint = " - it looks like a discriminator (netD), not a generator" if g_state.keys() <= d_keys else ""
    checkpoint.load_state_checked(generator, g_state, netG, f"DM-GAN generator of the {preset} preset", hint)
    text = build_text_encoder(cfg.model, len(vocab))
    t_state = read_state_dict(text_encoder, "DAMSM text encoder")
    rows = t_state.get("encoder.weight")
    if rows is not None and rows.shape[0] != len(vocab):
        raise ValueError(
            f"{text_encoder}: the text encoder was trained with {rows.shape[0]} words, "
            f"{captions} has {len(vocab)}: they are not from the same dataset"
        )
    checkpoint.load_state_checked(text, t_state, text_encoder, f"DAMSM text encoder of the {preset} preset")
    image = build_image_encoder(cfg.model.image_encoder, cfg.model.embedding_dim)
    checkpoint.load_state_checked(
        image,
        read_state_dict(image_encoder, "DAMSM image encoder"),
        image_encoder,
        f"DAMSM image encoder of the {preset} preset",
    )
    state = {
        "config": dataclasses.asdict(cfg),
        "gan": {"netG": generator.state_dict()},  # the released G holds the averaged weights
        "text_encoder": text.state_dict(),
        "image_encoder": image.state_dict(),
        "vocab": vocab.as_list(),
        "converted_from": {
            "netG": str(netG),
            "text_encoder": str(text_encoder),
            "image_encoder": str(image_encoder),
            "captions": str(captions),
        },
    }
    if data_dir is not None:
        state["data_dir"] = str(Path(data_dir).resolve())
    return checkpoint.save(state, out)


def export(
    source: str | Path,
    folder: str | Path,
    weights: str = "ema",
    repo_id: str | None = None,
    datasets: list[str] | None = None,
) -> Path:
    """A trained run (or any model dmgan loads) as model.safetensors + config.json + vocab.json,
    and its model card README.md; ``repo_id``: the Hub repo it is meant for (the card loads it
    from there), ``datasets``: Hub ids of its training data, for the card's metadata."""
    state, local = fetch_model(source)
    model = TextToImage.from_state(state, "cpu", weights, source=str(source)).model_state()
    written = checkpoint.write_export(model, folder, weights)
    evaluation, notes = find_evaluation(local, weights)
    for note in notes:
        print(f"model card: {note}")
    card = model_card(state, local, weights, repo_id or str(folder), datasets, evaluation)
    (written / "README.md").write_text(card)
    return written


def push_to_hub(folder: str | Path, repo_id: str, source: str | Path) -> str:
    """Upload an export folder (its model files and card only) to Hub repo ``repo_id``, making the
    repo when missing; returns the commit's URL. Raises RuntimeError with one line on failure."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise RuntimeError('--push-to-hub needs huggingface_hub: pip install -e ".[hub]"') from None
    api = HfApi(library_name="dmgan")
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            allow_patterns=[*checkpoint.EXPORT_FILES, "README.md"],  # nothing else the folder holds
            commit_message=f"dmgan export of {Path(source).name}",
        )
    except Exception as e:  # the client's errors: no network, no token, no permission, ...
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise RuntimeError(
            f"pushing {folder} to the Hugging Face Hub repo {repo_id} failed ({type(e).__name__}: {message}); "
            "the folder is written: push it again once that is fixed"
        ) from None
    return str(getattr(commit, "commit_url", commit))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    ref = sub.add_parser("reference", help="the reference's released files -> one dmgan checkpoint")
    ref.add_argument(
        "--preset", required=True, choices=sorted(PRESETS), help="the model the files are (bird, coco)"
    )
    ref.add_argument("--netG", required=True, help="netG_epoch_*.pth")
    ref.add_argument("--text-encoder", required=True, help="text_encoder*.pth (DAMSM)")
    ref.add_argument("--image-encoder", required=True, help="image_encoder*.pth (DAMSM)")
    ref.add_argument("--captions", required=True, help="the dataset's captions.pickle (its vocabulary)")
    ref.add_argument("--data-dir", default=None, help="the dataset folder, for evaluation and examples")
    ref.add_argument("--out", required=True, help="the dmgan checkpoint to write")
    exp = sub.add_parser(
        "export", help="a dmgan checkpoint -> safetensors + config.json + vocab.json + README.md (model card)"
    )
    exp.add_argument("checkpoint", help=MODEL_HELP)
    exp.add_argument("folder", help="the folder to write")
    add_shared_flags(exp, "weights")
    exp.add_argument(
        "--push-to-hub", metavar="OWNER/NAME", default=None, help="then upload the folder to this Hub repo"
    )
    exp.add_argument(
        "--dataset",
        action="append",
        default=[],
        help="the Hub id of a dataset it was trained on, for the card's metadata (repeatable)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "reference":
            written = convert_reference(
                args.preset,
                args.netG,
                args.text_encoder,
                args.image_encoder,
                args.captions,
                args.out,
                args.data_dir,
            )
        else:
            written = export(args.checkpoint, args.folder, args.weights, args.push_to_hub, args.dataset)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"dmgan.convert: {e}") from None
    print(f"wrote {written}")
    if args.command == "export" and args.push_to_hub:
        try:
            url = push_to_hub(written, args.push_to_hub, args.checkpoint)
        except RuntimeError as e:
            raise SystemExit(f"dmgan.convert: {e}") from None
        print(f"pushed {written} to {args.push_to_hub}: {url}")
    return written


if __name__ == "__main__":
    main()
