"""The model card of an exported model: ``README.md`` beside ``model.safetensors``, as the Hugging
Face Hub shows it on a model's page.

It opens with the Hub's YAML metadata (license, library, pipeline tag, tags, the training data's
Hub dataset ids where known), then says what the model is and how to load it, what it was trained
on, which weights these are, its evaluation figures with the protocol they follow, its full
configuration (collapsed), the license and the citation of the DM-GAN paper (CITATION.cff).

Evaluation figures come from what sits beside the checkpoint: ``evaluation.json`` as
``dmgan.evaluate`` writes it (taken only when it scored these very weights: the same file, by its
SHA-256, and the same EMA or raw choice), else the ``metrics.json`` a training run writes at its
end (taken only when the checkpoint is that run's ``latest.pt`` and the weights its EMA ones). Local paths are not published:
the data folder appears by its name only.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# What each preset is trained on, in words (its data folder's name adds the rest).
PRESET_DATA = {
    "bird": "CUB-200-2011 (Caltech-UCSD Birds, 200 species) with the ten captions per image of "
    "Reed et al. (2016), in the AttnGAN layout",
    "coco": "MS-COCO 2014 (train2014 for training, val2014 for testing) with its five captions per "
    "image, in the AttnGAN layout",
    "shapes": "dmgan's built-in shapes data (procedurally drawn coloured shapes on plain "
    "backgrounds, captioned by their colour, shape, size, position and background"
    "; `python train.py` draws it)",
}
# A caption in each preset's words, for the examples.
PRESET_CAPTIONS = {
    "bird": "this bird has a red crown, black wings and a short pointed beak",
    "coco": "a man riding a wave on top of a surfboard",
    "shapes": "a large red circle in the top left",
}
CITATION = """@inproceedings{zhu2019dmgan,
  title     = {{DM-GAN}: Dynamic Memory Generative Adversarial Networks for Text-to-Image Synthesis},
  author    = {Zhu, Minfeng and Pan, Pingbo and Chen, Wei and Yang, Yi},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages     = {5802--5810},
  year      = {2019}
}"""
SKIPPED_FIGURES = frozenset({"seconds", "image_size", "num_images", "total_seconds"})


@dataclass
class Evaluation:
    """Figures of a model and where they come from (a sentence for the card)."""

    metrics: dict[str, Any]
    origin: str


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_evaluation(source: Path, weights: str) -> tuple[Evaluation | None, list[str]]:
    """The evaluation of the model at ``source`` (a checkpoint file or export folder) with these
    ``weights``, and notes on reports found but passed over (stale or of the other weights)."""
    notes: list[str] = []
    report_file = source.with_name("evaluation.json")
    if report_file.is_file():
        try:
            report = json.loads(report_file.read_text())
        except (OSError, ValueError) as e:
            report = None
            notes.append(f"{report_file}: not readable JSON ({e}); left out")
        if isinstance(report, dict) and isinstance(report.get("metrics"), dict):
            stored_sha = report.get("checkpoint_sha256")
            used = (report.get("settings") or {}).get("weights", "ema")
            if stored_sha and source.is_file() and stored_sha != file_sha256(source):
                notes.append(
                    f"{report_file} scored another file than {source} (its SHA-256 differs); left out"
                )
            elif used != weights:
                notes.append(f"{report_file} scored the {used} weights, not the {weights} ones; left out")
            else:
                return Evaluation(
                    report["metrics"], f"`python -m dmgan.evaluate` ({report_file.name})"
                ), notes
    run = source.parent.parent if source.parent.name == "checkpoints" else None
    if run is not None and (run / "metrics.json").is_file():
        latest = run / "checkpoints" / "latest.pt"
        if weights != "ema":  # the run scores its EMA generator (TrainingState.pipeline)
            notes.append(f"{run / 'metrics.json'} scored the ema weights, not the {weights} ones; left out")
        elif latest.is_file() and os.path.samefile(source, latest):
            try:
                metrics = json.loads((run / "metrics.json").read_text())
                return Evaluation(metrics, "the training run's closing evaluation (metrics.json)"), notes
            except (OSError, ValueError) as e:
                notes.append(f"{run / 'metrics.json'}: not readable JSON ({e}); left out")
        else:
            notes.append(f"{run / 'metrics.json'} is of the run's latest.pt, not {source.name}; left out")
    return None, notes


def _number(value: float) -> str:
    return f"{value:.4g}"


def figure_rows(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """(figure, value) rows of an evaluation: plain numbers, means with their spread, accuracies
    with their chance level, and dictionaries of numbers by their keys; timings and settings are
    left out, and so are figures not computed (strings)."""
    rows = []
    for key, value in metrics.items():
        name = key.replace("_", " ")
        if key in SKIPPED_FIGURES or key.endswith("_seconds") or isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            rows.append((name, _number(value)))
        elif isinstance(value, dict) and isinstance(value.get("mean"), int | float):
            spread = f" ± {_number(value['std'])}" if isinstance(value.get("std"), int | float) else ""
            rows.append((name, _number(value["mean"]) + spread))
        elif isinstance(value, dict) and key != "protocol":
            for part, inner in value.items():
                if isinstance(inner, dict) and isinstance(inner.get("accuracy"), int | float):
                    chance = inner.get("chance")
                    suffix = f" (chance {_number(chance)})" if isinstance(chance, int | float) else ""
                    rows.append((f"{name}: {part}", _number(inner["accuracy"]) + suffix))
                elif isinstance(inner, int | float) and not isinstance(inner, bool):
                    rows.append((f"{name}: {part}", _number(inner)))
    return rows


def protocol_lines(metrics: dict[str, Any]) -> list[str]:
    """How the figures were measured: the image metrics' protocol (by today's name when the JSON
    is older than a rename) and each figure's own note."""
    from dmgan.evaluate import RENAMED_PROTOCOLS

    lines = []
    protocol = metrics.get("protocol")
    if isinstance(protocol, dict):
        what = ", ".join(
            f"{k.replace('_', ' ')} {protocol[k]}"
            for k in ("network", "num_images", "split")
            if protocol.get(k)
        )
        name = protocol.get("name", "?")
        shown = f"`{name}`"
        if name in RENAMED_PROTOCOLS:
            shown = f"`{RENAMED_PROTOCOLS[name]}` (recorded under its old name `{name}`)"
        lines.append(f"- Protocol {shown}" + (f" ({what})" if what else ""))
        for key in ("captions", "resize", "comparable_to"):
            if protocol.get(key):
                lines.append(f"  - {key.replace('_', ' ')}: {protocol[key]}")
    for key, value in metrics.items():
        if isinstance(value, dict) and isinstance(value.get("protocol"), str):
            lines.append(f"- {key.replace('_', ' ')}: {value['protocol']}")
        elif isinstance(value, str) and "not computed" in value:
            lines.append(f"- {key.replace('_', ' ')}: {value}")
    if isinstance(metrics.get("num_images"), int):
        lines.append(f"- {metrics['num_images']} generated images")
    return lines


