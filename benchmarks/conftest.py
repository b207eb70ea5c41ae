"""Benchmark sizes: the bird preset's memory stages and training step when timing, tiny ones for
the smoke run (``--benchmark-disable``, how the test suite runs these files so they never rot).
``--bench-size smoke|full`` chooses either way regardless (the device script's dry run times the
tiny ones)."""

from __future__ import annotations

from benchmarks.sizes import smoke_size
from dmgan.ops.parity import ReadShape, WriteShape


def pytest_addoption(parser):
    parser.addoption("--bench-size", choices=["smoke", "full"], help="tiny or real benchmark sizes")


def _bird(batch: int, size: int) -> ReadShape:
    return ReadShape(
        batch, 64, size, size, tuple(18 - (i % 7) for i in range(batch))
    )  # T = 18, mixed lengths


def pytest_generate_tests(metafunc):
    smoke = smoke_size(metafunc.config)
    if "read_shape" in metafunc.fixturenames:
        if smoke:
            shapes = [ReadShape(2, 32, 4, 5, (6, 3))]
        else:
            shapes = [_bird(10, 64), _bird(10, 128), _bird(32, 64), _bird(32, 128)]
        metafunc.parametrize("read_shape", shapes, ids=str)
    if "write_shape" in metafunc.fixturenames:
        # bird: N_w 256, N_r 64, T 18 (the write runs once per refinement stage, on B x T words)
        shapes = [WriteShape(2, 16, 32, 6)] if smoke else [WriteShape(b, 256, 64, 18) for b in (10, 32)]
        metafunc.parametrize("write_shape", shapes, ids=str)
