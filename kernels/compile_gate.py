"""Ahead-of-time compile gate: build every Triton kernel for NVIDIA GPUs, without a GPU.

    python -m dmgan.kernels.compile_gate [--arch 80 86 89 90 120] [--dtype bfloat16 float32]
                                         [--channels 32 64 128] [--words 16 18 25 64] [--json report.json]

For each architecture, dtype, channel count and caption length it plans the four ops' launches
exactly as their launchers do (:class:`dmgan.kernels._common.Launch`: the same grid, block sizes,
``num_warps``, ``num_stages`` and arguments) for a batch of 10 images of 64 x 64, binds the
arguments the way Triton's JIT does (so pointers and sizes get the same alignment and value
specialisation as at run time) and compiles with ``triton.compile`` for a ``GPUTarget``. From each
kernel it reads the registers, spill stores and stack frame (the ``ptxas -v`` log of the ptxas run
that built the binary, Triton's own with its options) and the shared memory, and compares that
with the architecture's per-block limit. From those and the architecture's per-multiprocessor
limits it derives how many programs (thread blocks) one multiprocessor holds at once, and, for the
bird preset's last stage (B 10, 128 x 128) on a typical GPU of that architecture, how many waves
the launch's grid takes. Exits non-zero on a compile error, a spill (``--allow-spills``: report
them) or shared memory above the limit. Must run with TRITON_INTERPRET unset; uses Triton's JIT
internals (triton 3.x).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import itertools
import json
import multiprocessing
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ARCHS = (80, 86, 89, 90, 120)  # A100, RTX 30xx, RTX 40xx, H100 / H200, RTX 50xx
# Dynamic shared memory a block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin), by architecture.
SHARED_MEMORY_PER_BLOCK = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448, 120: 101_376}
DTYPES = ("float32", "bfloat16", "float16")
BATCH, HEIGHT, WIDTH, WORD_DIM = 10, 64, 64, 256  # the bird preset's second stage
H200_MULTIPROCESSORS = 132  # sets the read backward's program count (a runtime size, so no recompile)
BIRD_LAST_STAGE = 128  # the image size the waves are counted at


@dataclass(frozen=True)
class Multiprocessor:
    """The per-multiprocessor limits that decide residency (CUDA C Programming Guide, "Compute
    Capabilities" table), and the multiprocessor count of a typical GPU of the architecture."""

    registers: int  # 32-bit registers
    shared_bytes: int  # shared memory a multiprocessor gives its blocks (1 KiB of each is reserved)
    threads: int
    blocks: int
    count: int
    gpu: str


MULTIPROCESSORS = {
    80: Multiprocessor(65_536, 167_936, 2048, 32, 108, "A100"),
    86: Multiprocessor(65_536, 102_400, 1536, 16, 82, "RTX 3090"),
    89: Multiprocessor(65_536, 102_400, 1536, 24, 128, "RTX 4090"),
    90: Multiprocessor(65_536, 233_472, 2048, 32, H200_MULTIPROCESSORS, "H200"),
    120: Multiprocessor(65_536, 102_400, 1536, 32, 170, "RTX 5090"),
}


def resident_programs(arch: int, registers: int, threads: int, shared_bytes: int) -> int:
    """Programs one multiprocessor runs at once: the least of what its registers (allocated per
    warp in units of 256), shared memory, threads and block slots allow."""
    sm = MULTIPROCESSORS[arch]
    warps = threads // 32
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_registers = (sm.registers // per_warp) // warps
    by_shared = sm.shared_bytes // (shared_bytes + 1024)
    return max(0, min(by_registers, by_shared, sm.threads // threads, sm.blocks))


@dataclass
class Result:
    kernel: str
    arch: int
    dtype: str
    channels: int
    words: int
    config: str
    registers: int = -1
    spill_bytes: int = -1
    stack_bytes: int = -1
    shared_bytes: int = -1
    shared_limit: int = -1
    threads: int = -1
    resident_per_sm: int = -1  # programs a multiprocessor holds at once
    programs: int = -1  # the grid at the bird preset's last stage
    waves: float = -1.0  # programs / (resident per multiprocessor x multiprocessors of a typical GPU)
    seconds: float = 0.0
    error: str = ""

    @property
    def problem(self) -> str:
        """What fails the gate for this kernel ("" when nothing does, spills aside)."""
        if self.error:
            return self.error
        if self.shared_bytes > self.shared_limit:
            return f"shared memory {self.shared_bytes} B above the sm_{self.arch} limit {self.shared_limit} B"
        return ""


@functools.lru_cache(maxsize=4)  # once per process: each kernel of a plan is a job of its own
def plans(
    dtype_name: str,
    channels: int,
    words: int,
    num_stages: int | None = None,
    size: int = HEIGHT,
    multiprocessors: int = H200_MULTIPROCESSORS,
) -> list:
    """The launches of the four ops (read forward in its training and its legacy-mask + attention
    variants, the read backward in both masks, both again for channels-last images, the write
    forward and backward) as planned for CPU stand-ins of the real tensors."""
    import torch

    from dmgan.kernels import memory_read, memory_write
    from dmgan.ops.parity import ReadShape, WriteShape, read_case, write_case

    dtype = getattr(torch, dtype_name)
    read = read_case(ReadShape(BATCH, channels, size, size, (words,) * BATCH), dtype)
    write = write_case(WriteShape(BATCH, WORD_DIM, channels, words), dtype)
    weights = tuple(write[k] for k in list(write)[2:])
    out, attention, empty = (
        torch.empty_like(read["img"]),
        torch.empty(BATCH, words, size, size),
        torch.empty(0),
    )
    launches = []
    programs = memory_read.backward_programs(BATCH, channels, size * size, words, dtype, multiprocessors)
    for legacy, attn in ((False, empty), (True, attention.to(dtype))):
        launches.append(memory_read.plan_forward(*read.values(), out, attn, legacy, multiprocessors))
        buffers = memory_read.backward_buffers(read["img"], words, programs)
        launches.append(memory_read.plan_backward(read["img"], *read.values(), buffers, legacy))
    # A channels-last model's launches: the same kernels with CHANNELS_LAST, whose strides are
    # compile-time constants (other register use, other spills).
    nhwc = {**read, "img": read["img"].contiguous(memory_format=torch.channels_last)}
    launches.append(
        memory_read.plan_forward(*nhwc.values(), torch.empty_like(nhwc["img"]), empty, False, multiprocessors)
    )
    buffers = memory_read.backward_buffers(nhwc["img"], words, programs)
    launches.append(memory_read.plan_backward(nhwc["img"], *nhwc.values(), buffers, False))
    keys = torch.empty(BATCH, channels, words, dtype=dtype)
    launches.append(memory_write.plan_forward(write["words"], write["rbar"], weights, keys, keys.clone()))
    buffers = memory_write.backward_buffers(write["words"], write["rbar"], weights)
    launches.append(memory_write.plan_backward(keys, keys, write["words"], write["rbar"], weights, buffers))
    if num_stages is not None:  # to see what another choice would need
        for launch in launches:
            launch.options["num_stages"] = num_stages
    return launches


def _bind(launch, backend):
    """Signature, constexprs, attributes and options as ``JITFunction.run`` derives them."""
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, _ = binder(*launch.args, **launch.options)
    return kernel._pack_args(backend, dict(launch.options), bound, specialization, None)


def _compile_with_ptxas_log(source, target, options: dict):
    """``triton.compile``, always from source (never from the cache, which skips ptxas), and the
    ``ptxas -v`` log of the ptxas run that made the binary: its registers are the binary's."""
    import triton
    from triton import knobs

    printed = io.StringIO()
    with (
        knobs.compilation.scope(),
        knobs.nvidia.scope(),
        contextlib.redirect_stdout(printed),  # where Triton prints the log
    ):
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(source, target=target, options=options)
    return compiled, printed.getvalue()


def _resource_usage(ptxas_log: str) -> tuple[int, int, int]:
    """(registers, spill-store bytes, stack-frame bytes) from a ``ptxas -v`` log."""
    if "registers" not in ptxas_log:
        raise RuntimeError(f"no ptxas -v log came back from triton.compile: {ptxas_log[-300:]!r}")

    def field(pattern: str) -> int:
        match = re.search(pattern, ptxas_log)
        return int(match.group(1)) if match else 0

    return (
        field(r"Used (\d+) registers"),
        field(r"(\d+) bytes spill stores"),
        field(r"(\d+) bytes stack frame"),
    )


def compile_one(
    arch: int, dtype: str, channels: int, words: int, index: int, num_stages: int | None
) -> Result:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    launch = plans(dtype, channels, words, num_stages)[index]
    constexprs = {k: v for k, v in launch.options.items() if not k.startswith("num_")}
    config = ",".join(f"{k}={v}" for k, v in constexprs.items())
    config += f",warps={launch.options['num_warps']},stages={launch.options['num_stages']}"
    result = Result(launch.kernel.__name__, arch, dtype, channels, words, config)
    result.shared_limit = SHARED_MEMORY_PER_BLOCK[arch]
    start = time.perf_counter()
    try:
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        options, signature, constants, attrs = _bind(launch, backend)
        source = ASTSource(launch.kernel, signature, constants, attrs)
        compiled, ptxas_log = _compile_with_ptxas_log(source, target, options.__dict__)
        result.shared_bytes = compiled.metadata.shared
        result.registers, result.spill_bytes, result.stack_bytes = _resource_usage(ptxas_log)
        result.threads = 32 * int(launch.options["num_warps"])
        result.resident_per_sm = resident_programs(
            arch, result.registers, result.threads, result.shared_bytes
        )
        bird = plans(dtype, channels, words, num_stages, BIRD_LAST_STAGE, MULTIPROCESSORS[arch].count)[index]
        result.programs = int(np.prod(bird.grid))
        slots = result.resident_per_sm * MULTIPROCESSORS[arch].count
        result.waves = round(result.programs / slots, 2) if slots else float("inf")
    except Exception as e:  # report every failure, keep compiling the rest
        result.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    result.seconds = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch", type=int, nargs="+", default=list(ARCHS), choices=sorted(SHARED_MEMORY_PER_BLOCK)
    )
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=DTYPES)
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--words", type=int, nargs="+", default=[18, 64], help="caption lengths T")
    parser.add_argument("--kernel", nargs="+", help="only these kernels (by name)")
    parser.add_argument("--num-stages", type=int, help="override the launchers' pipeline stages")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")
    parser.add_argument("--json", type=Path, help="write the full report here")
    parser.add_argument("--allow-spills", action="store_true", help="report spills but fail only on errors")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the gate compiles real GPU code")

    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    # One compile per distinct specialisation: caption lengths that bind alike compile alike.
    jobs, seen = [], set()
    for arch, dtype, channels, words in itertools.product(args.arch, args.dtype, args.channels, args.words):
        backend = make_backend(GPUTarget("cuda", arch, 32))
        for index, launch in enumerate(plans(dtype, channels, words, args.num_stages)):
            if args.kernel and launch.kernel.__name__ not in args.kernel:
                continue
            options, signature, constants, attrs = _bind(launch, backend)
            key = (arch, launch.kernel.__name__, repr(signature), repr(constants), repr(attrs), repr(options))
            if key not in seen:
                seen.add(key)
                jobs.append((arch, dtype, channels, words, index, args.num_stages))
    # Fresh interpreters: forking a process that torch has started threads in can deadlock.
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(compile_one, *zip(*jobs)))
    for r in results:
        status = r.problem or (
            f"regs {r.registers:3d} spill {r.spill_bytes:4d} B stack {r.stack_bytes:4d} B "
            f"smem {r.shared_bytes:6d} / {r.shared_limit} B, {r.resident_per_sm} x {r.threads} threads "
            f"per SM, {r.programs} programs at {BIRD_LAST_STAGE}² = {r.waves} waves on a {MULTIPROCESSORS[r.arch].gpu}"
        )
        print(
            f"sm_{r.arch:<3d} {r.dtype:8s} C{r.channels:<3d} T{r.words:<2d} {r.kernel:28s} {r.config:75s} {status}"
        )
    if args.json:
        args.json.write_text(json.dumps([asdict(r) | {"problem": r.problem} for r in results], indent=1))
    failed = sum(bool(r.problem) for r in results)
    spilled = sum(not r.error and r.spill_bytes != 0 for r in results)
    print(f"{len(results)} kernels: {failed} failed (compile error or shared memory), {spilled} spilled")
    return 1 if failed or (spilled and not args.allow_spills) else 0


if __name__ == "__main__":
    sys.exit(main())
