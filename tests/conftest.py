import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def random_pad_mask(lengths: list[int], num_words: int) -> torch.Tensor:
    """B x T bool, True beyond each caption's length (0 = a fully padded caption)."""
    return torch.arange(num_words)[None, :] >= torch.tensor(lengths)[:, None]
