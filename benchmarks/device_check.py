"""Everything a GPU machine has to prove, in one command that degrades instead of dying.

    python -m benchmarks.device_check OUT_DIR            # on a GPU machine, from the checkout
    python -m benchmarks.device_check OUT_DIR --dry-run  # every stage at tiny sizes on the CPU (CI)

Made for a bare machine with torch, triton, nvcc, ninja and pytest but no package index (and
perhaps no git): nothing is installed, the checkout is imported from where it stands. The stages
run in this order, what matters most first, each in its own process (and process group) under a
time budget; a stage that fails or runs out of time is recorded and the next one runs:

============ ========================================================================== ========
stage        what it does                                                               on H200
============ ========================================================================== ========
environment  devices, versions, compiler, the commit ("unknown" without git)            ~5 s
build        dmgan._C (CPU + CUDA kernels) for this GPU's architecture only, with ninja ~90 s
gpu-tests    parity of both fused backends on the GPU (fp32 / fp16 / bf16, the 16-bit   ~90 s
             tensor-core dots), opcheck, torch.compile(fullgraph) of a stage, a second
             stream, a second device when present, batches beyond 65,535
memory-bench the memory ops at the bird shapes, every implementation side by side,      ~120 s
             fp32 and bf16, forward and forward+backward, against the HBM floor
train-step   the whole training step at the bird preset on synthetic data: eager vs     ~50 s
             fused memory op, AMP off vs bf16, images/s
sanitizer    compute-sanitizer memcheck and racecheck over a small parity run           ~45 s
profile      a few profiled training steps with NVML readings                           ~25 s
train-options the training options at the bird preset (bf16, fused ops), side by side: ~120 s
             as built, channels-last, --accumulate 2, --compile with channels-last,
             --compile alone; images/s and the first steps' time (the compile cost)
============ ========================================================================== ========

The expected times are estimates from this project's CPU measurements and published H200
figures; the first GPU run replaces them with measured ones (summary.json).

Every stage inherits the same build settings from the driver, so the extension is built once:
``TORCH_CUDA_ARCH_LIST`` (as set, else the visible GPUs' architectures from nvidia-smi, else
9.0, the H200's; torch's JIT build rebuilds everything when a later process sees another list)
and a fresh ``TORCH_EXTENSIONS_DIR`` (a new temporary folder, removed at the end, so no lock left
by an earlier, killed build can hang a stage). When the build stage fails, every later stage runs
with ``DMGAN_SKIP_CPP_REASON`` set to its error: the ``cpp`` backend counts as unavailable there
(its tests and benchmarks skip instead of rebuilding), and the summary quotes the error.

The stages share one deadline (``--total-budget``, 560 s): a stage gets at most what is left of
it less a grace period, and one that would start with under 10 s is skipped, so the whole fits a
run of ten minutes. A stage that runs out of time gets SIGINT (its whole process group):
pytest stops and still writes its JUnit and benchmark reports for the tests that ran, the
training-options file keeps the variants done; after the grace period (``GRACE_S``, bounded by
what is left) the group gets SIGKILL. OUT_DIR receives, as it goes: ``summary.json`` (the
settings, every stage's status, time, results and, for a stage that did not pass, its last
lines), ``summary.md`` (the same as tables), ``log.txt`` (every stage's output), ``tests.xml``
(JUnit), ``memory_bench.json`` and ``train_step.json`` (pytest-benchmark), ``profile.json`` and
``train_options.json`` (rewritten after each variant): eight files, flat.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

ROOT = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "DEVICE_CHECK_RESULT "
STAGE_ENV_PREFIX = "DEVICE_CHECK_STAGE_ENV "


@dataclass(frozen=True)
class Stage:
    name: str
    budget_s: int  # the stage is stopped after this long on the GPU
    expected_s: int  # what it is expected to take on an H200


# What matters most first: kernel parity, the memory-op benchmark, the training step, the rest.
STAGES = [
    Stage("environment", 20, 5),
    Stage("build", 150, 90),
    Stage("gpu-tests", 110, 90),
    Stage("memory-bench", 130, 120),
    Stage("train-step", 60, 50),
    Stage("sanitizer", 60, 45),
    Stage("profile", 40, 25),
    Stage("train-options", 150, 120),
    Stage("cpu-kernels", 80, 25),
]  # expected about 9.5 minutes in all; the shared deadline (TOTAL_BUDGET_S) caps it
TOTAL_BUDGET_S = 570  # the whole run within ten minutes, with room for the driver
GRACE_S = 8  # between a late stage's SIGINT and its SIGKILL: pytest writes its reports in it
MIN_STAGE_S = 10  # a stage that would get less is skipped

# The settings every stage inherits from the driver (and reports back, so the summary shows it).
ARCH_LIST = "TORCH_CUDA_ARCH_LIST"
EXTENSIONS_DIR = "TORCH_EXTENSIONS_DIR"
SKIP_CPP = "DMGAN_SKIP_CPP_REASON"  # honoured by dmgan.ops._cpp: the cpp backend does not load
SHARED_SETTINGS = (ARCH_LIST, EXTENSIONS_DIR, SKIP_CPP)
FALLBACK_ARCH_LIST = "9.0"  # the H200 this script is made for, when no GPU answers nvidia-smi


def _report(result: dict) -> None:
    """A stage's results, for the driver to put into summary.json."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


