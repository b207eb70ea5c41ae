"""Profile a few training steps: torch.profiler, GPU state through NVML, a roofline of the memory ops.

    .venv/bin/python -m benchmarks.profile                         # bird on a GPU, shapes on a CPU
    .venv/bin/python -m benchmarks.profile --preset bird --batch-size 10 --memory-backend triton --amp bf16

Writes into ``--out`` (default ``benchmarks/profile/<device>``):

- ``trace.json``: Chrome trace of the profiled steps (open in chrome://tracing or Perfetto);
- ``summary.json``: the device, the top operators by self time, NVML readings taken every 50 ms
  during the profiled steps (name, SM and memory clocks, power, memory used, utilisation; or
  "NVML unavailable" with the reason), the measured peaks (copy bandwidth, matmul flop/s) and, per
  memory op at each refinement stage's shape, its time, bytes, flops and achieved rates;
- ``roofline.png``: those memory ops against the measured bandwidth and compute ceilings.

Bytes count each tensor once (the minimum traffic); flops follow the cost model in RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any

import torch

from dmgan import ops
from dmgan.config import get_preset, override
from dmgan.ops.parity import ReadShape, WriteShape, read_case, write_case
from dmgan.training_step import TrainingState, synthetic_batch

VOCAB = 100


class NvmlSampler:
    """Reads the GPU through NVML in a background thread (``nvidia-ml-py``)."""

    def __init__(self, device_index: int, interval_s: float = 0.05) -> None:
        self.samples: list[dict[str, float]] = []
        self.error: str | None = None
        self.interval_s = interval_s
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            self.name = pynvml.nvmlDeviceGetName(self.handle)
        except Exception as e:  # no driver, no GPU, no library
            self.error = f"NVML unavailable: {type(e).__name__}: {e}"
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> dict[str, float]:
        n, h = self.nvml, self.handle
        util = n.nvmlDeviceGetUtilizationRates(h)
        return {
            "sm_clock_mhz": n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM),
            "memory_clock_mhz": n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_MEM),
            "power_w": n.nvmlDeviceGetPowerUsage(h) / 1000,
            "memory_used_mib": n.nvmlDeviceGetMemoryInfo(h).used / 2**20,
            "gpu_utilisation_pct": util.gpu,
            "memory_utilisation_pct": util.memory,
        }

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._read())
            time.sleep(self.interval_s)

    def __enter__(self) -> NvmlSampler:
        if self.error is None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def summary(self) -> dict[str, Any]:
        if self.error is not None:
            return {"available": False, "reason": self.error}
        keys = self.samples[0].keys() if self.samples else []
        return {
            "available": True,
            "name": self.name,
            "samples": len(self.samples),
            **{
                k: {
                    "mean": sum(s[k] for s in self.samples) / len(self.samples),
                    "max": max(s[k] for s in self.samples),
                }
                for k in keys
            },
        }


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int = 10) -> float:
    """Median seconds per call after a warm-up."""
    fn()
    synchronize(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measured_peaks(device: str) -> dict[str, float]:
    """Copy bandwidth (bytes read + written per second) and matmul flop/s in fp32 and bf16."""
    n = 2**26 if device == "cuda" else 2**24
    x = torch.empty(n, device=device)
    y = torch.empty_like(x)
    copy_s = timed(lambda: y.copy_(x), device)
    peaks = {"copy_bytes_per_s": 2 * x.numel() * 4 / copy_s}
    size = 4096 if device == "cuda" else 512
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(size, size, device=device, dtype=dtype)
        peaks[f"matmul_{str(dtype).removeprefix('torch.')}_flop_per_s"] = (
            2 * size**3 / timed(lambda a=a: a @ a, device)
        )
    return peaks


def step_phases(prof: torch.profiler.profile, steps: int, on_gpu: bool) -> dict[str, float]:
    """Milliseconds per step of each named range of TrainingState.step (``dmgan.<phase>``, from
    dmgan.training_step.phase): the device's time on a GPU, the host's on a CPU."""
    rows = {}
    for event in prof.key_averages():
        if event.key.startswith("dmgan."):
            total = getattr(event, "device_time_total", 0.0) if on_gpu else event.cpu_time_total
            rows[event.key.removeprefix("dmgan.")] = round(total / 1e3 / steps, 3)
    return rows


def memory_op_costs(cfg, batch: int, dtype: torch.dtype, device: str, backend: str) -> list[dict[str, Any]]:
    """Time, bytes, flops of memory writing and reading at each refinement stage's shape (forward)."""
    m, size = cfg.model, torch.finfo(dtype).bits // 8
    t = cfg.text.words_num
    rows = []
    for stage, side in enumerate(m.image_sizes[:-1], start=1):  # stage i refines the image of size side
        n, c = side * side, m.gf_dim
        read = read_case(ReadShape(batch, c, side, side, (t,) * batch), dtype, device)
        seconds = timed(lambda read=read: ops.memory_read(**read, backend=backend), device)
        bytes_ = size * (2 * batch * c * n + 2 * batch * c * t) + batch * t
        flops = batch * n * (4 * c * t + 5 * t + 4 * c + 3 * c)
        rows.append(
            {
                "op": "memory_read",
                "stage": stage,
                "shape": f"B{batch} C{c} {side}x{side} T{t}",
                "seconds": seconds,
                "bytes": bytes_,
                "flops": flops,
            }
        )
        write = write_case(WriteShape(batch, m.embedding_dim, c, t), dtype, device)
        seconds = timed(lambda write=write: ops.memory_write(**write, backend=backend), device)
        nw, nm = m.embedding_dim, 2 * c
        bytes_ = size * (batch * nw * t + batch * c + 2 * batch * c * t + nm * (nw + c) + 2 * c * nm)
        flops = 2 * batch * t * (nm * nw + 2 * c * nm + nw) + 2 * batch * nm * c
        rows.append(
            {
                "op": "memory_write",
                "stage": stage,
                "shape": f"B{batch} Nw{nw} C{c} T{t}",
                "seconds": seconds,
                "bytes": bytes_,
                "flops": flops,
            }
        )
    for row in rows:
        row["bytes_per_s"] = row["bytes"] / row["seconds"]
        row["flop_per_s"] = row["flops"] / row["seconds"]
    return rows


