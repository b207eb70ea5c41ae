import os

import pytest
import torch

# Triton kernels run under the interpreter on machines without a GPU. Must be set before the
# kernel modules are imported (they read it when their @triton.jit decorators run).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Importing the emulated-CUDA backend builds it (and fails where HIP-CPU is missing): only
# tests/test_ops_cuda_on_cpu.py loads it, when HIP-CPU is there; --doctest-modules must not.
collect_ignore = ["hip_cpu/backend.py"]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def random_pad_mask(lengths: list[int], num_words: int) -> torch.Tensor:
    """B x T bool, True beyond each caption's length (0 = a fully padded caption)."""
    return torch.arange(num_words)[None, :] >= torch.tensor(lengths)[:, None]


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny checkpoint trained end to end on tiny shapes data (two GAN steps), for the tests of
    sampling, evaluation and the demo."""
    from dmgan.data import shapes as shapes_data
    from dmgan.train import main as train_main
    from tests.tiny import TINY

    data = shapes_data.generate(tmp_path_factory.mktemp("shapes"), num_train=32, num_test=12, seed=2)
    out = tmp_path_factory.mktemp("run")
    train_main(
        [
            "--data-dir",
            str(data),
            "--out",
            str(out),
            "--set",
            "train.encoder_max_epoch=1",
            "--max-steps",
            "2",
            *TINY,
        ]
    )
    return out / "checkpoints" / "latest.pt"
