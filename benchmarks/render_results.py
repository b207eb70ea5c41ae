"""Render a pytest-benchmark JSON of benchmarks/test_bench_memory.py as markdown tables.

    python -m benchmarks.render_results benchmarks/results/cpu-memory-read.json

One table per (shape, dtype, direction): each implementation's median, interquartile range and
its speed-up over the reference code's literal form (eager-literal), measured in the same run.
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
    for bench in report["benchmarks"]:
        extra = bench["extra_info"]
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
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    args = parser.parse_args()
    print(render(json.loads(args.report.read_text())))


if __name__ == "__main__":
    main()
