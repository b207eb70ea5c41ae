"""Benchmark shapes: the bird preset's memory stages when timing, tiny ones for the smoke run
(``--benchmark-disable``, how the test suite runs these files so they never rot)."""

from __future__ import annotations

import torch

from tests.parity import ReadShape

ON_GPU = torch.cuda.is_available()


def _bird(batch: int, size: int) -> ReadShape:
    return ReadShape(
        batch, 64, size, size, tuple(18 - (i % 7) for i in range(batch))
    )  # T = 18, mixed lengths


def pytest_generate_tests(metafunc):
    if "read_shape" not in metafunc.fixturenames:
        return
    config = metafunc.config
    if config.getoption("benchmark_disable") and not config.getoption("benchmark_enable"):
        shapes = [ReadShape(2, 32, 4, 5, (6, 3))]
    else:
        shapes = [_bird(10, 64), _bird(10, 128)] + ([_bird(32, 64), _bird(32, 128)] if ON_GPU else [])
    metafunc.parametrize("read_shape", shapes, ids=str)
