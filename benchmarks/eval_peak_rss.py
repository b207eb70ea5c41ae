"""Peak resident memory of one ``python -m dmgan.evaluate`` command, in a fresh process.

    python -m benchmarks.eval_peak_rss -- CHECKPOINT --num-images 1000 --save-images DIR --no-fid
    python -m benchmarks.eval_peak_rss --json out.json -- CHECKPOINT --images DIR --workers 1

The command runs in a new interpreter (so nothing this process imported or allocated counts),
which reports ``getrusage(RUSAGE_SELF).ru_maxrss`` when it ends: the evaluating process's peak.
Not its children's: Linux counts in a forked child's peak every page it shares with its parent
at the fork (a DataLoader worker of ``--images``, the ``git`` that the environment record runs),
so RUSAGE_CHILDREN reports about the parent's own size, not what a worker adds. Memory, not
time, is the figure: the wall time is printed only to say what ran.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# Runs in the child: the evaluation, then its peak RSS (Linux reports ru_maxrss in KiB) as the
# last line of stdout, whether the evaluation returned or raised SystemExit.
CHILD = """
import json, resource, sys
from dmgan.evaluate import main
try:
    main(sys.argv[1:])
finally:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("PEAK_RSS " + json.dumps({"self_kib": own}), flush=True)
"""


def measure(evaluate_args: list[str]) -> dict:
    """Run ``dmgan.evaluate`` with ``evaluate_args`` in a fresh interpreter; its peak RSS in MiB."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *evaluate_args], capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - started
    lines = [line for line in done.stdout.splitlines() if line.startswith("PEAK_RSS ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"evaluate failed ({done.returncode}):\n{done.stderr[-4000:]}")
    peak = json.loads(lines[-1].removeprefix("PEAK_RSS "))
    return {
        "command": "python -m dmgan.evaluate " + " ".join(evaluate_args),
        "peak_rss_mib": round(peak["self_kib"] / 1024, 1),
        "wall_s": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, default=None, help="also append the result to this JSON-lines file")
    p.add_argument(
        "evaluate_args", nargs=argparse.REMAINDER, help="after --: the arguments of dmgan.evaluate"
    )
    args = p.parse_args(argv)
    evaluate_args = args.evaluate_args[1:] if args.evaluate_args[:1] == ["--"] else args.evaluate_args
    result = measure(evaluate_args)
    print(json.dumps(result))
    if args.json is not None:
        with args.json.open("a") as f:
            f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
