"""Sharded data sets read through timm's readers: WebDataset tar shards (`wds/`) and Hugging Face datasets (`hfds/`).

`WdsDataset` is a split of a folder of tar shards described by timm's split info file (`_info.json` or
`_info.yaml`, as `t2tvit convert-data --to wds` writes it). It is read as a stream: `stream()` returns timm's
`IterableImageDataset` for one epoch, with the shard order fixed by (seed, epoch), so that a run can be repeated and
resumed sample for sample. `HfdsDataset` is a split of anything `datasets.load_dataset` reads (a folder of parquet
files with a ClassLabel feature, as `convert-data --to hfds` writes it, or a hub name); it has random access, so it
is read like the other data sets.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from PIL import Image
from torch.utils.data import Dataset, IterableDataset

from .readers import UNREADABLE_IMAGE_ERRORS, ClassesMixin, DataError, pil_mode, read_skipping_unreadable

__all__ = ['WdsDataset', 'HfdsDataset', 'build_wds', 'build_hfds', 'resolve_split', 'WDS_INFO_FILES',
           'STORED_SPLITS', 'stored_source', 'check_bad_samples']

_logger = logging.getLogger(__name__)

WDS_INFO_FILES = ('_info.json', '_info.yaml')
STORED_SPLITS = ('train', 'validation', 'test')  # the names convert-data writes (Hugging Face's names)
# the project's split -> stored split names to try, in order ('test' is 'val' where a source has no test split)
_SPLIT_CANDIDATES = {
    'train': ('train',),
    'val': ('validation', 'val', 'valid', 'test'),
    'test': ('test', 'validation', 'val', 'valid'),
}
_WDS_LOGGER = 'timm.data.readers.reader_wds'  # timm logs (and skips) every sample it cannot read here


def resolve_split(split: str, available: Sequence[str], where: str) -> str:
    """The stored split that the project's `split` ('train', 'val' or 'test') means; a clear error if none."""
    for candidate in _SPLIT_CANDIDATES.get(split, (split,)):
        if candidate in available:
            return candidate
    wanted = ' or '.join(_SPLIT_CANDIDATES.get(split, (split,)))
    raise DataError(f'{where} has no {split} split (looked for {wanted}; it has {", ".join(available) or "none"}); '
                    f'write it again with t2tvit convert-data, or pick another --split')


# ---------------------------------------------------------------------------------------------------------------
# WebDataset


class BadSampleCounter:
    """How many samples timm's WebDataset reader skipped in one split, across DataLoader workers (a shared integer).

    timm logs each unreadable sample or shard as a warning and goes on. `_SkipCounter`, a filter on that logger,
    adds each such warning to the counter of the stream being read in that process.
    """

    def __init__(self):
        self.value = multiprocessing.Value('i', 0)  # shared with the workers, like timm's own SharedCount

    @property
    def count(self) -> int:
        return int(self.value.value)


class _SkipCounter(logging.Filter):
    active: Optional[BadSampleCounter] = None  # the counter of the stream this process reads now

    def filter(self, record: logging.LogRecord) -> bool:
        counter = _SkipCounter.active
        if counter is not None and 'webdataset error' in record.getMessage():
            with counter.value.get_lock():
                counter.value.value += 1
        return True

    @classmethod
    def install(cls) -> None:
        logger = logging.getLogger(_WDS_LOGGER)
        if not any(isinstance(f, cls) for f in logger.filters):
            logger.addFilter(cls())


class _CountedStream(IterableDataset):
    """timm's IterableImageDataset, with its skipped samples counted in `counter` while it is read."""

    def __init__(self, dataset, counter: BadSampleCounter):
        self.dataset, self.counter = dataset, counter

    def __iter__(self):
        _SkipCounter.install()  # in a worker process as well
        _SkipCounter.active = self.counter
        yield from self.dataset

    def __len__(self) -> int:
        return len(self.dataset)


