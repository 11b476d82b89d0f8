"""Datasets and transforms for training and evaluating T2T-ViT; only a hub name given to hfds downloads anything.

`build_dataset` reads ImageNet-style folders, CIFAR-10/100 (python version), MNIST and Fashion-MNIST (IDX), a
synthetic `fake` set, and sharded stores: WebDataset tar shards (`wds`) and Hugging Face datasets (`hfds`), which
`convert.convert_data` (`t2tvit convert-data`) writes from any of the others; `build_transform` wraps timm's
transforms; `fetch_fashion_mnist` gets Fashion-MNIST from Debian's package with apt-get/dpkg.
"""
from typing import Any

from .datasets import (
    DATASETS,
    CifarDataset,
    FakeDataset,
    IdxDataset,
    ImageFolderDataset,
    build_dataset,
    read_idx,
)
from .holdout import HoldoutSubset, holdout_split
from .readers import DataError
from .transforms import build_transform

__all__ = [
    'DATASETS', 'DataError', 'build_dataset', 'build_transform', 'fetch_fashion_mnist', 'read_idx',
    'CifarDataset', 'FakeDataset', 'IdxDataset', 'ImageFolderDataset', 'HoldoutSubset', 'holdout_split',
]


def __getattr__(name: str) -> Any:
    # imported on first use, so `python -m t2tvit.data.fetch` does not find its module already imported
    if name == 'fetch_fashion_mnist':
        from .fetch import fetch_fashion_mnist
        return fetch_fashion_mnist
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
