"""A validation split carved out of the training split, so that model selection never looks at the test set.

`holdout_split(train_set, 5000, seed)` returns (train, val): two disjoint views of `train_set` whose union is
all of it. Which samples are held out depends only on (seed, len(train_set)), so a resumed run and every
process of a distributed run hold out the same ones.
"""
from __future__ import annotations

from typing import Any, List, Sequence, Tuple

import numpy as np
from torch.utils.data import Dataset, IterableDataset

from .readers import DataError

__all__ = ['HoldoutSubset', 'holdout_indices', 'holdout_split']


class HoldoutSubset(Dataset):
    """The samples `indices` of `base`, keeping its class list (and its count of skipped images)."""

    def __init__(self, base: Dataset, indices: Sequence[int], part: str):
        self.base, self.indices, self.part = base, list(indices), part
        self.classes: List[str] = list(base.classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def bad_files(self) -> Any:
        return getattr(self.base, 'bad_files', None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.base[self.indices[index]]


def holdout_indices(num_samples: int, size: int, seed: int) -> Tuple[List[int], List[int]]:
    """(kept, held out): `size` indices of range(num_samples) drawn by `seed`, both lists in ascending order."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise DataError(f'val_holdout={size!r}; give a positive number of training images to hold out, '
                        f'or 0 to validate on the data set\'s own validation split')
    if size >= num_samples:
        raise DataError(f'val_holdout={size} leaves no training images (the training split has {num_samples}); '
                        f'hold out fewer, e.g. {max(1, num_samples // 10)}')
    # a generator of its own (not the global one): the split must not depend on what ran before
    order = np.random.default_rng([int(seed), 0x401D0]).permutation(num_samples)
    return sorted(order[size:].tolist()), sorted(order[:size].tolist())


def holdout_split(train_set: Dataset, size: int, seed: int) -> Tuple[HoldoutSubset, HoldoutSubset]:
    """(train, val): `size` samples of `train_set` held out for validation, the rest kept for training."""
    if isinstance(train_set, IterableDataset) or getattr(train_set, 'streaming', False):
        raise DataError('val_holdout needs random access to the training images, which a stream (--dataset wds) '
                        'does not give: pass --val-holdout 0 to validate on its own validation split')
    try:
        num_samples = len(train_set)
    except TypeError as e:
        raise DataError('val_holdout needs a data set of known length; a streaming data set cannot be split '
                        'this way: pass --val-holdout 0 to validate on its own validation split') from e
    kept, held = holdout_indices(num_samples, size, seed)
    return HoldoutSubset(train_set, kept, 'train'), HoldoutSubset(train_set, held, 'holdout')
