"""Render a pytest-benchmark JSON of the benchmarks/ suites as markdown tables.

    python -m benchmarks.render_results benchmarks/results/cpu-memory-read.json --chart ratios.png

Memory ops: one table per (op, shape, dtype, direction), each implementation's median,
interquartile range, peak memory and speed-up over the reference code's form (eager-literal for
reading, eager-reference for writing); ``--chart`` draws those speed-ups as a bar chart.
Training step: images per second per memory backend and AMP mode, and the speed-up over the
eager memory op at the same AMP mode. Every ratio compares numbers from the same run.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

BASELINE = {"memory_read": "eager-literal", "memory_write": "eager-reference"}


def _collect(report: dict) -> tuple[dict[tuple, dict[str, dict]], list, dict]:
    """Memory-op stats grouped by (kind, shape, dtype, direction) → impl, training-step rows."""
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    train_rows, extra = [], {}
    for bench in report["benchmarks"]:
        extra = bench["extra_info"]
        if extra.get("kind") == "train_step":
            train_rows.append((extra, bench["stats"]))
            continue
        stats = {**bench["stats"], "peak_memory_bytes": extra.get("peak_memory_bytes")}
        groups[(extra.get("kind", "memory_read"), extra["shape"], extra["dtype"], extra["direction"])][
            extra["impl"]
        ] = stats
    return groups, train_rows, extra


def chart(report: dict, path: Path) -> None:
    """Bar chart of each implementation's speed-up over the baseline, one group of bars per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups, _, extra = _collect(report)
    cases = sorted(groups)
    impls = sorted({i for stats in groups.values() for i in stats})
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(cases)), 4))
    width = 0.8 / max(1, len(impls))
    for k, impl in enumerate(impls):
        ratios = []
        for case in cases:
            base = groups[case].get(BASELINE[case[0]], {}).get("median")
            mine = groups[case].get(impl, {}).get("median")
            ratios.append(base / mine if base and mine else 0.0)
        ax.bar([i + k * width for i in range(len(cases))], ratios, width, label=impl)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    ax.set_xticklabels(
        [f"{c[0].removeprefix('memory_')} {c[1].split('-T')[0]}\n{c[2]}\n{c[3]}" for c in cases], fontsize=7
    )
    ax.set_ylabel("speed-up over the reference form (x)")
    ax.set_title(f"dmgan memory ops, {extra.get('device', '?')}, torch {extra.get('torch', '?')}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def render(report: dict) -> str:
    machine = report.get("machine_info", {})
    lines = [
        f"Run {report.get('datetime', '?')[:19]} on {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}"
        f" ({machine.get('cpu', {}).get('count', '?')} logical CPUs), python {machine.get('python_version', '?')}.",
        "",
    ]
    groups, train_rows, extra = _collect(report)
    lines.append(f"torch {extra.get('torch', '?')}, device {extra.get('device', '?')}.")
    lines.append("")
    for (kind, shape, dtype, direction), stats in sorted(groups.items()):
        base = stats.get(BASELINE[kind], {}).get("median")
        lines += [f"**{kind}, {shape}, {dtype}, {direction}**", ""]
        lines += [
            f"| implementation | median (ms) | IQR (ms) | peak memory (MiB) | speed-up vs {BASELINE[kind]} |",
            "|---|---:|---:|---:|---:|",
        ]
        for impl, s in sorted(stats.items(), key=lambda kv: kv[1]["median"]):
            ratio = f"{base / s['median']:.2f}x" if base else "n/a"
            peak = s.get("peak_memory_bytes")
            peak = f"{peak / 2**20:.1f}" if peak is not None else "n/a"
            lines.append(f"| {impl} | {s['median'] * 1e3:.3f} | {s['iqr'] * 1e3:.3f} | {peak} | {ratio} |")
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
    parser.add_argument(
        "--chart", type=Path, default=None, help="also write a bar chart of the speed-ups (PNG)"
    )
    args = parser.parse_args()
    report = json.loads(args.report.read_text())
    print(render(report))
    if args.chart:
        chart(report, args.chart)


if __name__ == "__main__":
    main()