def _load_info(root: Path) -> Tuple[Dict[str, Any], Path]:
    for name in WDS_INFO_FILES:
        path = root / name
        if path.is_file():
            try:
                text = path.read_text()
                if name.endswith('.json'):
                    info = json.loads(text)
                else:
                    import yaml
                    info = yaml.safe_load(text)
            except (OSError, ValueError) as e:
                raise DataError(f'cannot read {path} ({e}); write the store again with t2tvit convert-data') from e
            if not isinstance(info, dict) or not isinstance(info.get('splits'), dict):
                raise DataError(f'{path} has no "splits" mapping (timm\'s WebDataset split info); write the store '
                                f'again with t2tvit convert-data')
            return info, path
    raise DataError(f'{root} has no {" or ".join(WDS_INFO_FILES)}: a WebDataset folder needs timm\'s split info '
                    f'file naming each split\'s shards and sample counts; t2tvit convert-data --to wds writes one')


class WdsDataset(ClassesMixin):
    """One split of a folder of WebDataset shards, read through timm's `wds/` reader.

    `len()` is the split's sample count from the info file; `stream()` gives timm's `IterableImageDataset` for one
    epoch of training or evaluation. Unreadable samples are skipped by timm (with a warning) and counted in
    `bad_samples`; with `on_bad_image='fail'` the training loop stops at the first one.
    """

    streaming = True

    def __init__(self, root: Path, split: str, *, in_chans: int = 3, on_bad_image: str = 'fail'):
        if not root.is_dir():
            raise DataError(f'WebDataset folder {root} does not exist or is not a folder; point --data at the folder '
                            f'holding the .tar shards and {WDS_INFO_FILES[0]} (t2tvit convert-data --to wds writes it)')
        info, info_path = _load_info(root)
        self.root, self.info = root, info
        self.split = resolve_split(split, list(info['splits']), str(info_path))
        entry = info['splits'][self.split]
        try:
            self.filenames: List[str] = [str(f) for f in entry['filenames']]
            self.shard_lengths: List[int] = [int(n) for n in entry['shard_lengths']]
            self.num_samples = int(entry['num_samples'])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f'{info_path}: split {self.split!r} lacks filenames, shard_lengths or num_samples '
                            f'({e}); write the store again with t2tvit convert-data') from e
        if len(self.filenames) != len(self.shard_lengths) or sum(self.shard_lengths) != self.num_samples:
            raise DataError(f'{info_path}: split {self.split!r} lists {len(self.filenames)} shards, '
                            f'{len(self.shard_lengths)} shard lengths and {self.num_samples} samples, which do not '
                            f'add up; write the store again with t2tvit convert-data')
        missing = [f for f in self.filenames if not (root / f).is_file()]
        if missing:
            raise DataError(f'{len(missing)} of the {len(self.filenames)} shards of split {self.split!r} are missing '
                            f'from {root}: {", ".join(missing[:5])}{" ..." if len(missing) > 5 else ""}; copy them '
                            f'there or write the store again with t2tvit convert-data')
        self.classes = [str(c) for c in info.get('classes') or []]
        if not self.classes:
            count = int(info.get('num_classes') or 0)
            if count < 1:
                raise DataError(f'{info_path} names no classes ("classes" or "num_classes"); add them or write the '
                                f'store again with t2tvit convert-data')
            self.classes = [str(i) for i in range(count)]
        self.mode = pil_mode(in_chans)
        self.on_bad_image = on_bad_image
        self.bad_samples = BadSampleCounter()

    def __len__(self) -> int:
        return self.num_samples

    def check_workers(self, world_size: int, workers: int) -> None:
        """Training gives every loader worker of every process its own shards; refuse more workers than shards."""
        streams = world_size * max(1, workers)
        if len(self.filenames) < streams:
            raise DataError(
                f'split {self.split!r} of {self.root} has {len(self.filenames)} shards, fewer than the {streams} '
                f'streams that read it ({world_size} process(es) x {max(1, workers)} loader worker(s)); lower '
                f'--workers, or write smaller shards (t2tvit convert-data --shard-size)')

    def stream(self, transform: Optional[Callable], *, training: bool, batch_size: int, workers: int, seed: int = 0,
               epoch: int = 0, rank: int = 0, world_size: int = 1):
        """timm's IterableImageDataset over this split for one epoch (its skipped samples counted in `bad_samples`).

        Training: every loader worker of every process reads every (processes x workers)-th shard of a shard
        order fixed by (seed, epoch), the same in every process; shuffles its samples in a buffer seeded by `seed`
        (no workers) or its DataLoader worker seed; and yields ceil(N / (processes x workers)) samples rounded up to
        a whole batch (timm's rule: a worker whose shards hold fewer repeats some, one whose shards hold more leaves
        the rest unread this epoch). Evaluation: process `rank` reads shards rank, rank + world_size, ... in full,
        so every sample counts once.
        """
        from timm.data import create_dataset  # noqa: lazy, webdataset loads on first use

        if training:
            dataset = create_dataset(
                'wds/', root=str(self.root), split=self.split, is_training=True, batch_size=batch_size, seed=seed,
                input_img_mode=self.mode, transform=transform)
            dataset.set_epoch(epoch)  # shard order: seed + epoch, the same in every process
            dataset.set_loader_cfg(num_workers=workers)
            return _CountedStream(dataset, self.bad_samples)
        mine = self.filenames[rank::world_size]
        if not mine:
            return None  # more processes than shards: this one has nothing to evaluate
        count = sum(self.shard_lengths[rank::world_size])
        dataset = create_dataset(
            'wds/', root=str(self.root), split='::'.join(mine) + f'|{count}', is_training=False, batch_size=batch_size,
            input_img_mode=self.mode, transform=transform)
        # this process reads its own shards in full; timm's split by process would cap every worker at
        # N / (processes x workers) samples and repeat or drop samples where the shards do not divide evenly
        dataset.reader.dist_rank, dataset.reader.dist_num_replicas = 0, 1
        dataset.set_loader_cfg(num_workers=workers)
        return _CountedStream(dataset, self.bad_samples)


