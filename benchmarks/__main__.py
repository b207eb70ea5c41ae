"""``python -m benchmarks``: the whole benchmark run in one command (the project's ``make bench``).

Runs the memory-op and training-step suites with timing on, saves pytest-benchmark's JSON under
``benchmarks/results/<device>-<date>.json``, renders its tables (markdown, to stdout and next to
the JSON) and the bar chart of the speed-ups, then profiles a few training steps
(``benchmarks/profile.py``). Extra arguments go to pytest, e.g. ``-k "128x128 and float32"``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks import profile, render_results

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    device = torch.cuda.get_device_name().replace(" ", "-") if torch.cuda.is_available() else "cpu"
    stem = HERE / "results" / f"{device}-{time.strftime('%Y-%m-%d')}"
    stem.parent.mkdir(exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pytest",
        str(HERE / "test_bench_memory.py"),
        str(HERE / "test_bench_train_step.py"),
        "--benchmark-enable",
        "--benchmark-group-by=param:read_shape,param:write_shape,param:dtype,param:direction",
        f"--benchmark-json={stem}.json",
        "-q",
        *argv,
    ]
    print("$", " ".join(command), flush=True)
    code = subprocess.call(command)
    if code != 0:
        return code
    report = json.loads(Path(f"{stem}.json").read_text())
    tables = render_results.render(report)
    Path(f"{stem}.md").write_text(tables + "\n")
    render_results.chart(report, Path(f"{stem}.png"))
    print(tables)
    profile.main(["--out", str(HERE / "profile" / device)])
    print(f"results: {stem}.json, {stem}.md, {stem}.png and benchmarks/profile/{device}/")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
