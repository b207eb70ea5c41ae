"""The whole training step of another commit and of this checkout, side by side in one run.

    python -m benchmarks.compare_step --ref eb8452b --rounds 5 --steps 10

Checks ``--ref`` out into a git worktree (once, with its own C++ extension built in place, CPU
kernels only), then times the shapes preset's step (synthetic batches, as
``benchmarks/test_bench_train_step.py``) in alternating rounds: each round runs every variant in
a fresh process for ``--steps`` steps after two warm-up steps, so a noisy machine slows all
variants alike. Variants: the reference commit with its defaults, this checkout with its
defaults, with each of ``--amp off`` and ``--amp bf16``, and with ``--channels-last on``
(``--variants`` picks some). Prints a table of median images/s and the ratios to the reference;
``--json`` keeps every round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run in the commit's own checkout: it imports that commit's dmgan, whatever its module layout.
CHILD = r"""
import json, sys, time, torch
try:
    from dmgan.training_step import TrainingState, synthetic_batch
    from dmgan.runtime import default_amp
    pick_amp = lambda device: default_amp(device)[0]
except ImportError:
    try:  # the training state was dmgan.trainer.GAN (90c120d and older)
        from dmgan.trainer import GAN as TrainingState, synthetic_batch
        from dmgan.run import default_amp
        pick_amp = lambda device: default_amp(device)[0]
    except ImportError:  # before dmgan/trainer.py (eb8452b and older)
        from dmgan.train import GAN as TrainingState, default_amp as pick_amp, synthetic_batch
from dmgan.config import get_preset
amp, steps, options = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
torch.manual_seed(0)
cfg = get_preset("shapes")
amp = pick_amp(torch.device("cpu")) if amp == "default" else amp
state = TrainingState.build(cfg, 100, device="cpu", amp=amp, **options)
batch = synthetic_batch(cfg, 100, cfg.train.batch_size, "cpu")
for _ in range(2):
    state.step(batch)
start = time.perf_counter()
for _ in range(steps):
    logs = state.step(batch)
float(logs["nonfinite"])
seconds = (time.perf_counter() - start) / steps
print(json.dumps({"amp": amp, "seconds_per_step": seconds, "images_per_s": cfg.train.batch_size / seconds}))
"""


# This checkout's variants: (label suffix, amp, TrainingState.build options).
VARIANTS = {
    "defaults": (" (its defaults)", "default", {}),
    "amp-off": (", --amp off", "off", {}),
    "amp-bf16": (", --amp bf16", "bf16", {}),
    "channels-last": (", --channels-last on", "default", {"channels_last": True}),
}


def worktree(ref: str) -> Path:
    """``ref`` checked out beside this one, with its own C++ extension built in place (CPU
    kernels): without it, ``import dmgan._C`` there falls through to this checkout's extension
    when this one is installed editable, and the reference would time this checkout's kernels."""
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"dmgan-{ref}"
    if not path.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), ref], cwd=ROOT, check=True)
    if not list((path / "dmgan").glob("_C*.so")):
        env = {**os.environ, "DMGAN_SKIP_CUDA": "1"}
        command = [sys.executable, "setup.py", "build_ext", "--inplace"]
        subprocess.run(command, cwd=path, env=env, check=True, capture_output=True)
    return path


def _child_env(checkout: Path, threads: int | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(checkout), "DMGAN_SKIP_CUDA": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env.pop("TRITON_INTERPRET", None)
    return env


def check_own_extension(checkout: Path) -> None:
    """Refuse a checkout whose processes would import another checkout's dmgan._C."""
    check = "import sys, torch, dmgan._C; sys.exit(not dmgan._C.__file__.startswith(sys.argv[1]))"
    command = [sys.executable, "-c", check, str(checkout)]
    if subprocess.run(command, cwd=checkout, env=_child_env(checkout, None)).returncode:
        raise RuntimeError(f"{checkout} would not import its own dmgan._C")


def time_variant(checkout: Path, amp: str, options: dict, steps: int, threads: int | None) -> dict:
    env = _child_env(checkout, threads)
    result = subprocess.run(
        [sys.executable, "-c", CHILD, amp, str(steps), json.dumps(options)],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{checkout} --amp {amp} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default="eb8452b", help="the commit to compare against")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, help="write every round here")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=list(VARIANTS),
        help="this checkout's variants",
    )
    args = parser.parse_args(argv)
    variants = {f"{args.ref} (its defaults)": (worktree(args.ref), "default", {})}
    variants.update({f"this checkout{VARIANTS[v][0]}": (ROOT, *VARIANTS[v][1:]) for v in args.variants})
    for checkout in {checkout for checkout, _, _ in variants.values()}:
        check_own_extension(checkout)
    rounds: dict[str, list[dict]] = {name: [] for name in variants}
    for r in range(args.rounds):
        for name, (checkout, amp, options) in variants.items():
            rounds[name].append(time_variant(checkout, amp, options, args.steps, args.threads))
            print(f"round {r + 1}: {name:32s} {rounds[name][-1]['images_per_s']:7.1f} images/s", flush=True)
    medians = {name: statistics.median(x["images_per_s"] for x in runs) for name, runs in rounds.items()}
    reference = medians[f"{args.ref} (its defaults)"]
    print("\n| variant | amp | images/s (median) | vs the reference |\n|---|---|---:|---:|")
    for name, runs in rounds.items():
        print(f"| {name} | {runs[0]['amp']} | {medians[name]:.1f} | {medians[name] / reference:.2f}x |")
    if args.json:
        args.json.write_text(
            json.dumps({"ref": args.ref, "rounds": rounds, "medians": medians}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
