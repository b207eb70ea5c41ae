"""A local web page for trying captions on a trained checkpoint.

    python -m dmgan.demo runs/shapes/checkpoints/latest.pt            # then open http://127.0.0.1:7860
    python -m dmgan.demo CHECKPOINT --device cuda --host 0.0.0.0 --port 8000
    python -m dmgan.demo OWNER/NAME                                   # an exported model on the Hugging Face Hub

The model is anything :meth:`dmgan.pipeline.TextToImage.load` takes (a checkpoint, an export folder,
a Hub repo id); one that cannot be loaded stops the demo at start with one line that names it.

Type a caption: the page shows each sample's stages side by side and, for the chosen sample, the
last memory stage's key-addressing map of every word (which regions read the word), with the
caption's unknown words listed. Example captions come from the checkpoint's test set. Made with
Gradio (``pip install -e ".[demo]"``); it runs offline: the page's assets are served from the
installed package, analytics are off, and no share link is made unless ``--share`` asks.
"""

from __future__ import annotations

import argparse
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported


from dmgan.cli import MODEL_HELP, HelpFormatter, add_shared_flags
from dmgan.pipeline import TextToImage
from dmgan.visualize import render_attention, render_stage_grid

MAX_SAMPLES = 8


def example_captions(pipe: TextToImage, count: int = 6) -> list[str]:
    """A few captions of the checkpoint's test set (none when its data folder is not here)."""
    from dmgan.data import dataset_for

    if pipe.data_dir is None or not Path(pipe.data_dir).is_dir():
        return []
    try:
        test = dataset_for(pipe.cfg, Path(pipe.data_dir), "test", train=False)
    except Exception:  # another layout or a partial folder: the page works without examples
        return []
    rng = random.Random(0)
    picks = rng.sample(range(len(test)), min(count, len(test)))
    return [pipe.vocab.decode(test.caption(i, rng, which=0)[0]) for i in picks]


class Demo:
    """What the page calls: the checkpoint's EMA and raw generators, each loaded on first use."""

    def __init__(self, checkpoint: str | os.PathLike, device: str, memory_backend: str = "auto") -> None:
        self.checkpoint, self.device, self.memory_backend = checkpoint, device, memory_backend
        self.pipelines: dict[str, TextToImage] = {}
        self.pipeline("ema")  # fails early on a bad file

    def pipeline(self, weights: str) -> TextToImage:
        if weights not in self.pipelines:
            self.pipelines[weights] = TextToImage.load(
                self.checkpoint, self.device, weights, self.memory_backend
            )
        return self.pipelines[weights]

    def generate(
        self, caption: str, samples: float, seed: float, truncation: float, weights: str, chosen: float
    ) -> tuple[Any, Any, str]:
        """(a row per sample with its stages side by side, the chosen sample's word maps, a note).
        Bad input raises ``gr.Error`` with what is wrong; the server goes on serving."""
        import gradio as gr

        pipe = self.pipeline("raw" if weights.lower().startswith("raw") else "ema")
        caption, samples, chosen = caption.strip(), int(samples), int(chosen)
        if not caption:
            raise gr.Error("The caption is empty: type a sentence, e.g. one of the examples.")
        if not 1 <= samples <= MAX_SAMPLES:
            raise gr.Error(f"Samples must lie between 1 and {MAX_SAMPLES}, got {samples}.")
        try:
            captions = pipe.tokenize([caption] * samples)
        except ValueError as e:  # no known word
            raise gr.Error(f"{e}. Try words from the examples.") from None
        stages, attention = pipe.generate(
            captions, seed=int(seed), truncation=truncation or None, return_attention=True
        )
        rows = render_stage_grid(stages, [f"sample {n + 1}" for n in range(samples)], text_width=80)
        n = min(max(chosen, 1), samples) - 1
        words = [pipe.vocab.ixtoword[int(i)] for i in captions.indices[n, : captions.lengths[n]]]
        maps = render_attention([s[n] for s in stages], attention[-1][n], words, caption)
        unknown = captions.unknown[0]
        note = f"Words the model knows: {' '.join(words)}."
        if unknown:
            note += f" Unknown words, left out: **{', '.join(unknown)}**."
        return rows, maps, note


def build(demo: Demo, examples: Sequence[str] = ()) -> Any:
    """The page: a caption box and settings, the samples' stages and the chosen one's word maps."""
    import gradio as gr

    with gr.Blocks(title="dmgan: DM-GAN text-to-image", analytics_enabled=False) as page:
        gr.Markdown(
            f"## DM-GAN text-to-image\n`{demo.checkpoint}` ({demo.pipelines['ema'].cfg.name} preset): "
            "each sample's stages, then how the last memory stage read each word."
        )
        with gr.Row():
            with gr.Column(scale=1):
                caption = gr.Textbox(
                    label="Caption", lines=2, placeholder="a large red circle in the top left"
                )
                samples = gr.Slider(1, MAX_SAMPLES, value=4, step=1, label="Samples")
                seed = gr.Number(value=0, precision=0, label="Seed")
                truncation = gr.Slider(0, 3, value=0, step=0.1, label="Truncation (0: none)")
                weights = gr.Radio(["EMA", "raw"], value="EMA", label="Generator weights")
                chosen = gr.Slider(1, MAX_SAMPLES, value=1, step=1, label="Word maps of sample")
                button = gr.Button("Generate", variant="primary")
                if examples:
                    gr.Examples([[e] for e in examples], inputs=[caption], label="Captions of the test set")
            with gr.Column(scale=2):
                samples_image = gr.Image(
                    label="Samples (rows): the stages side by side",
                    type="pil",
                    format="png",
                    elem_id="dmgan-samples",
                )
                maps = gr.Image(
                    label="Key addressing of each word (last memory stage)",
                    type="pil",
                    format="png",
                    elem_id="dmgan-word-maps",
                )
                note = gr.Markdown(elem_id="dmgan-note")
        inputs = [caption, samples, seed, truncation, weights, chosen]
        outputs = [samples_image, maps, note]
        button.click(demo.generate, inputs, outputs, api_name="generate")
        caption.submit(demo.generate, inputs, outputs)
    return page


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("checkpoint", help=MODEL_HELP)
    add_shared_flags(p, "device", "memory-backend")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument(
        "--share", action="store_true", help="ask Gradio for a public share link (needs the internet)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SystemExit('dmgan.demo needs Gradio: pip install -e ".[demo]"') from None
    try:
        demo = Demo(args.checkpoint, args.device, args.memory_backend)
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # RuntimeError: a backend not available here
        raise SystemExit(f"dmgan.demo: {e}") from None
    page = build(demo, example_captions(demo.pipelines["ema"]))
    page.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True)


if __name__ == "__main__":
    main()
