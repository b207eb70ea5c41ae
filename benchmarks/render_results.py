"""Render a pytest-benchmark JSON of the benchmarks/ suites as markdown tables.

    python -m benchmarks.render_results benchmarks/results/cpu-memory-read.json

Memory reading: one table per (shape, dtype, direction), each implementation's median,
interquartile range and speed-up over the reference code's literal form (eager-literal).
Training step: images per second per memory backend and AMP mode, and the speed-up over the
eager memory op at the same AMP mode. Every ratio compares numbers from the same run.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def render(report: dict) -> str:
    machine = report.get("machine_info", {})
    lines = [
        f"Run {report.get('datetime', '?')[:19]} on {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}"
        f" ({machine.get('cpu', {}).get('count', '?')} logical CPUs), python {machine.get('python_version', '?')}.",
        "",
    ]
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    extra: dict = {}
    train_rows = []
    for bench in report["benchmarks"]:
        extra = bench["extra_info"]
        if extra.get("kind") == "train_step":
            train_rows.append((extra, bench["stats"]))
            continue
        groups[(extra["shape"], extra["dtype"], extra["direction"])][extra["impl"]] = bench["stats"]
    lines.append(f"torch {extra.get('torch', '?')}, device {extra.get('device', '?')}.")
    lines.append("")
    for (shape, dtype, direction), stats in sorted(groups.items()):
        base = stats.get("eager-literal", {}).get("median")
        lines += [f"**{shape}, {dtype}, {direction}**", ""]
        lines += [
            "| implementation | median (ms) | IQR (ms) | speed-up vs eager-literal |",
            "|---|---:|---:|---:|",
        ]
        for impl, s in sorted(stats.items(), key=lambda kv: kv[1]["median"]):
            ratio = f"{base / s['median']:.2f}x" if base else "n/a"
            lines.append(f"| {impl} | {s['median'] * 1e3:.2f} | {s['iqr'] * 1e3:.2f} | {ratio} |")
        lines.append("")
    if train_rows:
        lines += ["| preset, batch | memory op | AMP | median step (ms) | images/s | vs eager memory op |"]
        lines += ["|---|---|---|---:|---:|---:|"]
        eager = {e["amp"]: s["median"] for e, s in train_rows if e["memory_backend"] == "eager"}
        for e, s in sorted(train_rows, key=lambda r: (r[0]["amp"], r[1]["median"])):
            ratio = f"{eager[e['amp']] / s['median']:.2f}x" if e["amp"] in eager else "n/a"
            lines.append(
                f"| {e['preset']}, {e['batch']} | {e['memory_backend']} | {e['amp']} | {s['median'] * 1e3:.0f} "
                f"| {e['batch'] / s['median']:.1f} | {ratio} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    args = parser.parse_args()
    print(render(json.loads(args.report.read_text())))


if __name__ == "__main__":
    main()
