"""Everything a GPU machine has to prove, in one command that degrades instead of dying.

    python -m benchmarks.device_check OUT_DIR            # on a GPU machine, from the checkout
    python -m benchmarks.device_check OUT_DIR --dry-run  # every stage at tiny sizes on the CPU (CI)

Made for a bare machine with torch, triton, nvcc, ninja and pytest but no package index: nothing
is installed, the checkout is imported from where it stands. The stages run in this order, each
in its own process under a time budget; a stage that fails or runs out of time is recorded and
the next one runs:

============ ========================================================================== ========
stage        what it does                                                               on H200
============ ========================================================================== ========
environment  devices, versions, compiler                                                ~5 s
build        dmgan._C (CPU + CUDA kernels) for this GPU's architecture only, with ninja ~90 s
gpu-tests    parity of both fused backends on the GPU (fp32 / fp16 / bf16, the 16-bit   ~90 s
             tensor-core dots), opcheck, torch.compile(fullgraph) of a stage, a second
             stream, a second device when present, batches beyond 65,535
sanitizer    compute-sanitizer memcheck and racecheck over a small parity run           ~45 s
memory-bench the memory ops at the bird shapes, every implementation side by side,      ~120 s
             fp32 and bf16, forward and forward+backward, against the HBM floor
train-step   the whole training step at the bird preset on synthetic data: eager vs     ~50 s
             fused memory op, AMP off vs bf16, images/s
profile      a few profiled training steps with NVML readings                           ~25 s
train-options the training options at the bird preset (bf16, fused ops), side by side: ~120 s
             as built, channels-last, --accumulate 2, --compile with channels-last,
             --compile alone; images/s and the first steps' time (the compile cost)
============ ========================================================================== ========

The expected times are estimates from this project's CPU measurements and published H200
figures; the first GPU run replaces them with measured ones (summary.json).

The stages share one deadline (``--total-budget``, 560 s): a stage gets at most what is left of
it, and one that would start with under 10 s left is skipped, so the whole fits a device call of
ten minutes. OUT_DIR receives, as it goes: ``summary.json`` (every stage's status, time and
results), ``summary.md`` (the same as tables), ``log.txt`` (every stage's output), ``tests.xml``
(JUnit), ``memory_bench.json`` and ``train_step.json`` (pytest-benchmark), ``profile.json`` and
``train_options.json`` (rewritten after each variant): eight files, flat, as the device tool
brings back.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "DEVICE_CHECK_RESULT "


@dataclass(frozen=True)
class Stage:
    name: str
    budget_s: int  # the stage is stopped after this long on the GPU
    expected_s: int  # what it is expected to take on an H200


STAGES = [
    Stage("environment", 20, 5),
    Stage("build", 150, 90),
    Stage("gpu-tests", 110, 90),
    Stage("sanitizer", 60, 45),
    Stage("memory-bench", 130, 120),
    Stage("train-step", 60, 50),
    Stage("profile", 40, 25),
    Stage("train-options", 150, 120),
]  # expected about 9 minutes in all; the shared deadline (TOTAL_BUDGET_S) caps it
TOTAL_BUDGET_S = 560  # a device call may take 600 s


def _report(result: dict) -> None:
    """A stage's results, for the driver to put into summary.json."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def _pytest(arguments: list[str], env: dict | None = None) -> int:
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *arguments]
    print("$", " ".join(command), flush=True)
    return subprocess.call(command, cwd=ROOT, env={**os.environ, **(env or {})})


def _xdist_workers(dry_run: bool) -> list[str]:
    """Parallel test processes where pytest-xdist is installed: Triton compiles dominate."""
    import importlib.util

    if dry_run or importlib.util.find_spec("xdist") is None:
        return []
    return ["-n", str(min(8, os.cpu_count() or 1))]


# --- the stages (each runs in a process of its own: python -m benchmarks.device_check OUT --stage NAME)


def stage_environment(out: Path, dry_run: bool) -> None:
    import torch

    result = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    if torch.cuda.is_available():
        result["devices"] = [
            {
                "name": p.name,
                "capability": f"{p.major}.{p.minor}",
                "memory_gib": round(p.total_memory / 2**30, 1),
                "multiprocessors": p.multi_processor_count,
            }
            for p in map(torch.cuda.get_device_properties, range(torch.cuda.device_count()))
        ]
    nvcc = shutil.which("nvcc")
    result["nvcc"] = (
        subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
        if nvcc
        else None
    )
    result["commit"] = (
        subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        or None
    )
    _report(result)


