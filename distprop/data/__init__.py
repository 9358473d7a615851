"""Datasets, batching and dataset sources (``dp.data``)."""

from distprop.data import sources
from distprop.data.dataset import (
    Dataset,
    Subset,
    TensorDataset,
    gather,
    random_split,
    split_indices,
)
from distprop.data.loader import DataLoader
from distprop.data.sampler import DistributedSampler
from distprop.data.sources import DataError, DataSplits

__all__ = [
    "DataError",
    "DataLoader",
    "DataSplits",
    "Dataset",
    "DistributedSampler",
    "Subset",
    "TensorDataset",
    "gather",
    "random_split",
    "sources",
    "split_indices",
]
