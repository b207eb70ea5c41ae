"""The device script's dry run: every stage at tiny sizes on the CPU, so that the script a GPU
session depends on cannot rot between GPU runs."""

from __future__ import annotations

import json

import pytest

from benchmarks import device_check

pytestmark = pytest.mark.slow


def test_dry_run_runs_every_stage_and_writes_what_the_device_tool_brings_back(tmp_path):
    code = device_check.main([str(tmp_path), "--dry-run"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    statuses = {r["stage"]: r["status"] for r in summary["stages"]}
    assert list(statuses) == [s.name for s in device_check.STAGES]
    assert code == 0, (statuses, (tmp_path / "log.txt").read_text()[-4000:])
    results = {r["stage"]: r.get("result", {}) for r in summary["stages"]}
    assert results["environment"]["torch"] and results["build"]["how"] in ("prebuilt", "built on first use")
    assert results["memory-bench"]["reads_against_floor"] and results["train-step"]["steps"]
    assert all(row["times_floor"] > 1 for row in results["memory-bench"]["reads_against_floor"])
    variants = results["train-options"]["variants"]  # the compiled ones are left out of the dry run
    assert [v["variant"] for v in variants] == [
        n for n, o in device_check.TRAIN_OPTIONS.items() if not o.get("compile")
    ]
    assert all(v["finite"] and v["images_per_s"] > 0 for v in variants)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert all(p.is_file() for p in tmp_path.iterdir()) and len(files) <= 8, files  # flat, at most 8
    assert {
        "summary.json",
        "summary.md",
        "log.txt",
        "tests.xml",
        "memory_bench.json",
        "train_step.json",
        "profile.json",
        "train_options.json",
    } <= set(files)


def test_the_stages_fit_one_device_call_and_share_one_deadline(tmp_path):
    assert sum(s.expected_s for s in device_check.STAGES) <= device_check.TOTAL_BUDGET_S <= 10 * 60 - 30
    assert all(s.budget_s <= device_check.TOTAL_BUDGET_S for s in device_check.STAGES)
    code = device_check.main([str(tmp_path), "--only", "environment", "build", "--total-budget", "0"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (
        code == 1
        and [r["status"] for r in summary["stages"]] == ["skipped: the shared deadline had passed"] * 2
    )