def stage_build(out: Path, dry_run: bool) -> None:
    """Builds (or loads) dmgan._C for this machine: on a GPU, CUDA kernels for its architecture
    only. An extension built against another torch does not load, so it is built here."""
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    start = time.perf_counter()
    from dmgan.ops import _cpp  # builds on first use when no prebuilt dmgan._C loads

    _report(
        {
            "how": _cpp.HOW_LOADED,
            "cuda_kernels": _cpp._HAS_CUDA_KERNELS,
            "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"),
            "seconds": time.perf_counter() - start,
        }
    )


def stage_gpu_tests(out: Path, dry_run: bool) -> None:
    files = ["tests/test_ops_backends.py", "tests/test_ops_gpu.py", "tests/test_csrc.py"]
    selection = ["-k", "B1-C32-4x4 or opcheck or stream"] if dry_run else []
    code = _pytest(
        [*files, "-q", "-rs", f"--junitxml={out / 'tests.xml'}", *selection, *_xdist_workers(dry_run)]
    )
    _report({"exit_code": code, "junit": "tests.xml"})
    sys.exit(code)


def sanitizer_case() -> None:
    """A small parity run of both fused backends, forward and backward (what the sanitizer watches)."""
    import torch

    from dmgan import ops
    from dmgan.ops.parity import ReadShape, WriteShape, check_memory_read, check_memory_write

    device = "cuda" if torch.cuda.is_available() else "cpu"
    backends = [b for b in ("cpp", "triton") if b in ops.available_backends(device)]
    for backend in backends:
        check_memory_read(backend, torch.float32, ReadShape(2, 32, 17, 17, (9, 30)), False, device)
        check_memory_read(backend, torch.bfloat16, ReadShape(2, 64, 9, 9, (5, 0)), True, device)
        check_memory_write(backend, torch.float32, WriteShape(2, 40, 32, 6), device)
    print(f"sanitizer case passed on {device} for {backends}")


def stage_sanitizer(out: Path, dry_run: bool) -> None:
    case = [sys.executable, "-c", "from benchmarks.device_check import sanitizer_case; sanitizer_case()"]
    sanitizer = shutil.which("compute-sanitizer")
    result: dict = {}
    if sanitizer is None or dry_run:
        result["note"] = (
            "compute-sanitizer not run (" + ("dry run" if dry_run else "not found") + "): the case alone"
        )
        result["case"] = subprocess.call(case, cwd=ROOT)
    else:
        # No caching allocator: out-of-bounds accesses inside a cached block would go unseen.
        env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
        for tool in ("memcheck", "racecheck"):
            command = [sanitizer, "--tool", tool, "--error-exitcode", "99", "--print-limit", "20", *case]
            print("$", " ".join(command), flush=True)
            result[tool] = subprocess.call(command, cwd=ROOT, env=env)
    _report(result)
    sys.exit(0 if all(code == 0 for key, code in result.items() if key != "note") else 1)


def _floors(report: dict, bandwidth: float) -> list[dict]:
    """Each memory-read benchmark against the HBM floor: the bytes it must move (read r, write r';
    with the backward also read r and dr', write dr) at the measured copy bandwidth."""
    rows = []
    for bench in report["benchmarks"]:
        info = bench["extra_info"]
        if info.get("kind") != "memory_read":
            continue
        element = 4 if info["dtype"] == "float32" else 2
        batch, channels, size = (int(x) for x in _read_dims(info["shape"]))
        tensors = 2 if info["direction"] == "forward" else 5
        floor = tensors * batch * channels * size * size * element / bandwidth
        rows.append(
            {
                **{k: info[k] for k in ("impl", "shape", "dtype", "direction")},
                "median_s": bench["stats"]["median"],
                "floor_s": floor,
                "times_floor": bench["stats"]["median"] / floor,
            }
        )
    return rows


def _read_dims(shape: str) -> tuple[str, str, str]:
    batch, channels, pixels = shape.split("-")[:3]  # e.g. B10-C64-128x128-T18/...
    return batch[1:], channels[1:], pixels.split("x")[0]


