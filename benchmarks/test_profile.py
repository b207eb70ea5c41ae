"""Smoke test of benchmarks/profile.py on a tiny model (the real runs are in RESULTS.md)."""

from __future__ import annotations

import json

import torch

from benchmarks.profile import main
from dmgan.config import TINY_OVERRIDES, overrides_as_flags


def test_profile_writes_trace_summary_and_roofline(tmp_path):
    tiny = overrides_as_flags(TINY_OVERRIDES)
    summary = main(["--preset", "shapes", "--batch-size", "2", "--steps", "1", "--out", str(tmp_path), *tiny])
    assert (tmp_path / "trace.json").stat().st_size > 0 and (tmp_path / "roofline.png").is_file()
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["images_per_s"] > 0 and saved["top_operators"]
    phases = saved["phases_ms_per_step"]
    assert {
        "G forward",
        "D0 loss",
        "D0 backward",
        "D0 optimizer",
        "G loss",
        "G backward",
        "G optimizer",
        "EMA",
    } <= set(phases)
    assert all(ms > 0 for ms in phases.values())
    assert {r["op"] for r in saved["memory_ops"]} == {"memory_read", "memory_write"}
    assert all(r["bytes"] > 0 and r["flops"] > 0 and r["seconds"] > 0 for r in saved["memory_ops"])
    if not torch.cuda.is_available():
        assert summary["nvml"]["available"] is False and "NVML unavailable" in summary["nvml"]["reason"]
