"""The demo page in a real browser: headless Chromium (Debian's package, driven by Playwright)
loads it, types a caption, presses Generate, waits for the images and saves a screenshot; the page
asks nothing of any host but its own (no CDN, no telemetry).

Needs ``apt install chromium`` and ``pip install playwright`` (not part of the dev extra): skipped
without them. ``DMGAN_SCREENSHOT=path.png`` keeps the screenshot and ``DMGAN_DEMO_CHECKPOINT`` serves another
checkpoint than the tests' tiny one; the README's screenshot is::

    DMGAN_DEMO_CHECKPOINT=runs/shapes/checkpoints/latest.pt DMGAN_SCREENSHOT=dmgan/assets/demo.png \
        .venv/bin/python -m pytest tests/test_demo_browser.py
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="the demo needs the [demo] extra")
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="apt install chromium")]
# What the environment's notes say a headless Chromium needs on a machine with a closed network.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
         "--disable-background-networking", "--disable-component-update"]  # fmt: skip


def test_chromium_renders_the_page_and_shows_the_images_for_a_caption(trained, tmp_path):
    from dmgan.demo import Demo, build, example_captions

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = Demo(os.environ.get("DMGAN_DEMO_CHECKPOINT", trained), "cpu")
    page_app = build(demo, example_captions(demo.pipelines["ema"]))
    page_app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    base = f"http://127.0.0.1:{port}"
    elsewhere: list[str] = []
    shot = Path(os.environ.get("DMGAN_SCREENSHOT", tmp_path / "demo.png"))
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on(
                "request",
                lambda r: None if r.url.startswith((base, "data:", "blob:")) else elsewhere.append(r.url),
            )
            page.goto(base + "/")
            page.get_by_label("Caption").fill("a large red circle in the top left")
            page.get_by_role("button", name="Generate").click()
            page.get_by_text("Words the model knows").wait_for(timeout=60_000)
            page.locator("img").last.wait_for(timeout=60_000)
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
    finally:
        page_app.close()
    assert shot.stat().st_size > 10_000
    assert not elsewhere, f"the page asked other hosts: {elsewhere[:5]}"