def stage_memory_bench(out: Path, dry_run: bool) -> None:
    import torch

    from benchmarks.profile import measured_peaks

    report = out / "memory_bench.json"
    # On the GPU: the bird preset's batch of 10; torch.compile (about 10 s a compile) at 128 x 128 only.
    size = (
        ["--bench-size", "smoke", "-k", "not compile"]
        if dry_run
        else ["-k", "B10- and not (compile and 64x64)"]
    )
    code = _pytest(
        [
            "benchmarks/test_bench_memory.py",
            "-q",
            "--benchmark-enable",
            f"--benchmark-json={report}",
            "--benchmark-group-by=func,param:dtype,param:direction",
            *size,
        ]
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bandwidth = measured_peaks(device)["copy_bytes_per_s"]
    rows = _floors(json.loads(report.read_text()), bandwidth) if report.exists() else []
    _report({"exit_code": code, "copy_bytes_per_s": bandwidth, "reads_against_floor": rows})
    sys.exit(code)


def stage_train_step(out: Path, dry_run: bool) -> None:
    report = out / "train_step.json"
    size = ["--bench-size", "smoke"] if dry_run else []
    code = _pytest(
        [
            "benchmarks/test_bench_train_step.py",
            "-q",
            "--benchmark-enable",
            f"--benchmark-json={report}",
            "--benchmark-group-by=param:amp",
            *size,
        ]
    )
    rows = []
    if report.exists():
        for bench in json.loads(report.read_text())["benchmarks"]:
            info = bench["extra_info"]
            rows.append(
                {
                    "memory_backend": info["memory_backend"],
                    "amp": info["amp"],
                    "preset": info["preset"],
                    "images_per_s": info["batch"] / bench["stats"]["median"],
                }
            )
    _report({"exit_code": code, "steps": rows})
    sys.exit(code)


def stage_profile(out: Path, dry_run: bool) -> None:
    from benchmarks import profile
    from dmgan.config import TINY_OVERRIDES, overrides_as_flags

    tiny = ["--preset", "shapes", "--batch-size", "2", "--steps", "1", *overrides_as_flags(TINY_OVERRIDES)]
    with tempfile.TemporaryDirectory() as tmp:
        summary = profile.main(["--out", tmp, *(tiny if dry_run else [])])
    (out / "profile.json").write_text(json.dumps(summary, indent=2) + "\n")
    _report({"images_per_s": summary["images_per_s"], "nvml": summary["nvml"].get("available")})


# The variants of the train-options stage: GAN.build's options, as the CLI flags name them.
TRAIN_OPTIONS = {
    "as built": {},
    "--channels-last on": {"channels_last": True},
    "--accumulate 2": {"accumulate": 2},
    "--compile --channels-last on": {"compile": True, "channels_last": True},
    "--compile": {"compile": True},
}


def stage_train_options(out: Path, dry_run: bool) -> None:
    """Each training option at the bird preset on synthetic batches (fused ops, bf16 on a GPU),
    one after another in this process: the first two steps' time (which holds the compile) and
    the images/s of the steps after them."""
    import torch

    from dmgan.config import TINY_OVERRIDES, get_preset, override
    from dmgan.trainer import GAN, synthetic_batch

    on_gpu = torch.cuda.is_available()
    device, amp = ("cuda", "bf16") if on_gpu else ("cpu", "off")
    cfg = get_preset("bird") if not dry_run else override(get_preset("shapes"), **TINY_OVERRIDES)
    steps = 2 if dry_run else 10
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    rows: list[dict] = []
    for name, options in TRAIN_OPTIONS.items():
        if dry_run and options.get("compile"):
            continue  # a cold inductor compile takes minutes on two CPU cores
        torch.manual_seed(0)
        torch._dynamo.reset()
        gan = GAN.build(cfg, 100, device, amp=amp, **options)
        batch = synthetic_batch(cfg, 100, cfg.train.batch_size, device)
        start = time.perf_counter()
        for _ in range(2):
            gan.step(batch)
        sync()
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps):
            logs = gan.step(batch)
        sync()
        seconds = (time.perf_counter() - start) / steps
        rows.append(
            {
                "variant": name,
                "preset": cfg.name,
                "amp": amp,
                "first_two_steps_s": round(first, 2),
                "images_per_s": round(cfg.train.batch_size / seconds, 2),
                "finite": bool(all(torch.isfinite(v).all() for v in logs.values())),
            }
        )
        (out / "train_options.json").write_text(json.dumps(rows, indent=2) + "\n")
        print(json.dumps(rows[-1]), flush=True)
        del gan
    _report({"variants": rows})


STAGE_FUNCTIONS = {
    "environment": stage_environment,
    "build": stage_build,
    "gpu-tests": stage_gpu_tests,
    "sanitizer": stage_sanitizer,
    "memory-bench": stage_memory_bench,
    "train-step": stage_train_step,
    "profile": stage_profile,
    "train-options": stage_train_options,
}


