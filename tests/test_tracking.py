"""dmgan.tracking against the real libraries: what TensorBoard and W&B (offline) record, read back
from the files they write; the metrics log's format; a missing backend; a disabled tracker."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dmgan.tracking import REPORT_TO, MissingBackendError, check_report_to, open_tracker

CONFIG = {"options": {"preset": "shapes", "max_steps": 2}, "config": {"model": {"r_num": 2}}}


def _picture(height: int, width: int) -> np.ndarray:
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 0] = 200
    pixels[: height // 2, :, 2] = 90
    return pixels


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_report_to_names():
    assert REPORT_TO == ("none", "tensorboard", "wandb")
    check_report_to("none")
    with pytest.raises(ValueError, match="none, tensorboard, wandb"):
        check_report_to("mlflow")
    with pytest.raises(ValueError, match="mlflow"):
        open_tracker("mlflow", Path("unused"), enabled=False)


def test_metrics_jsonl_keeps_its_line_format(tmp_path):
    out = tmp_path / "run"
    with open_tracker("none", out, run_name="r", config=CONFIG) as tracker:
        tracker.scalars("damsm", 25, {"w_loss": 1.5, "s_loss": 2.0, "lr": 2e-4})
        tracker.scalars("gan", 25, {"g_loss": 3.0, "skipped_steps": 0})
        tracker.images("gan", 25, {"samples": _picture(8, 8)})  # no backend: nothing to do
    lines = _metrics(out)
    assert [list(line) for line in lines] == [
        ["stage", "step", "time", "w_loss", "s_loss", "lr"],
        ["stage", "step", "time", "g_loss", "skipped_steps"],
    ]
    assert lines[0] | {"time": 0} == {
        "stage": "damsm",
        "step": 25,
        "time": 0,
        "w_loss": 1.5,
        "s_loss": 2.0,
        "lr": 2e-4,
    }
    assert isinstance(lines[1]["time"], float)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]


@pytest.mark.parametrize("report_to", REPORT_TO)
def test_disabled_tracker_writes_and_imports_nothing(tmp_path, monkeypatch, report_to):
    for package in ("tensorboard", "wandb"):  # importing either would now fail
        monkeypatch.setitem(sys.modules, package, None)
    out = tmp_path / "run"
    tracker = open_tracker(report_to, out, run_name="r", config=CONFIG, enabled=False)
    tracker.scalars("gan", 1, {"g_loss": 1.0})
    tracker.images("gan", 1, {"samples": _picture(4, 4)})
    tracker.close()
    assert not tracker.enabled
    assert not out.exists()


@pytest.mark.parametrize("report_to", ["tensorboard", "wandb"])
def test_missing_backend_is_an_error_at_start(tmp_path, monkeypatch, report_to):
    monkeypatch.setitem(sys.modules, report_to, None)  # `import <report_to>` raises ImportError
    with pytest.raises(MissingBackendError) as raised:
        check_report_to(report_to)
    message = str(raised.value)
    assert f"'{report_to}' package" in message
    assert f'pip install "dmgan[{report_to}]"' in message
    assert f'pip install -e ".[{report_to}]"' in message
    assert isinstance(raised.value, ImportError)
    with pytest.raises(MissingBackendError, match=report_to):
        open_tracker(report_to, tmp_path / "run", run_name="r", config=CONFIG)
    assert not (tmp_path / "run").exists()


def test_images_are_taken_as_pil_path_or_array(tmp_path):
    from dmgan.tracking import to_pixels

    pixels = _picture(6, 10)
    Image.fromarray(pixels).save(tmp_path / "grid.png")
    for image in (
        pixels,
        Image.fromarray(pixels).convert("RGBA"),
        tmp_path / "grid.png",
        str(tmp_path / "grid.png"),
    ):
        np.testing.assert_array_equal(to_pixels(image), pixels)
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        to_pixels(pixels.astype(np.float32))


def test_tensorboard_records_scalars_and_images(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    with open_tracker("tensorboard", out, run_name="r", config=CONFIG) as tracker:
        tracker.scalars("damsm", 100, {"w_loss": 2.5})
        tracker.scalars("gan", 25, {"g_loss": 1.5, "d_loss": 0.75})
        tracker.scalars("gan", 50, {"g_loss": 1.25, "d_loss": 0.5})
        Image.fromarray(_picture(24, 40)).save(tmp_path / "step000050.png")
        tracker.images("gan", 50, {"samples": tmp_path / "step000050.png", "attention": _picture(16, 12)})
    assert [line["step"] for line in _metrics(out)] == [100, 25, 50]  # the JSON lines as well

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    got = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert got == {
        "damsm/w_loss": [(100, 2.5)],
        "gan/g_loss": [(25, 1.5), (50, 1.25)],
        "gan/d_loss": [(25, 0.75), (50, 0.5)],
    }
    assert sorted(events.Tags()["images"]) == ["gan/attention", "gan/samples"]
    (grid,) = events.Images("gan/samples")
    assert (grid.step, grid.width, grid.height) == (50, 40, 24)
    np.testing.assert_array_equal(
        np.asarray(Image.open(io.BytesIO(grid.encoded_image_string)).convert("RGB")), _picture(24, 40)
    )
    (attention,) = events.Images("gan/attention")
    assert (attention.width, attention.height) == (12, 16)
    assert "config/text_summary" in events.Tags()["tensors"]


# The W&B run goes in a child process: wandb keeps process-wide state (its service process, console
# capture, exit hooks) that should not leak into the test session, and a hang becomes a timeout.
_WANDB_CHILD = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import numpy as np
    from dmgan.tracking import open_tracker

    out = Path(sys.argv[1])
    picture = np.zeros((20, 30, 3), np.uint8)
    picture[..., 1] = 180
    with open_tracker("wandb", out, run_name="tiny-run", config=json.loads(sys.argv[2])) as tracker:
        tracker.scalars("damsm", 100, {"w_loss": 2.5})
        tracker.scalars("gan", 25, {"g_loss": 1.5, "d_loss": 0.75})  # a lower step than damsm's
        tracker.scalars("gan", 50, {"g_loss": 1.25, "d_loss": 0.5})
        tracker.images("gan", 50, {"samples": picture})

    def children():  # processes this one started that are still there (wandb-core, if left running)
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            if stat.rsplit(")", 1)[1].split()[1] == str(os.getpid()):
                found.append(Path(f"/proc/{pid}/cmdline").read_text().replace("\\0", " "))
        return found

    print(json.dumps({"children": children()}))
    """
)


