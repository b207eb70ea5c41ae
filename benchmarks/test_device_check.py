"""The device script: its dry run (every stage at tiny sizes on the CPU, so that the script a GPU
session depends on cannot rot between GPU runs), and the driver's handling of a stage that runs
out of time, a failed build and the settings every stage inherits, with tiny stand-in stages."""

from __future__ import annotations

import json
import signal
import sys
import tempfile
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from benchmarks import device_check
from benchmarks.device_check import Stage


@pytest.mark.slow
def test_dry_run_runs_every_stage_and_writes_its_flat_report_files(tmp_path):
    code = device_check.main([str(tmp_path), "--dry-run"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    statuses = {r["stage"]: r["status"] for r in summary["stages"]}
    assert list(statuses) == [s.name for s in device_check.STAGES]
    assert code == 0, (statuses, (tmp_path / "log.txt").read_text()[-4000:])
    results = {r["stage"]: r.get("result", {}) for r in summary["stages"]}
    assert results["environment"]["torch"] and results["build"]["how"] in ("prebuilt", "built on first use")
    assert results["environment"]["commit"]  # a hash, or "unknown" without git
    assert results["memory-bench"]["reads_against_floor"] and results["train-step"]["steps"]
    assert all(row["times_floor"] > 1 for row in results["memory-bench"]["reads_against_floor"])
    variants = results["train-options"]["variants"]  # the compiled ones are left out of the dry run
    assert [v["variant"] for v in variants] == [
        n for n, o in device_check.TRAIN_OPTIONS.items() if not o.get("compile")
    ]
    assert all(v["finite"] and v["images_per_s"] > 0 for v in variants)
    settings = summary["settings"]  # one arch list and one build folder for every stage
    expected = {
        "TORCH_CUDA_ARCH_LIST": settings["arch_list"],
        "TORCH_EXTENSIONS_DIR": settings["extensions_dir"],
    }
    assert all(r["settings_seen"] == {**expected, "DMGAN_SKIP_CPP_REASON": None} for r in summary["stages"])
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


def test_what_matters_most_runs_first():
    order = [s.name for s in device_check.STAGES]
    assert order[:5] == ["environment", "build", "gpu-tests", "memory-bench", "train-step"]
    assert sorted(order) == sorted(device_check.STAGE_FUNCTIONS)


# --- the driver with stand-in stages: each runs ``body`` as its stage function through the script's
# own stage entry point (main --stage), in a process of its own, as the real stages do.

STAND_IN = """
import sys
from benchmarks import device_check

def stage(out, dry_run):
{body}

device_check.STAGE_FUNCTIONS[sys.argv[2]] = stage
sys.exit(device_check.main([sys.argv[1], "--stage", sys.argv[2]]))
"""


def _run(monkeypatch, out: Path, stages: dict[str, tuple[int, str | None]], *args: str) -> tuple[int, dict]:
    """The driver over ``stages`` (name -> (budget in s, stand-in body, or None for the real
    stage)); returns its exit code and summary.json."""
    real_command = device_check._stage_command

    def command(stage: Stage, out: Path, dry_run: bool) -> list[str]:
        body = stages[stage.name][1]
        if body is None:
            return real_command(stage, out, dry_run)
        code = STAND_IN.format(body=textwrap.indent(textwrap.dedent(body), "    "))
        return [sys.executable, "-c", code, str(out), stage.name]

    monkeypatch.setattr(device_check, "_stage_command", command)
    monkeypatch.setattr(device_check, "STAGES", [Stage(n, b, 1) for n, (b, _) in stages.items()])
    code = device_check.main([str(out), "--total-budget", "120", *args])
    return code, json.loads((out / "summary.json").read_text())


# A pytest run whose second test overruns the stage's budget: the first one's JUnit entry and
# benchmark must still come back.
OVERRUNNING_TESTS = """
import time

def test_quick(benchmark):
    benchmark.pedantic(sum, args=([1, 2],), rounds=1, iterations=1)

def test_overruns():
    time.sleep(120)
"""


def test_a_stage_that_overruns_gets_sigint_keeps_its_partial_reports_and_the_run_goes_on(
    monkeypatch, tmp_path
):
    pytest.importorskip("pytest_benchmark")
    monkeypatch.setattr(device_check, "GRACE_S", 3)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)  # the driver picks it, for every stage
    tests = tmp_path / "overrun" / "test_overrun.py"
    tests.parent.mkdir()
    tests.write_text(OVERRUNNING_TESTS)
    out = tmp_path / "out"
    pytest_stage = f"""
        code = device_check._pytest(
            [{str(tests)!r}, "-q", "-c", "/dev/null", "--rootdir", {str(tests.parent)!r},
             "-p", "pytest_benchmark.plugin", f"--junitxml={{out / 'tests.xml'}}",
             f"--benchmark-json={{out / 'memory_bench.json'}}"],
            env={{"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}},
        )
        device_check._report({{"exit_code": code, "interrupted": device_check._interrupted}})
        sys.exit(code)
    """
    stubborn_stage = """
        import signal, time
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        time.sleep(120)
    """
    # Started as a background job of a shell, the driver and what it starts would ignore SIGINT.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        code, summary = _run(
            monkeypatch,
            out,
            {
                "gpu-tests": (8, pytest_stage),
                "sanitizer": (4, stubborn_stage),
                "profile": (4, "import time; time.sleep(120)"),  # in-process work, no child
                "train-options": (30, "device_check._report({'ran': True})"),
            },
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    records = {r["stage"]: r for r in summary["stages"]}
    overran = records["gpu-tests"]
    assert overran["status"] == "stopped after its 8 s budget (SIGINT; it stopped within the grace period)"
    # pytest got the SIGINT (exit code 2: interrupted), and so did the stage, which waited for it.
    assert overran["result"] == {"exit_code": 2, "interrupted": True}
    assert overran["seconds"] < 8 + 3
    cases = {c.get("name"): c for c in ET.parse(out / "tests.xml").iter("testcase")}
    assert "test_quick" in cases and not list(cases["test_quick"])  # passed: no failure or skip
    benchmarks = json.loads((out / "memory_bench.json").read_text())["benchmarks"]
    assert [b["name"] for b in benchmarks] == ["test_quick"]
    # A stage that ignores SIGINT is killed after the grace period.
    assert records["sanitizer"]["status"] == "stopped after its 4 s budget (SIGINT, then SIGKILL after 3 s)"
    assert 4 + 3 <= records["sanitizer"]["seconds"] < 4 + 3 + 3
    # A stage's own work stops on SIGINT too, though the driver was started ignoring it.
    assert (
        records["profile"]["status"]
        == "stopped after its 4 s budget (SIGINT; it stopped within the grace period)"
    )
    assert "KeyboardInterrupt" in records["profile"]["output_tail"][-1]
    last = records["train-options"]
    assert last["status"] == "passed" and last["result"] == {"ran": True}
    assert code == 1
    settings = summary["settings"]  # the GPUs' architectures, or the H200's without one
    assert settings["arch_list"] and settings["arch_list_source"] != "TORCH_CUDA_ARCH_LIST as set"
    assert all(
        r["settings_seen"]["TORCH_CUDA_ARCH_LIST"] == settings["arch_list"]
        and r["settings_seen"]["TORCH_EXTENSIONS_DIR"] == settings["extensions_dir"]
        for r in summary["stages"]
    )


def test_a_failed_build_skips_cpp_later_and_every_stage_gets_the_same_fresh_settings(monkeypatch, tmp_path):
    # A lock left by a killed build in the usual extensions folder must not matter, nor a missing git.
    stale = tmp_path / "stale-extensions"
    (stale / "dmgan_C").mkdir(parents=True)
    (stale / "dmgan_C" / "lock").touch()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(stale))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no git, nvcc or nvidia-smi
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")  # overrides what the GPUs would say
    monkeypatch.delenv("DMGAN_SKIP_CPP_REASON", raising=False)
    failing_build = """
        device_check._report({"error": "RuntimeError: Error building extension 'dmgan_C_cuda': [1/3] nvcc "
                              + "-O3 " * 400 + "\\ncsrc/memory_cuda.cu(12): error: identifier \\"bit_cast\\" is undefined"})
        sys.exit(1)
    """
    later_stage = """
        import os
        from dmgan import ops
        folder = os.environ["TORCH_EXTENSIONS_DIR"]
        device_check._report({"backends": ops.available_backends("cpu"), "cpp_error": ops._load_errors.get("cpp"),
                              "extensions_dir_listing": os.listdir(folder)})
    """
    out = tmp_path / "out"
    code, summary = _run(
        monkeypatch,
        out,
        {"environment": (60, None), "build": (30, failing_build), "memory-bench": (60, later_stage)},
    )
    records = {r["stage"]: r for r in summary["stages"]}
    assert records["environment"]["status"] == "passed", records["environment"]
    assert records["environment"]["result"]["commit"] == "unknown"
    # The arch list and a fresh build folder, fixed once, reach every stage.
    settings = summary["settings"]
    assert settings["arch_list"] == "8.6" and settings["arch_list_source"] == "TORCH_CUDA_ARCH_LIST as set"
    folder = Path(settings["extensions_dir"])
    assert folder != stale and folder.parent == Path(tempfile.gettempdir())
    assert not folder.exists()  # removed at the end: the next run's is fresh too
    assert records["environment"]["result"]["arch_list"] == "8.6"
    for stage in ("environment", "build", "memory-bench"):
        seen = records[stage]["settings_seen"]
        assert seen["TORCH_CUDA_ARCH_LIST"] == "8.6" and seen["TORCH_EXTENSIONS_DIR"] == str(folder)
    later = records["memory-bench"]
    assert later["result"]["extensions_dir_listing"] == []  # no stale lock in it
    # The build's error, its compiler line quoted, is handed to the later stages: cpp is skipped.
    assert records["build"]["status"] == "failed (exit 1)" and "cpp_skipped" not in records["environment"]
    quoted = later["cpp_skipped"]
    assert quoted.startswith("the build stage failed (exit 1): RuntimeError: Error building extension")
    assert 'error: identifier "bit_cast" is undefined' in quoted and len(quoted) <= 1500
    assert later["settings_seen"]["DMGAN_SKIP_CPP_REASON"] == quoted
    assert "cpp" not in later["result"]["backends"] and quoted in later["result"]["cpp_error"]
    assert quoted in (out / "summary.md").read_text()
    assert code == 1
