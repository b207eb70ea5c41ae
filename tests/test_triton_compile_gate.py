"""The GPU compile gate without a GPU (python -m dmgan.kernels.compile_gate): every Triton kernel,
planned exactly as its launcher launches it, compiles for sm_80, 86, 89, 90 and 120 without
register spills and within each architecture's shared memory, at the presets' sizes (N_r 32 / 64,
captions of 16 to 25 words) in bf16 and fp32 (fp16 on sm_86 too)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists(),
        reason="this triton build ships no NVIDIA backend",
    ),
]
ALL_ARCHS = ("80", "86", "89", "90", "120")
SHIPPED = ["--channels", "32", "64", "--words", "16", "18", "25"]
KERNELS = {
    "memory_read_forward_kernel",
    "memory_read_backward_kernel",
    "memory_write_forward_kernel",
    "memory_write_backward_kernel",
}
# Known spills at the shipped sizes, each with its bound, keyed by (kernel, arch, dtype, N_r, legacy
# mask, channels-last): the fp32 backward with the reference's (legacy) padding mask on sm_80 holds
# a per-pixel mask tile beside its fp32 FMA dots (no setting of pixels per program or warps removes
# it there; sm_86 / 89 / 90 / 120 have none). Channels-last tiles load along the channels, and the
# layout conversions for the dots take registers: three launches that sit at 255 registers spill
# a word or two (4 to 8 B; sm_86 / 89 / 90 none). On sm_120 the binary Triton builds (its ptxas
# options, --regAllocOptLevel=2 in triton 3.8) spills a few words more: in both channels-last
# reading backwards and in the fp32 write backward (12 B at N_r 32, 4 B at 64).
KNOWN_SPILLS = {
    ("memory_read_backward_kernel", 80, "float32", 64, True, False): 256,
    ("memory_read_backward_kernel", 80, "bfloat16", 32, False, True): 16,
    ("memory_read_forward_kernel", 80, "float32", 32, False, True): 16,
    ("memory_read_backward_kernel", 120, "float32", 64, False, True): 16,
    ("memory_read_backward_kernel", 120, "bfloat16", 64, False, True): 16,
    ("memory_write_backward_kernel", 120, "float32", 32, False, False): 12,
    ("memory_write_backward_kernel", 120, "float32", 64, False, False): 4,
}


def _known_spill_bound(r: dict) -> int:
    legacy, nhwc = "LEGACY_MASK=True" in r["config"], "CHANNELS_LAST=True" in r["config"]
    return KNOWN_SPILLS.get((r["kernel"], r["arch"], r["dtype"], r["channels"], legacy, nhwc), 0)


def _gate(arguments: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess, list[dict]]:
    report = tmp_path / "gate.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from a cache
    command = [sys.executable, "-m", "dmgan.kernels.compile_gate", *arguments, "--json", str(report)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
    print(result.stdout[-6000:])
    return result, (json.loads(report.read_text()) if report.exists() else [])


@pytest.mark.parametrize(
    "dtypes", [["bfloat16", "float32"], ["float16"]], ids=["bf16-fp32-every-arch", "fp16-sm86"]
)
def test_shipped_kernels_compile_without_spills_within_shared_memory(dtypes, tmp_path):
    archs = ALL_ARCHS if "bfloat16" in dtypes else ("86",)
    result, results = _gate(["--arch", *archs, "--dtype", *dtypes, *SHIPPED, "--allow-spills"], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not [r for r in results if r["problem"]]
    spills = [r for r in results if r["spill_bytes"] > _known_spill_bound(r)]
    assert not spills, [(r["kernel"], r["arch"], r["dtype"], r["config"], r["spill_bytes"]) for r in spills]
    assert {r["kernel"] for r in results} == KERNELS
    assert {str(r["arch"]) for r in results} == set(archs)
    assert {r["dtype"] for r in results} == set(dtypes)
    assert all(0 < r["registers"] <= 255 and 0 < r["shared_bytes"] <= r["shared_limit"] for r in results)
    # Residency and waves are reported for every launch: each fits at least once on its GPU.
    assert all(r["resident_per_sm"] >= 1 and r["programs"] >= 1 and r["waves"] > 0 for r in results)
    if "bfloat16" in dtypes:  # the bird preset's reading in bf16 on an H200: built for occupancy
        bird = [
            r for r in results
            if r["arch"] == 90 and r["dtype"] == "bfloat16" and r["channels"] == 64 and r["words"] in (16, 18)
            and r["kernel"].startswith("memory_read")
        ]  # fmt: skip
        assert {r["kernel"] for r in bird} == {"memory_read_forward_kernel", "memory_read_backward_kernel"}
        for r in bird:
            stages = int(r["config"].rpartition("stages=")[2])
            assert r["resident_per_sm"] >= 2 and r["spill_bytes"] == 0 and r["waves"] <= 1 and stages >= 2, r


@pytest.mark.parametrize(
    ("arch", "registers", "threads", "shared", "expected"),
    [
        (90, 255, 256, 23_552, 1),  # 64 K registers hold one 256-thread program at 255 a thread
        (90, 128, 128, 8_192, 4),  # 128 registers x 128 threads: four
        (90, 32, 64, 0, 32),  # the block-slot limit
        (86, 64, 256, 60_000, 1),  # shared memory: 100 KiB a multiprocessor on sm_86
        (86, 32, 1024, 0, 1),  # threads: 1,536 on sm_86
    ],
)
def test_residency_follows_the_scarcest_resource(arch, registers, threads, shared, expected):
    from dmgan.kernels.compile_gate import resident_programs

    assert resident_programs(arch, registers, threads, shared) == expected


def test_the_gate_refuses_shared_memory_above_the_architecture_limit(tmp_path):
    """Pipelining the fp32 write forward's loop over N_w chunks at N_r = 128 buffers its weight
    chunks in shared memory: four stages need more than the 99 KB a block may use on sm_86, and
    the gate must say so (the launcher uses one stage; Triton's default of three, with the 3xTF32
    dots of earlier versions, needed 114,688 B)."""
    common = [
        "--arch",
        "86",
        "--dtype",
        "float32",
        "--channels",
        "128",
        "--words",
        "18",
        "--kernel",
        "memory_write_forward_kernel",
        "--allow-spills",
    ]
    result, (pipelined,) = _gate([*common, "--num-stages", "4"], tmp_path)
    assert result.returncode == 1
    assert pipelined["shared_bytes"] > 101_376 and "above the sm_86 limit" in pipelined["problem"]
    result, (launched,) = _gate(common, tmp_path)
    assert result.returncode == 0 and launched["shared_bytes"] <= 101_376 and not launched["problem"]
