"""Randomness and sample order of a run, fixed by (seed, epoch, step, index) instead of a running generator, so a run
resumed from any checkpoint takes exactly the steps the uninterrupted run took."""
from __future__ import annotations

import math
import random
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

__all__ = ['derived_seed', 'seed_everything', 'seed_host', 'SeededTransform', 'RankBatches', 'StreamTransform',
           'first_batches', 'epoch_micro_batches']


def derived_seed(*parts: int) -> int:
    """A 32-bit seed that depends on every part (seed, epoch, step, ...), the same in every process and run."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and, when present, GPU) generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_host(seed: int) -> None:
    """Seed the generators that CPU-side data transforms draw from; per sample, so it must be cheap
    (torch.manual_seed also visits every GPU and costs ~0.25 ms)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.random.default_generator.manual_seed(seed)


class SeededTransform(Dataset):
    """Applies `transform` under a random state fixed by (seed, epoch, index): the same augmentation whichever
    worker, process or resumed run loads the sample."""

    def __init__(self, base: Dataset, transform, seed: int, epoch: int = 0):
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        seed_host(derived_seed(self.seed, self.epoch, index))
        return self.transform(image), label


class RankBatches(Sampler[List[int]]):
    """This process's share of each global micro-batch: every `world_size`-th index."""

    def __init__(self, batches: Sequence[Sequence[int]], rank: int, world_size: int):
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __iter__(self) -> Iterator[List[int]]:
        for batch in self.batches:
            yield list(batch[self.rank::self.world_size])

    def __len__(self) -> int:
        return len(self.batches)


class StreamTransform:
    """`transform` for a stream's samples (WebDataset), under a random state fixed by (seed, epoch, rank, loader
    worker, the worker's sample count).

    A stream has no sample index, but each loader worker reads the same samples in the same order whenever the
    epoch is read again (the shard order is fixed by seed and epoch, the worker's sample shuffle by its seed), so
    its own count names a sample as well. A resumed run reads the epoch from its start: the samples of the first
    `skip_batches` batches are passed over untransformed (a placeholder), and the loop drops those batches.
    """

    def __init__(self, transform, seed: int, epoch: int, rank: int, workers: int, batch_size: int,
                 skip_batches: int = 0):
        self.transform, self.seed, self.epoch, self.rank = transform, seed, epoch, rank
        self.workers, self.batch_size, self.skip_batches = max(1, workers), batch_size, skip_batches
        self._count = 0
        self._worker: Optional[int] = None
        self._skip = 0

    def __call__(self, image):
        if self._worker is None:
            worker = get_worker_info()
            self._worker = worker.id if worker is not None else 0
            # the DataLoader takes batches from its workers round robin: worker w made batches w, w + W, ...
            self._skip = max(0, math.ceil((self.skip_batches - self._worker) / self.workers)) * self.batch_size
        index = self._count
        self._count += 1
        if index < self._skip:
            return 0
        seed_host(derived_seed(self.seed, self.epoch, self.rank, self._worker, index))
        return self.transform(image)


def first_batches(loader, skip: int, limit: int):
    """Batches skip..limit-1 of `loader`: a resumed stream drops what it already trained on."""
    for i, batch in enumerate(loader):
        if i >= limit:
            break
        if i >= skip:
            yield batch


def epoch_micro_batches(num_samples: int, micro_batch: int, seed: int, epoch: int) -> List[List[int]]:
    """The global micro-batches of one epoch: a permutation fixed by (seed, epoch), incomplete tail dropped."""
    generator = torch.Generator().manual_seed(derived_seed(seed, epoch, 0x5EED))
    order = torch.randperm(num_samples, generator=generator).tolist()
    return [order[i * micro_batch:(i + 1) * micro_batch] for i in range(num_samples // micro_batch)]