# --- the driver


def _run_stage(stage: Stage, out: Path, dry_run: bool, log, budget_s: int) -> dict:
    command = [sys.executable, "-m", "benchmarks.device_check", str(out), "--stage", stage.name]
    if dry_run:
        command.append("--dry-run")
    log.write(f"\n===== {stage.name} (budget {budget_s} s) =====\n$ {' '.join(command)}\n")
    log.flush()
    start = time.perf_counter()
    record: dict = {"stage": stage.name, "budget_s": budget_s, "expected_s": stage.expected_s}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    try:
        output, _ = process.communicate(timeout=None if dry_run else budget_s)
        lines = output.splitlines()
        record["status"] = "passed" if process.returncode == 0 else f"failed (exit {process.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)  # the stage and every process it started
        output, _ = process.communicate()
        lines = (output or "").splitlines()
        record["status"] = f"stopped after its {budget_s} s budget"
    record["seconds"] = round(time.perf_counter() - start, 1)
    for line in lines:
        if line.startswith(RESULT_PREFIX):
            record["result"] = json.loads(line[len(RESULT_PREFIX) :])
        else:
            log.write(line + "\n")
    log.flush()
    return record


def _markdown(records: list[dict]) -> str:
    lines = ["| stage | status | seconds | expected on H200 |", "|---|---|---:|---:|"]
    lines += [f"| {r['stage']} | {r['status']} | {r['seconds']} | {r['expected_s']} |" for r in records]
    for record in records:
        result = record.get("result", {})
        if record["stage"] == "memory-bench" and result.get("reads_against_floor"):
            lines += [
                "",
                f"memory_read against the HBM floor (copy bandwidth {result['copy_bytes_per_s'] / 1e9:.0f} GB/s):",
                "",
                "| impl | shape | dtype | direction | median | floor | x floor |",
                "|---|---|---|---|---:|---:|---:|",
            ]
            lines += [
                f"| {r['impl']} | {r['shape']} | {r['dtype']} | {r['direction']} | {r['median_s'] * 1e6:.1f} µs | "
                f"{r['floor_s'] * 1e6:.1f} µs | {r['times_floor']:.2f} |"
                for r in result["reads_against_floor"]
            ]
        if record["stage"] == "train-step" and result.get("steps"):
            lines += ["", "| training step | AMP | images/s |", "|---|---|---:|"]
            lines += [
                f"| {s['preset']} {s['memory_backend']} | {s['amp']} | {s['images_per_s']:.1f} |"
                for s in result["steps"]
            ]
        if record["stage"] == "train-options" and result.get("variants"):
            lines += [
                "",
                "| training option | preset | AMP | first two steps | images/s |",
                "|---|---|---|---:|---:|",
            ]
            lines += [
                f"| {v['variant']} | {v['preset']} | {v['amp']} | {v['first_two_steps_s']} s | {v['images_per_s']:.1f} |"
                for v in result["variants"]
            ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the results (created)")
    parser.add_argument("--dry-run", action="store_true", help="every stage at tiny sizes on the CPU")
    parser.add_argument(
        "--stage", choices=list(STAGE_FUNCTIONS), help=argparse.SUPPRESS
    )  # one stage, in-process
    parser.add_argument("--only", nargs="+", choices=list(STAGE_FUNCTIONS), help="run only these stages")
    parser.add_argument(
        "--total-budget", type=int, default=TOTAL_BUDGET_S, help="seconds for all stages together"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out.resolve()
    if args.stage:
        STAGE_FUNCTIONS[args.stage](out, args.dry_run)
        return 0

    records: list[dict] = []
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    deadline = time.perf_counter() + args.total_budget
    with open(out / "log.txt", "w") as log:
        for stage in STAGES:
            if args.only and stage.name not in args.only:
                continue
            left = int(deadline - time.perf_counter())
            if left < 10 and not args.dry_run:
                record = {"stage": stage.name, "budget_s": 0, "expected_s": stage.expected_s, "seconds": 0.0}
                records.append({**record, "status": "skipped: the shared deadline had passed"})
            else:
                records.append(_run_stage(stage, out, args.dry_run, log, min(stage.budget_s, left)))
            record = records[-1]
            print(f"{record['stage']:13s} {record['status']:35s} {record['seconds']:7.1f} s", flush=True)
            summary = {"started": started, "dry_run": args.dry_run, "stages": records}
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")  # after every stage
            (out / "summary.md").write_text(_markdown(records))
    return 0 if all(r["status"] == "passed" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