def _wandb_records(path: Path):
    """The records of a ``.wandb`` file: a 7-byte header (``:W&B``, magic, version), then protobuf
    ``Record`` messages in LevelDB's log format (32 KiB blocks; each chunk has a 7-byte header:
    checksum, length, type full/first/middle/last). wandb 0.31 ships no reader of its own."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert struct.unpack("<4sH", data[:6]) == (b":W&B", 0xBEE1)
    block, header = 32768, 7
    pos, pending = header, b""
    while pos + header <= len(data):
        if block - pos % block < header:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        pending += data[pos + header : pos + header + length]
        pos += header + length
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def test_wandb_offline_records_scalars_and_images(tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env |= {
        # No account and no network: offline is the tracker's default (so WANDB_MODE is unset here),
        # and were anything to reach out, it would find no server.
        "WANDB_BASE_URL": "http://127.0.0.1:9",
        "WANDB_ERROR_REPORTING": "false",
        "WANDB_SILENT": "true",
        "WANDB_INIT_TIMEOUT": "60",
        "WANDB_DIR": str(tmp_path / "wandb-dir"),  # wandb's own files stay in tmp_path
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
    }
    child = subprocess.run(
        [sys.executable, "-c", _WANDB_CHILD, str(out), json.dumps(CONFIG)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert child.returncode == 0, child.stdout + child.stderr
    assert json.loads(child.stdout.splitlines()[-1]) == {"children": []}  # wandb-core stopped
    assert [line["step"] for line in _metrics(out)] == [100, 25, 50]

    (run_dir,) = (out / "wandb").glob("offline-run-*")
    records = list(_wandb_records(next(run_dir.glob("run-*.wandb"))))
    (run,) = [r.run for r in records if r.HasField("run")]
    assert (run.project, run.display_name) == ("dmgan", "tiny-run")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["options"] == CONFIG["options"] and config["config"] == CONFIG["config"]

    def row(record) -> dict:
        return {"/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}

    rows = [row(r) for r in records if r.HasField("history")]
    scalars = [
        {k: v for k, v in r.items() if not k.startswith("_")} for r in rows if "gan/samples/path" not in r
    ]
    # Every stage on its own x-axis: gan's rows at 25 and 50 are kept after damsm's at 100.
    assert scalars == [
        {"damsm/step": 100, "damsm/w_loss": 2.5},
        {"gan/step": 25, "gan/g_loss": 1.5, "gan/d_loss": 0.75},
        {"gan/step": 50, "gan/g_loss": 1.25, "gan/d_loss": 0.5},
    ]
    (image,) = [r for r in rows if "gan/samples/path" in r]
    assert (image["gan/step"], image["gan/samples/width"], image["gan/samples/height"]) == (50, 30, 20)
    media = run_dir / "files" / image["gan/samples/path"]
    assert media.parent == run_dir / "files" / "media" / "images" / "gan"
    with Image.open(media) as png:
        assert png.size == (30, 20)
        assert png.convert("RGB").getpixel((0, 0)) == (0, 180, 0)
    axes = {r.metric.glob_name: r.metric.step_metric for r in records if r.metric.glob_name}
    assert axes == {"damsm/*": "damsm/step", "gan/*": "gan/step"}
