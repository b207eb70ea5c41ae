"""The demo page, served on a free local port and called through gradio_client as a user's
browser would: images back for a caption, clear messages for bad input, and still serving."""

from __future__ import annotations

import socket

import numpy as np
import pytest
from PIL import Image

gradio = pytest.importorskip("gradio", reason="the demo needs the [demo] extra")
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from dmgan.demo import Demo, build, example_captions  # noqa: E402
from dmgan.demo import main as demo_main  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def client(trained):
    demo = Demo(trained, "cpu")
    page = build(demo, example_captions(demo.pipelines["ema"]))
    port = _free_port()
    page.launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, show_error=True, quiet=True
    )
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        page.close()


def _generate(client, caption, samples=3, seed=0, truncation=0.0, weights="EMA", chosen=2):
    return client.predict(caption, samples, seed, truncation, weights, chosen, api_name="/generate")


def test_a_caption_gives_a_sample_per_request_with_its_stages_and_word_maps(client):
    rows, maps, note = _generate(client, "a large red circle on a zebra background")
    image = np.asarray(Image.open(rows).convert("RGB"))
    assert image.shape[0] >= 3 * 128 and image.shape[1] >= 3 * 128  # three samples, three stages each
    samples = [image[4 + k * 132 : 4 + k * 132 + 128, : 3 * 128] for k in range(3)]  # rows of 128 + 4 padding
    assert all(s.std() > 1 for s in samples)  # not constant
    assert not np.array_equal(samples[0], samples[1])  # samples differ
    word_maps = Image.open(maps)
    assert word_maps.size[1] > 2 * 128  # the stages, then a tile per word
    assert "zebra" in note and "Unknown words" in note
    raw = Image.open(_generate(client, "a large red circle", samples=1, weights="raw")[0])
    assert raw.size[1] < 2 * 128  # one row


def test_bad_input_gets_a_message_and_the_server_serves_the_next_request(client):
    with pytest.raises(AppError, match="The caption is empty"):
        _generate(client, "   ")
    with pytest.raises(AppError, match="has no word of the vocabulary"):
        _generate(client, "zebra giraffe")
    assert Image.open(_generate(client, "a small blue square", samples=2)[0]).size[1] >= 2 * 128


def test_the_examples_are_captions_of_the_checkpoints_test_set(trained):
    examples = example_captions(Demo(trained, "cpu").pipelines["ema"])
    assert examples and all(isinstance(e, str) and e.strip() for e in examples)


def test_a_missing_or_foreign_checkpoint_is_refused_at_start(tmp_path):
    with pytest.raises(SystemExit, match="checkpoint not found"):
        demo_main([str(tmp_path / "missing.pt")])
    import torch

    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(SystemExit, match="is not a dmgan model or training checkpoint"):
        demo_main([str(foreign)])
