"""Which sizes the benchmark files run at (see benchmarks/conftest.py)."""

from __future__ import annotations


def smoke_size(config) -> bool:
    """Tiny sizes: asked for with ``--bench-size smoke``, or timing is off (the test suite's run)."""
    if config.getoption("bench_size"):
        return config.getoption("bench_size") == "smoke"
    return config.getoption("benchmark_disable") and not config.getoption("benchmark_enable")
