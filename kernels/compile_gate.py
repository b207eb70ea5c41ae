"""Ahead-of-time compile gate: build every kernel for NVIDIA GPUs without a GPU.

    python -m kernels.compile_gate [--arch 86 89 90 120] [--json report.json]

Compiles each kernel, at the launch configuration its launcher uses, for each target architecture,
I/O dtype and channel count, with ``triton.compile`` and a ``GPUTarget``; reads registers, spill
stores and stack frame from ``ptxas -v`` (the ptxas that ships in the triton package). Exits non-zero on a compile error or a spill (``--allow-spills``: errors
only). Must run with TRITON_INTERPRET unset.

What it found (2026-11-24, triton 3.8): 16-bit I/O compiles without spills on every target at
every supported size (N_r <= 128, T <= 64). fp32 I/O (3xTF32 dots, about three times the operand
registers) is spill-free on sm_90 up to N_r = 64, T <= 32, and spills up to a few hundred bytes on
sm_86 / sm_89 / sm_120 and at N_r = 128: correct, and the slower path.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ARCHS = (86, 89, 90, 120)  # RTX 30xx, RTX 40xx, H100, RTX 50xx
IO_TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass
class Result:
    kernel: str
    arch: int
    dtype: str
    config: str
    registers: int = -1
    spill_bytes: int = -1
    stack_bytes: int = -1
    seconds: float = 0.0
    error: str = ""


def _signature(kernel, io_type: str, constexprs: dict[str, object]) -> dict[str, str]:
    """Argument types from the naming convention: *_part* buffers are fp32 partials, mask_ptr is
    uint8, other *_ptr arguments carry the I/O dtype, the rest are int32 sizes."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif "_part" in name:
            signature[name] = "*fp32"
        elif name == "mask_ptr":
            signature[name] = "*u8"
        elif name.endswith("_ptr"):
            signature[name] = f"*{io_type}"
        else:
            signature[name] = "i32"
    return signature


def _resource_usage(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill-store bytes, stack-frame bytes) from ``ptxas -v`` on the kernel's PTX,
    with the ptxas that ships in the triton package."""
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ptxas = bin_dir / (
        "ptxas-blackwell" if arch >= 100 and (bin_dir / "ptxas-blackwell").exists() else "ptxas"
    )
    target = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)  # e.g. sm_90a, as triton chose it
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        text = subprocess.run(
            [str(ptxas), "-v", f"--gpu-name={target}", str(source), "-o", str(Path(tmp) / "kernel.cubin")],
            capture_output=True, text=True, check=True,
        ).stderr  # fmt: skip

    def field(pattern: str) -> int:
        match = re.search(pattern, text)
        return int(match.group(1)) if match else 0

    return (
        field(r"Used (\d+) registers"),
        field(r"(\d+) bytes spill stores"),
        field(r"(\d+) bytes stack frame"),
    )


def compile_one(kernel, constexprs: dict[str, object], num_warps: int, arch: int, dtype: str) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    config = ",".join(f"{k}={v}" for k, v in constexprs.items()) + f",warps={num_warps}"
    result = Result(kernel.__name__, arch, dtype, config)
    start = time.perf_counter()
    try:
        target = GPUTarget("cuda", arch, 32)
        source = ASTSource(
            fn=kernel, signature=_signature(kernel, IO_TYPES[dtype], constexprs), constexprs=constexprs
        )
        options = make_backend(target).parse_options({"num_warps": num_warps, "num_stages": 1})
        compiled = triton.compile(source, target=target, options=options.__dict__)
        result.registers, result.spill_bytes, result.stack_bytes = _resource_usage(compiled.asm["ptx"], arch)
    except Exception as e:  # report every failure, keep compiling the rest
        result.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    result.seconds = time.perf_counter() - start
    return result


def kernel_specs(channels: int, t_pad: int, fp32: bool):
    """(kernel, constexprs, num_warps) for every kernel as its launcher configures it."""
    from kernels import memory_read, memory_write

    specs = []
    for legacy, attention in ((False, False), (True, True)):
        block_n, num_warps = memory_read.launch_config(channels, t_pad, backward=False, fp32=fp32)
        specs.append((
            memory_read.memory_read_forward_kernel,
            dict(C=channels, T_PAD=t_pad, BLOCK_N=block_n, LEGACY_MASK=legacy, WRITE_ATTENTION=attention,
                 DOT_FP32=fp32),
            num_warps,
        ))  # fmt: skip
        block_n, num_warps = memory_read.launch_config(channels, t_pad, backward=True, fp32=fp32)
        specs.append((
            memory_read.memory_read_backward_kernel,
            dict(C=channels, T_PAD=t_pad, BLOCK_N=block_n, LEGACY_MASK=legacy, DOT_FP32=fp32),
            num_warps,
        ))  # fmt: skip
    for kernel, backward in ((memory_write.memory_write_forward_kernel, False),
                             (memory_write.memory_write_backward_kernel, True)):  # fmt: skip
        config = memory_write.launch_config(channels, backward, fp32)
        num_warps = config.pop("num_warps")
        specs.append(
            (kernel, dict(NR=channels, BLOCK_T=memory_write.BLOCK_T, DOT_FP32=fp32, **config), num_warps)
        )
    return specs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=sorted(IO_TYPES))
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--t-pad", type=int, nargs="+", default=[64], help="padded word counts (16, 32, 64)")
    parser.add_argument("--json", type=Path, help="write the full report here")
    parser.add_argument("--allow-spills", action="store_true", help="report spills but fail only on errors")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the gate compiles real GPU code")

    results, seen = [], set()
    for arch, dtype, channels, t_pad in itertools.product(args.arch, args.dtype, args.channels, args.t_pad):
        for kernel, constexprs, num_warps in kernel_specs(channels, t_pad, fp32=dtype == "float32"):
            key = (arch, dtype, kernel.__name__, tuple(constexprs.items()), num_warps)
            if key in seen:  # the write kernels do not depend on T
                continue
            seen.add(key)
            result = compile_one(kernel, constexprs, num_warps, arch, dtype)
            results.append(result)
            status = (
                result.error
                or f"regs {result.registers:3d} spill {result.spill_bytes} B stack {result.stack_bytes} B"
            )
            print(f"sm_{arch} {dtype:8s} {result.kernel:30s} {result.config:60s} {status}", flush=True)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    errors = sum(bool(r.error) for r in results)
    spilled = sum(not r.error and r.spill_bytes != 0 for r in results)
    print(f"{len(results)} kernels: {errors} failed to compile, {spilled} spilled")
    return 1 if errors or (spilled and not args.allow_spills) else 0


if __name__ == "__main__":
    sys.exit(main())