def roofline(
    rows: list[dict[str, Any]], peaks: dict[str, float], flops_key: str, path: Path, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bandwidth, compute = peaks["copy_bytes_per_s"], peaks[flops_key]
    intensities = [r["flops"] / r["bytes"] for r in rows]
    lo, hi = min(intensities + [0.1]) / 4, max(intensities + [compute / bandwidth]) * 4
    xs = [lo * (hi / lo) ** (i / 99) for i in range(100)]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [min(compute, x * bandwidth) for x in xs], color="black", label="measured ceilings")
    for row, intensity in zip(rows, intensities):
        ax.scatter(intensity, row["flop_per_s"], label=f"{row['op']} stage {row['stage']}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (flop / byte)")
    ax.set_ylabel("flop / s")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="bird" if on_gpu else "shapes")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=3, help="profiled steps (after two warm-up steps)")
    p.add_argument("--memory-backend", default="auto")
    p.add_argument("--amp", default="bf16" if on_gpu else "off", choices=["off", "bf16", "fp16"])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="GROUP.FIELD=VALUE")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    changes: dict[str, Any] = {}
    for item in args.overrides:
        key, _, value = item.partition("=")
        changes[key] = json.loads(value)
    cfg = override(get_preset(args.preset), **changes)
    batch_size = args.batch_size or cfg.train.batch_size
    out = args.out or Path("benchmarks") / "profile" / (
        torch.cuda.get_device_name().replace(" ", "-") if on_gpu else "cpu"
    )
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    gan = TrainingState.build(cfg, VOCAB, device=device, amp=args.amp, memory_backend=args.memory_backend)
    batch = synthetic_batch(cfg, VOCAB, batch_size, device)
    for _ in range(2):  # warm-up: extension builds, Triton compiles, cuDNN picks algorithms
        gan.step(batch)
    synchronize(device)
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if on_gpu else []
    )
    with (
        NvmlSampler(torch.cuda.current_device() if on_gpu else 0) as nvml,
        torch.profiler.profile(activities=activities) as prof,
    ):
        start = time.perf_counter()
        for _ in range(args.steps):
            gan.step(batch)
        synchronize(device)
        seconds = time.perf_counter() - start
    prof.export_chrome_trace(str(out / "trace.json"))
    sort_key = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
    top = [
        {"name": e.key, "calls": e.count, "self_ms": getattr(e, sort_key) / 1e3}
        for e in sorted(prof.key_averages(), key=lambda e: getattr(e, sort_key), reverse=True)[:25]
    ]

    phases = step_phases(prof, args.steps, on_gpu)

    dtype = torch.bfloat16 if args.amp == "bf16" else torch.float16 if args.amp == "fp16" else torch.float32
    peaks = measured_peaks(device)
    rows = memory_op_costs(cfg, batch_size, dtype, device, args.memory_backend)
    flops_key = "matmul_float32_flop_per_s" if dtype == torch.float32 else "matmul_bfloat16_flop_per_s"
    device_name = torch.cuda.get_device_name() if on_gpu else "cpu"
    roofline(
        rows,
        peaks,
        flops_key,
        out / "roofline.png",
        f"{device_name}: memory ops, {cfg.name} B{batch_size} {str(dtype).removeprefix('torch.')}",
    )
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "device": device_name,
        "torch": torch.__version__,
        "preset": cfg.name,
        "batch_size": batch_size,
        "amp": args.amp,
        "memory_backend": args.memory_backend,
        "backends_available": ops.available_backends(device),
        "profiled_steps": args.steps,
        "seconds_per_step": seconds / args.steps,
        "images_per_s": batch_size * args.steps / seconds,
        "nvml": nvml.summary(),
        "measured_peaks": peaks,
        "memory_ops": rows,
        "phases_ms_per_step": phases,
        "top_operators": top,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not summary["nvml"]["available"]:
        print(summary["nvml"]["reason"] + " (profiled the CPU path)")
    print(
        f"{summary['images_per_s']:.1f} images/s; per step: "
        + ", ".join(f"{k} {v:.1f} ms" for k, v in phases.items())
    )
    print(f"wrote {out}/trace.json, summary.json, roofline.png")
    return summary


if __name__ == "__main__":
    main()
