import os

import pytest
import torch

# Triton kernels run under the interpreter on machines without a GPU. Must be set before the
# kernel modules are imported (they read it when their @triton.jit decorators run).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def random_pad_mask(lengths: list[int], num_words: int) -> torch.Tensor:
    """B x T bool, True beyond each caption's length (0 = a fully padded caption)."""
    return torch.arange(num_words)[None, :] >= torch.tensor(lengths)[:, None]