def check_bad_samples(dataset, policy: str) -> None:
    """A stream skips unreadable samples as it goes (timm warns about each); 'fail' stops at the first."""
    counter = getattr(dataset, 'bad_samples', None)
    if counter is not None and policy == 'fail' and counter.count:
        raise DataError(f'{counter.count} unreadable sample(s) in split {dataset.split!r} of {dataset.root} (timm '
                        f'warns about each above); write the store again with t2tvit convert-data, or pass '
                        f'--on-bad-image skip to skip and count them')


def build_wds(root: Path, split: str, in_chans: int, on_bad_image: str) -> WdsDataset:
    return WdsDataset(root, split, in_chans=in_chans, on_bad_image=on_bad_image)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face datasets


def _looks_local(data: str) -> bool:
    return Path(data).expanduser().exists() or data.startswith(('/', '.', '~'))


class HfdsDataset(ClassesMixin, Dataset):
    """One split of a Hugging Face dataset with an image column and a ClassLabel column, through timm's `hfds/`.

    Random access: `ds[i] -> (transform(pil_image), label)`. A sample whose image cannot be decoded fails naming
    the data set, split and row, or with `on_bad_image='skip'` is replaced by the next one and recorded in
    `bad_files`.
    """

    def __init__(self, data: str, split: str, transform: Optional[Callable] = None, *, in_chans: int = 3,
                 on_bad_image: str = 'fail', image_key: str = 'image', label_key: str = 'label'):
        try:
            import datasets
            from timm.data import create_dataset
        except ImportError as e:
            raise DataError(f'reading a Hugging Face dataset needs the datasets package ({e}); pip install datasets') \
                from e
        self.data = data
        local = _looks_local(data)
        path = str(Path(data).expanduser()) if local else data
        if local and not Path(path).is_dir():
            raise DataError(f'Hugging Face dataset folder {data} does not exist; point --data at a folder that '
                            f'datasets.load_dataset reads (t2tvit convert-data --to hfds writes one) or at a hub name')
        try:
            available = list(datasets.get_dataset_split_names(path))
        except Exception as e:  # noqa: datasets raises many kinds (not found, offline, no data files)
            where = f'folder {data}' if local else f'hub data set {data!r} (no folder of that name here either)'
            raise DataError(f'datasets.load_dataset cannot read the {where} ({type(e).__name__}: '
                            f'{str(e).splitlines()[0] if str(e) else ""}); give a folder of parquet files per split '
                            f'(t2tvit convert-data --to hfds) or a reachable hub name') from e
        self.split = resolve_split(split, available, f'Hugging Face dataset {data}')
        try:
            timm_dataset = create_dataset(f'hfds/{path}', root=None, split=self.split, input_key=image_key,
                                          target_key=label_key)
        except (KeyError, ValueError) as e:
            raise DataError(f'Hugging Face dataset {data}, split {self.split}: {e}; it needs an {image_key!r} image '
                            f'column and a {label_key!r} ClassLabel column') from e
        self.reader = timm_dataset.reader
        names = sorted(self.reader.class_to_idx.items(), key=lambda item: item[1])
        if not names:
            raise DataError(f'Hugging Face dataset {data} has no ClassLabel feature {label_key!r}, so its class names '
                            f'are unknown; cast the column to datasets.ClassLabel (convert-data --to hfds does)')
        self.classes = [name for name, _ in names]
        self.transform = transform
        self.mode = pil_mode(in_chans)
        self.on_bad_image = on_bad_image
        self.bad_files: List[str] = []

    def __len__(self) -> int:
        return len(self.reader)

    @property
    def targets(self) -> List[int]:
        return [int(t) for t in self.reader.iter_targets()]

    def _name(self, index: int) -> str:
        return f'{self.data} split {self.split} row {index}'

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        image, target = read_skipping_unreadable(
            index, len(self), self._read, skip=self.on_bad_image != 'fail', on_skip=self._record_bad,
            errors=(*UNREADABLE_IMAGE_ERRORS, AssertionError), unit='samples',
            fail_message=lambda row, e: (f'cannot read the image of {self._name(row)}: {e}. Write the data set '
                                         f"again, or pass on_bad_image='skip' (--on-bad-image skip) to skip "
                                         f'unreadable images'),
            give_up_message=lambda row, tries: (f'{tries} images in a row are unreadable, from {self._name(row)} '
                                                f'on; check the data set'))
        if self.transform is not None:
            image = self.transform(image)
        return image, int(target)

    def _read(self, row: int) -> Tuple[Image.Image, Any]:
        file, target = self.reader[row][:2]
        with Image.open(file) as raw:
            return raw.convert(self.mode), target  # decodes every pixel, so a corrupt image fails here

    def _record_bad(self, row: int, error: Exception) -> None:
        if self._name(row) not in self.bad_files:
            self.bad_files.append(self._name(row))
            _logger.warning('skipping unreadable image of %s (%s)', self._name(row), error)


def build_hfds(data: str, split: str, transform, in_chans: int, on_bad_image: str) -> HfdsDataset:
    return HfdsDataset(str(data), split, transform, in_chans=in_chans, on_bad_image=on_bad_image)


def stored_source(dataset: str, data: str) -> Optional[str]:
    """The data set a store was converted from (as convert-data records it), or None when it does not say."""
    root = Path(str(data)).expanduser()
    candidates = [root / WDS_INFO_FILES[0]] if dataset == 'wds' else [root / '_t2tvit.json']
    for path in candidates:
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        source = (info.get('t2tvit') or {}).get('source') if dataset == 'wds' else info.get('source')
        return str(source) if source else None
    return None