def _yaml_list(key: str, items: list[str]) -> list[str]:
    # JSON strings are YAML strings: any id or tag is quoted safely.
    return [f"{key}:", *(f"- {json.dumps(item)}" for item in items)] if items else []


def model_card(
    state: dict[str, Any],
    source: Path,
    weights: str,
    name: str,
    datasets: list[str] | None = None,
    evaluation: Evaluation | None = None,
) -> str:
    """The README.md of an export of ``state`` (the model dictionary read from ``source``):
    ``name`` is how to load it (a Hub repo id or a folder), ``datasets`` the Hub ids of its
    training data where known."""
    config = state["config"]
    preset = config.get("name", "?")
    model = config.get("model", {})
    sizes = [model.get("base_size", 0) * 2**i for i in range(model.get("branch_num", 0))]
    caption = PRESET_CAPTIONS.get(preset, "a caption in the words of the training data")
    header = [
        "---",
        "license: mit",
        "library_name: dmgan",
        "pipeline_tag: text-to-image",
        *_yaml_list("tags", ["text-to-image", "dm-gan", "gan"]),
        *_yaml_list("datasets", list(datasets or [])),
        "---",
    ]
    body = [
        f"# DM-GAN text-to-image model ({preset})",
        "",
        "A [DM-GAN](https://arxiv.org/abs/1904.01310) generator (Zhu, Pan, Chen and Yang, CVPR 2019) "
        f"trained with dmgan: it draws a {sizes[-1] if sizes else '?'}-pixel image from a caption in "
        f"{len(sizes)} stages ({', '.join(f'{s}x{s}' for s in sizes)}), each refinement stage reading "
        "the caption's words through a dynamic memory. With it come the DAMSM text and image encoders "
        f"it was trained with and its vocabulary of {len(state['vocab'])} words; words outside it are "
        "left out of a caption.",
        "",
        "## How to use",
        "",
        'With dmgan installed (`pip install -e ".[hub]"` in its checkout: the `hub` extra loads repo ids):',
        "",
        "```python",
        "from dmgan import TextToImage",
        "",
        f'pipe = TextToImage.from_pretrained("{name}")',
        f'images = pipe("{caption}", num_images=4, seed=0)  # PIL images',
        'images[0].save("sample.png")',
        "```",
        "",
        "or from the command line, an image per seed with each stage and the memory's map of every word:",
        "",
        "```bash",
        f'python -m dmgan.sample {name} "{caption}" --seeds 0-3',
        f"python -m dmgan.demo {name}   # a local web page",
        "```",
        "",
        "## Training data",
        "",
        f"Preset `{preset}`, trained on {PRESET_DATA.get(preset, 'captioned images in the AttnGAN layout')}.",
    ]
    if state.get("data_dir"):
        body.append(f"Data folder: `{Path(state['data_dir']).name}`.")
    if isinstance(state.get("step"), int):
        body.append(f"Trained for {state['step']} generator steps.")
    environment = state.get("environment") or {}
    if environment.get("dmgan"):
        git = environment.get("git") or {}
        commit = git.get("commit")
        where = (
            f" (commit {commit[:7]}{', with uncommitted changes' if git.get('dirty') else ''})"
            if commit
            else ""
        )
        body.append(
            f"Trained with dmgan {environment['dmgan']}{where} and torch {environment.get('torch', '?')}."
        )
    what = (
        "the generator's exponential moving average, what DM-GAN samples with"
        if weights == "ema"
        else "the generator's raw weights (not its moving average)"
    )
    body += [
        "",
        "## Weights",
        "",
        f"`model.safetensors` holds {what}, and the two encoders; `config.json` the configuration, "
        "`vocab.json` the words by index. No pickle: loading runs no code from the files.",
        "",
        "## Evaluation",
        "",
    ]
    rows = figure_rows(evaluation.metrics) if evaluation else []
    if evaluation and rows:
        body += [f"From {evaluation.origin}.", "", "| figure | value |", "|---|---|"]
        body += [f"| {figure} | {value} |" for figure, value in rows]
        body += ["", *protocol_lines(evaluation.metrics)]
    else:
        body.append(
            f"Not evaluated yet: `python -m dmgan.evaluate {name}` scores it (FID, KID, precision and "
            "recall, R-precision, IS with a classifier)."
        )
    body += [
        "",
        "## Configuration",
        "",
        "<details>",
        "<summary>The preset and every setting of the networks, the captions and the training</summary>",
        "",
        "```json",
        json.dumps(config, indent=2),
        "```",
        "",
        "</details>",
        "",
        "## License",
        "",
        "MIT, as dmgan. The training images and captions keep their own terms.",
        "",
        "## Citation",
        "",
        "If you use this model, please cite the DM-GAN paper:",
        "",
        "```bibtex",
        CITATION,
        "```",
    ]
    return "\n".join([*header, "", *body]) + "\n"
