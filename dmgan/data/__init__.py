"""Datasets in the AttnGAN layout (CUB-200, COCO) and the built-in procedurally drawn ``shapes``."""

from dmgan.data.dataset import (
    EXPECTED_LAYOUT,
    Batch,
    DatasetLayoutError,
    TextImageDataset,
    Vocabulary,
    check_vocabulary,
    collate,
    dataset_for,
    subsample_caption,
    tokenize,
)
from dmgan.data.sampler import EpochSampler, epoch_batches, make_loader

__all__ = [
    "EXPECTED_LAYOUT",
    "Batch",
    "DatasetLayoutError",
    "EpochSampler",
    "TextImageDataset",
    "Vocabulary",
    "check_vocabulary",
    "collate",
    "dataset_for",
    "epoch_batches",
    "make_loader",
    "subsample_caption",
    "tokenize",
]