_interrupted = False  # set when this stage process got SIGINT while a child ran


def _note_interrupt(signum: int, frame: object) -> None:
    global _interrupted
    _interrupted = True


def _call(command: list[str], env: dict | None = None) -> int:
    """Runs ``command`` to its end and returns its exit code, even when this process gets SIGINT.

    The driver stops a late stage with SIGINT to its whole process group, so the child (pytest)
    gets it too, stops and writes its partial reports. subprocess.call would instead kill the
    child 0.25 s into a KeyboardInterrupt; this waits for it (the driver's SIGKILL after the grace
    period is the backstop). A Python-level handler, unlike SIG_IGN, is reset to the default in
    the child, so the child's Python still turns SIGINT into KeyboardInterrupt.
    """
    print("$", " ".join(command), flush=True)
    previous = signal.signal(signal.SIGINT, _note_interrupt)
    try:
        return subprocess.call(command, cwd=ROOT, env=env)
    finally:
        signal.signal(signal.SIGINT, previous)


def _pytest(arguments: list[str], env: dict | None = None) -> int:
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *arguments]
    return _call(command, env={**os.environ, **(env or {})})


def _xdist_workers(dry_run: bool) -> list[str]:
    """Parallel test processes where pytest-xdist is installed: Triton compiles dominate."""
    import importlib.util

    if dry_run or importlib.util.find_spec("xdist") is None:
        return []
    return ["-n", str(min(8, os.cpu_count() or 1))]


