"""A whole training iteration (G forward, a step of each D, a G step with DAMSM and KL, EMA) in
images per second: the memory op on the eager reference vs each fused backend, AMP off vs bf16.

    .venv/bin/python -m pytest benchmarks/test_bench_train_step.py --benchmark-enable --benchmark-group-by=param:amp

The shapes preset on a CPU, the bird preset on a GPU (tiny models in the test suite's smoke run).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.sizes import smoke_size
from dmgan import ops
from dmgan.config import TINY_OVERRIDES, get_preset, override
from dmgan.training_step import TrainingState, synthetic_batch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
VOCAB = 100
AMP = ("off", "bf16")


def _config(smoke: bool):
    if smoke:  # N_r 32: the narrowest the Triton kernels take
        return override(get_preset("shapes"), **{**TINY_OVERRIDES, "model.gf_dim": 32, "train.batch_size": 2})
    return get_preset("bird" if ON_GPU else "shapes")


@pytest.mark.parametrize("amp", AMP)
@pytest.mark.parametrize("memory_backend", ["eager", "cpp", "triton"])
def test_train_step(benchmark, memory_backend, amp, request):
    if memory_backend not in ops.available_backends(DEVICE) or (memory_backend == "triton" and not ON_GPU):
        pytest.skip(f"{memory_backend} does not run on {DEVICE} here")
    cfg = _config(smoke_size(request.config))
    torch.manual_seed(0)
    gan = TrainingState.build(cfg, VOCAB, device=DEVICE, amp=amp, memory_backend=memory_backend)
    batch = synthetic_batch(cfg, VOCAB, cfg.train.batch_size, DEVICE)

    def step():
        logs = gan.step(batch)
        if ON_GPU:
            torch.cuda.synchronize()
        return logs

    logs = step()  # warm-up (and the extension's first-use build)
    assert all(torch.isfinite(v) for v in logs.values())
    benchmark.pedantic(step, rounds=3 if not ON_GPU else 10, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(
        kind="train_step",
        preset=cfg.name,
        batch=cfg.train.batch_size,
        memory_backend=memory_backend,
        amp=amp,
        device=torch.cuda.get_device_name() if ON_GPU else "cpu",
        torch=torch.__version__,
    )