def _commit() -> str:
    """The checkout's commit, or "unknown" where git or the repository is missing."""
    git = shutil.which("git")
    if git is None:
        return "unknown"
    run = subprocess.run([git, "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return run.stdout.strip() if run.returncode == 0 and run.stdout.strip() else "unknown"


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
    result["commit"] = _commit()
    # The arch list the driver fixed for every stage: does it hold this machine's GPUs?
    archs = {a.removesuffix("+PTX") for a in re.split(r"[ ;]+", os.environ.get(ARCH_LIST, "")) if a}
    result["arch_list"] = os.environ.get(ARCH_LIST)
    if result.get("devices"):
        result["arch_list_covers_devices"] = all(d["capability"] in archs for d in result["devices"])
    _report(result)


def stage_build(out: Path, dry_run: bool) -> None:
    """Builds (or loads) dmgan._C for this machine: on a GPU, CUDA kernels for the architectures
    the driver fixed (TORCH_CUDA_ARCH_LIST), into the run's fresh TORCH_EXTENSIONS_DIR, where
    every later stage finds it. An extension built against another torch does not load, so it is
    built here. On failure the error is reported: the driver hands it to the later stages."""
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    start = time.perf_counter()
    settings = {"arch_list": os.environ.get(ARCH_LIST), "extensions_dir": os.environ.get(EXTENSIONS_DIR)}
    try:
        from dmgan.ops import _cpp  # builds on first use when no prebuilt dmgan._C loads
    except Exception as e:  # ImportError with the compiler's output, or DMGAN_FORCE_CUDA's error
        _report({"error": f"{type(e).__name__}: {e}", **settings, "seconds": time.perf_counter() - start})
        sys.exit(1)
    _report(
        {
            "how": _cpp.HOW_LOADED,
            "cuda_kernels": _cpp._HAS_CUDA_KERNELS,
            **settings,
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
        result["case"] = _call(case)
    else:
        # No caching allocator: out-of-bounds accesses inside a cached block would go unseen.
        env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
        for tool in ("memcheck", "racecheck"):
            command = [sanitizer, "--tool", tool, "--error-exitcode", "99", "--print-limit", "20", *case]
            result[tool] = _call(command, env=env)
            if _interrupted:
                break
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
    if _interrupted:  # out of time: the partial JSON is in OUT, the floors can wait for a later run
        done = len(json.loads(report.read_text())["benchmarks"]) if report.exists() else 0
        _report({"exit_code": code, "interrupted": True, "benchmarks_done": done})
        sys.exit(code)
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


def stage_cpu_kernels(out: Path, dry_run: bool) -> None:
    """The host CPU's C++ kernels, with the GPU hidden (CUDA_VISIBLE_DEVICES=""), so that the
    tests and the benchmark take the CPU: which instruction set the kernels run with, the C++
    backend's parity under it and under every lower one (tests/test_cpu_isa.py), and the C++
    reading against eager at the bird preset's stage-3 shape in fp32 and bf16, side by side. The
    GPU machine's CPU is where AVX-512 is found."""
    import torch

    from dmgan.ops import _cpp
    from dmgan.provenance import cpu_model

    cpu_only = {"CUDA_VISIBLE_DEVICES": ""}
    report = Path(tempfile.mkdtemp()) / "cpu_bench.json"  # its medians go to the summary: OUT holds few files
    tests = [
        "tests/test_cpu_isa.py",
        "tests/test_ops_backends.py",
        "-k",
        "cpp or isa or instruction or machine",
    ]
    code = _pytest([*tests, "-q", "-rs"], env=cpu_only)
    cases = "eager-reference or cpp" if dry_run else "(eager-reference or cpp) and B10- and 128x128"
    bench = ["benchmarks/test_bench_memory.py::test_memory_read", "-q", "--benchmark-enable"]
    bench += [f"--benchmark-json={report}", "--benchmark-group-by=param:dtype,param:direction", "-k", cases]
    bench_code = _pytest([*bench, *(["--bench-size", "smoke"] if dry_run else [])], env=cpu_only)
    medians: dict[str, dict[str, float]] = {}
    if report.exists():
        for result in json.loads(report.read_text())["benchmarks"]:
            dtype = re.sub(r"UNSERIALIZABLE\[torch\.(\w+)\]", r"\1", str(result["params"]["dtype"]))
            group = f"{dtype} {result['params']['direction']}"
            medians.setdefault(group, {})[result["params"]["impl"]] = result["stats"]["median"]
    _report(
        {
            "exit_code": code or bench_code,
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "aten_capability": torch.backends.cpu.get_cpu_capability(),
            "kernels_capability": _cpp.cpu_capability(),
            "medians_s": medians,
            "cpp_vs_eager": {
                group: times["eager-reference"] / times["cpp"]
                for group, times in medians.items()
                if {"eager-reference", "cpp"} <= times.keys()
            },
        }
    )
    sys.exit(code or bench_code)


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
    from dmgan.training_step import TrainingState, synthetic_batch

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
        state = TrainingState.build(cfg, 100, device=device, amp=amp, **options)
        batch = synthetic_batch(cfg, 100, cfg.train.batch_size, device)
        start = time.perf_counter()
        for _ in range(2):
            state.step(batch)
        sync()
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps):
            logs = state.step(batch)
        sync()
        seconds = (time.perf_counter() - start) / steps
        rows.append(
            {
                "variant": name,
                "preset": cfg.name,
                "amp": amp,
                "first_two_steps_s": round(first, 2),
                "images_per_s": round(cfg.train.batch_size / seconds, 2),
                # every loss finite, and no step skipped for a non-finite one ("nonfinite": 1.0)
                "finite": bool(all(torch.isfinite(v).all() for v in logs.values()))
                and float(logs.get("nonfinite", 0.0)) == 0.0,
            }
        )
        (out / "train_options.json").write_text(json.dumps(rows, indent=2) + "\n")
        print(json.dumps(rows[-1]), flush=True)
        del state
    _report({"variants": rows})


STAGE_FUNCTIONS = {
    "environment": stage_environment,
    "build": stage_build,
    "gpu-tests": stage_gpu_tests,
    "memory-bench": stage_memory_bench,
    "train-step": stage_train_step,
    "sanitizer": stage_sanitizer,
    "profile": stage_profile,
    "train-options": stage_train_options,
    "cpu-kernels": stage_cpu_kernels,
}


def _run_here(name: str, out: Path, dry_run: bool) -> None:
    """One stage in this process, as the driver starts it. It first reports the shared settings
    it inherited, so the summary shows that every stage built and loaded with the same ones."""
    print(STAGE_ENV_PREFIX + json.dumps({key: os.environ.get(key) for key in SHARED_SETTINGS}), flush=True)
    # A driver started in the background of a shell ignores SIGINT, and so would this stage: the
    # driver's SIGINT must still stop it (a Python handler, unlike SIG_IGN, is not inherited).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    STAGE_FUNCTIONS[name](out, dry_run)


# --- the driver


def _device_capabilities() -> list[str]:
    """The visible GPUs' compute capabilities ("9.0"), from nvidia-smi: no torch import and no
    CUDA context in the driver, which lives as long as the whole run."""
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return []
    command = [nvidia_smi, "--query-gpu=compute_cap", "--format=csv,noheader"]
    if os.environ.get("CUDA_VISIBLE_DEVICES"):  # indices or UUIDs, as nvidia-smi --id takes them
        command.append(f"--id={os.environ['CUDA_VISIBLE_DEVICES']}")
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    found = {line.strip() for line in run.stdout.splitlines() if re.fullmatch(r"\d+\.\d+", line.strip())}
    return sorted(found, key=lambda c: tuple(map(int, c.split(".")))) if run.returncode == 0 else []


def _arch_list() -> tuple[str, str]:
    """The GPU architectures to build for, fixed once for every stage, and where they came from.
    torch's JIT build writes the list into its ninja file: a stage that saw another list than the
    build stage (torch's default of five architectures, say) would rebuild inside its own budget."""
    if os.environ.get(ARCH_LIST):
        return os.environ[ARCH_LIST], f"{ARCH_LIST} as set"
    capabilities = _device_capabilities()
    if capabilities:
        return " ".join(capabilities), "the visible GPUs (nvidia-smi)"
    return FALLBACK_ARCH_LIST, "no GPU answered nvidia-smi: the H200's"


def _stage_command(stage: Stage, out: Path, dry_run: bool) -> list[str]:
    command = [sys.executable, "-m", "benchmarks.device_check", str(out), "--stage", stage.name]
    return [*command, "--dry-run"] if dry_run else command


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    """``signum`` to the stage and every process it started (its own process group)."""
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:  # the whole group has exited already
        pass


def _stop(process: subprocess.Popen, grace_s: float) -> tuple[str, str]:
    """Stops a late stage: SIGINT, up to ``grace_s`` for it to finish its reports, then SIGKILL.
    Returns its output (communicate keeps what it read before a timeout) and what it took."""
    _signal_group(process, signal.SIGINT)
    try:
        output, _ = process.communicate(timeout=grace_s)
        return output or "", "SIGINT; it stopped within the grace period"
    except subprocess.TimeoutExpired:
        pass
    _signal_group(process, signal.SIGKILL)
    try:
        output, _ = process.communicate(timeout=GRACE_S)
    except subprocess.TimeoutExpired:  # a process outside the group still holds the pipe open
        process.stdout.close()
        process.wait()
        output = "(output lost: a process outside the stage's group kept its pipe open)"
    return output or "", f"SIGINT, then SIGKILL after {grace_s:.0f} s"


def _run_stage(
    stage: Stage, out: Path, dry_run: bool, log: TextIO, budget_s: int, deadline: float, env: dict[str, str]
) -> dict:
    command = _stage_command(stage, out, dry_run)
    log.write(f"\n===== {stage.name} (budget {budget_s} s) =====\n$ {' '.join(command)}\n")
    log.flush()
    start = time.perf_counter()
    record: dict = {"stage": stage.name, "budget_s": budget_s, "expected_s": stage.expected_s}
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**env, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: a signal to it reaches pytest, ninja, ...
    )
    try:
        output, _ = process.communicate(timeout=None if dry_run else budget_s)
        record["status"] = "passed" if process.returncode == 0 else f"failed (exit {process.returncode})"
    except subprocess.TimeoutExpired:
        grace_s = max(1.0, min(GRACE_S, deadline - time.perf_counter()))
        output, how = _stop(process, grace_s)
        record["status"] = f"stopped after its {budget_s} s budget ({how})"
    except KeyboardInterrupt:  # Ctrl-C reaches only the driver: the stage has a session of its own
        _stop(process, GRACE_S)
        raise
    record["seconds"] = round(time.perf_counter() - start, 1)
    logged = []
    for line in output.splitlines():
        for prefix, key in ((RESULT_PREFIX, "result"), (STAGE_ENV_PREFIX, "settings_seen")):
            if line.startswith(prefix):
                try:
                    record[key] = json.loads(line[len(prefix) :])
                    break
                except json.JSONDecodeError:  # cut short by SIGKILL: keep it in the log
                    pass
        else:
            logged.append(line)
    log.write("".join(line + "\n" for line in logged))
    log.flush()
    if record["status"] != "passed":
        record["output_tail"] = logged[-20:]
    return record


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _quote_error(text: str, limit: int = 1500) -> str:
    """A build error short enough for an environment variable and a table cell: the lines that name
    an error, else the last ones, each clipped (torch's message puts the compiler's whole command
    line before the compiler's ``error:`` lines)."""
    lines = [_clip(line.strip(), 300) for line in text.splitlines() if line.strip()]
    return _clip(" | ".join([line for line in lines if "error" in line.lower()] or lines[-5:]), limit)


def _build_failure(record: dict) -> str | None:
    """Why the later stages must not use the cpp backend, or None when the build stage passed."""
    if record["status"] == "passed":
        return None
    error = record.get("result", {}).get("error") or "\n".join(record.get("output_tail", []))
    return _quote_error(f"the build stage {record['status']}: {error}")


def _markdown(settings: dict, records: list[dict]) -> str:
    lines = [
        f"Every stage ran with `{ARCH_LIST}={settings['arch_list']}` ({settings['arch_list_source']})"
        f" and one fresh `{EXTENSIONS_DIR}`.",
        "",
        "| stage | status | seconds | expected on H200 |",
        "|---|---|---:|---:|",
    ]
    lines += [f"| {r['stage']} | {r['status']} | {r['seconds']} | {r['expected_s']} |" for r in records]
    skipped = [r["stage"] for r in records if r.get("cpp_skipped")]
    if skipped:
        reason = next(r["cpp_skipped"] for r in records if r.get("cpp_skipped"))
        lines += ["", f"The cpp backend was skipped in {', '.join(skipped)}: {reason}"]
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
        _run_here(args.stage, out, args.dry_run)
        return 0

    records: list[dict] = []
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    deadline = time.perf_counter() + args.total_budget
    arch_list, arch_source = _arch_list()
    # Fresh per run: a JIT build killed mid-way leaves a lock file in its build folder on which
    # every later load of the extension waits (torch 2.11), and a cache from another torch or
    # another arch list would be rebuilt inside some stage's budget anyway.
    extensions_dir = tempfile.mkdtemp(prefix="dmgan-device-check-extensions-")
    env = {**os.environ, ARCH_LIST: arch_list, EXTENSIONS_DIR: extensions_dir}
    env.pop(SKIP_CPP, None)  # set below only when this run's build fails
    settings = {"arch_list": arch_list, "arch_list_source": arch_source, "extensions_dir": extensions_dir}
    try:
        with open(out / "log.txt", "w") as log:
            for stage in STAGES:
                if args.only and stage.name not in args.only:
                    continue
                budget = min(stage.budget_s, int(deadline - time.perf_counter()) - GRACE_S)
                if budget < min(stage.budget_s, MIN_STAGE_S) and not args.dry_run:
                    record = {"stage": stage.name, "budget_s": 0, "expected_s": stage.expected_s}
                    record.update(seconds=0.0, status="skipped: the shared deadline had passed")
                else:
                    record = _run_stage(stage, out, args.dry_run, log, budget, deadline, env)
                if SKIP_CPP in env:
                    record["cpp_skipped"] = env[SKIP_CPP]
                if stage.name == "build" and (reason := _build_failure(record)):
                    env[SKIP_CPP] = reason  # later stages: cpp unavailable, no rebuild in their budgets
                records.append(record)
                print(f"{record['stage']:13s} {record['status']:35s} {record['seconds']:7.1f} s", flush=True)
                summary = {
                    "started": started,
                    "dry_run": args.dry_run,
                    "settings": settings,
                    "stages": records,
                }
                (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")  # after every stage
                (out / "summary.md").write_text(_markdown(settings, records))
    finally:
        shutil.rmtree(extensions_dir, ignore_errors=True)
    return 0 if all(r["status"] == "passed" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
