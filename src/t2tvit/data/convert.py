"""`t2tvit convert-data`: any data set the project reads, written as WebDataset shards or a Hugging Face dataset.

wds:  OUT/{split}-000000.tar ... with one `KEY.png`/`KEY.jpg` and `KEY.cls` per sample, and timm's split info file
      OUT/_info.json (per split: shard file names, samples per shard, total; plus the class names).
hfds: OUT/data/{split}-00000-of-000NN.parquet with an `image` (datasets.Image) and a `label` (datasets.ClassLabel,
      the class names) column: the layout `datasets.load_dataset(OUT)` and the hub read; OUT/_t2tvit.json
      records where it came from.

Splits keep the names Hugging Face uses: train, validation (an image folder's val/), test (the CIFAR test batch,
the MNIST t10k files). Training samples are written in a shuffled order (fixed by `seed`), so that a shard is a
mixed sample of classes; the other splits keep the source order. Everything is written into a hidden folder beside
OUT, flushed to disk, then renamed to OUT: an interrupted conversion leaves no folder that reads as complete.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
from PIL import Image

from ..errors import InputError
from ..outputs import claim
from .datasets import ImageFolderDataset, build_dataset
from .readers import UNREADABLE_IMAGE_ERRORS, DataError

__all__ = ['convert_data', 'ConvertResult', 'CONVERT_FORMATS', 'DEFAULT_SHARD_SIZE', 'SOURCE_DATASETS']

CONVERT_FORMATS = ('wds', 'hfds')
SOURCE_DATASETS = ('imagefolder', 'cifar10', 'cifar100', 'mnist', 'fashion_mnist', 'fake')
DEFAULT_SHARD_SIZE = 2000  # samples per shard: ImageNet-1k train gives 641 tar files of ~70 MB
# stored split name <- the project's split, per source (the project reads a source's test set as 'val')
_SOURCE_SPLITS = {
    'imagefolder': (('train', 'train'), ('validation', 'val')),
    'fake': (('train', 'train'), ('validation', 'val')),
    'cifar10': (('train', 'train'), ('test', 'val')),
    'cifar100': (('train', 'train'), ('test', 'val')),
    'mnist': (('train', 'train'), ('test', 'val')),
    'fashion_mnist': (('train', 'train'), ('test', 'val')),
}
_FORMAT_EXTENSIONS = {'JPEG': 'jpg', 'PNG': 'png', 'WEBP': 'webp'}  # what timm's wds reader looks for


@dataclass
class ConvertResult:
    output: Path
    format: str
    samples: Dict[str, int]  # per stored split
    shards: Dict[str, int]
    classes: List[str]
    bytes: int = 0
    seconds: float = 0.0
    files: List[str] = field(default_factory=list)


def _encoded(image: Image.Image) -> Tuple[str, bytes]:
    buffer = io.BytesIO()
    image.save(buffer, format='PNG')  # lossless; small images compress well
    return 'png', buffer.getvalue()


def _file_sample(path: str) -> Tuple[str, bytes]:
    """An image file's own bytes (no re-encoding) when timm reads its format, else PNG; fails on a corrupt file."""
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as e:
        raise DataError(f'cannot read {path} ({e.strerror or e}); make it readable or remove it, then convert '
                        'again') from e
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes every pixel: a corrupt file fails here, not in training
            ext = _FORMAT_EXTENSIONS.get(image.format or '')
            if ext is None:
                return _encoded(image)
    except UNREADABLE_IMAGE_ERRORS as e:
        raise DataError(f'cannot read image {path}: {e}. Delete or replace the file, then convert again') from e
    return ext, data


def _samples(dataset, order: np.ndarray, root: Optional[Path]) -> Iterator[Tuple[str, bytes, int, Optional[str]]]:
    """(extension, bytes, label, source path or None) for each index of `order`."""
    for index in order:
        index = int(index)
        if isinstance(dataset, ImageFolderDataset):
            path, label = dataset.samples[index]
            ext, data = _file_sample(path)
            yield ext, data, int(label), os.path.relpath(path, root) if root else None
        else:
            image, label = dataset[index]
            ext, data = _encoded(image)
            yield ext, data, int(label), None


def _chunks(n: int, size: int) -> List[Tuple[int, int]]:
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _write_wds_split(folder: Path, split: str, samples, n: int, shard_size: int, tick: Callable[[int], None]):
    import webdataset as wds
    filenames, lengths = [], []
    chunks = _chunks(n, shard_size)
    iterator = iter(samples)
    for shard, (start, stop) in enumerate(chunks):
        name = f'{split}-{shard:06d}.tar'
        with wds.TarWriter(str(folder / name)) as sink:
            for index in range(start, stop):
                ext, data, label, _ = next(iterator)
                sink.write({'__key__': f'{split}_{index:08d}', ext: data, 'cls': label})
                tick(1)
        filenames.append(name)
        lengths.append(stop - start)
    return filenames, lengths


def _write_hfds_split(folder: Path, split: str, samples, n: int, shard_size: int, classes: List[str],
                      tick: Callable[[int], None]):
    import datasets
    features = datasets.Features({'image': datasets.Image(), 'label': datasets.ClassLabel(names=list(classes))})
    (folder / 'data').mkdir(exist_ok=True)
    chunks = _chunks(n, shard_size)
    filenames, lengths = [], []
    iterator = iter(samples)
    for shard, (start, stop) in enumerate(chunks):
        images, labels = [], []
        for _ in range(start, stop):
            _, data, label, path = next(iterator)
            images.append({'bytes': data, 'path': path})
            labels.append(label)
            tick(1)
        name = f'data/{split}-{shard:05d}-of-{len(chunks):05d}.parquet'  # the hub's names: load_dataset finds splits
        datasets.Dataset.from_dict({'image': images, 'label': labels}, features=features).to_parquet(
            str(folder / name))
        filenames.append(name)
        lengths.append(stop - start)
    return filenames, lengths


def _fsync_tree(folder: Path) -> int:
    """Flush every file (and folder entry) to disk; returns the bytes written."""
    total = 0
    for path in sorted(folder.rglob('*')) + [folder]:
        if path.is_file():
            total += path.stat().st_size
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return total


def _source_splits(dataset: str, data, in_chans: int, fake_num_samples: int, fake_image_size: int,
                   seed: int) -> List[Tuple[str, object]]:
    """(stored split name, data set) for each split the source has; only the training split must exist."""
    splits = []
    for stored, split in _SOURCE_SPLITS[dataset]:
        try:
            source = build_dataset(dataset, data, split, in_chans=in_chans,
                                   fake_num_samples=fake_num_samples if split == 'train' else
                                   max(1, fake_num_samples // 4), fake_image_size=fake_image_size, seed=seed)
        except DataError:
            if split == 'train':
                raise
            continue  # e.g. an image folder without val/: written without that split
        splits.append((stored, source))
    return splits


def _write_info(folder: Path, to: str, dataset: str, facts: Dict, info_splits: Dict[str, Dict]) -> None:
    if to == 'wds':
        # timm's split info (reader_wds.py): per split name, num_samples, filenames, shard_lengths
        classes = facts['classes']
        info = dict(name=dataset, splits=info_splits, classes=classes, num_classes=len(classes), t2tvit=facts)
        (folder / '_info.json').write_text(json.dumps(info, indent=1))
    else:
        (folder / '_t2tvit.json').write_text(json.dumps(dict(facts, splits=info_splits), indent=1))


def _publish(partial: Path, output: Path) -> None:
    """Move the complete `partial` folder to `output`; with --force the old folder goes only once the new one is
    complete."""
    if output.exists():
        old = output.parent / f'.{output.name}.old-{os.getpid()}'
        os.replace(output, old)
        os.replace(partial, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, output)


def _write_failed(e: OSError, output: Path) -> DataError:
    """A write into the hidden folder beside OUT failed (a full disk, a folder made read-only): what to do."""
    where = e.filename or output.parent
    return DataError(f'could not write {where} ({e.strerror or e}) while converting into {output}; nothing was '
                     'left behind. Free disk space or choose another --output')


def _check_output(output: Path, data: Union[str, Path, None], force: bool) -> Path:
    """An existing OUT is replaced only with --force, and never when it is (or holds) the source folder."""
    if data is not None:
        source = Path(data).expanduser().resolve()
        if source == output.resolve() or output.resolve() in source.parents:
            raise DataError(f'--output {output} is or holds the source --data {data}; choose another --output')
    return claim(output, force, 'the converted data set')


def _write_splits(partial: Path, to: str, splits: List[Tuple[str, object]], shard_size: int, seed: int,
                  result: ConvertResult, update: Callable[[int], object]) -> Dict[str, Dict]:
    """Each split's shards into `partial` (train shuffled with `seed`, the others in source order), counted into
    `result`; returns what the info file says of each split."""
    info_splits: Dict[str, Dict] = {}
    for stored, source in splits:
        n = len(source)
        order = np.random.default_rng(seed).permutation(n) if stored == 'train' else np.arange(n)
        root = Path(source.root).parent if isinstance(source, ImageFolderDataset) else None
        samples = _samples(source, order, root)
        if to == 'wds':
            filenames, lengths = _write_wds_split(partial, stored, samples, n, shard_size, update)
        else:
            filenames, lengths = _write_hfds_split(partial, stored, samples, n, shard_size, result.classes, update)
        info_splits[stored] = dict(name=stored, num_samples=n, filenames=filenames, shard_lengths=lengths)
        result.samples[stored], result.shards[stored] = n, len(filenames)
        result.files.extend(filenames)
    return info_splits


def convert_data(
        dataset: str,
        data: Union[str, Path, None],
        to: str,
        output: Union[str, Path],
        *,
        shard_size: int = DEFAULT_SHARD_SIZE,
        force: bool = False,
        seed: int = 0,
        progress: Union[bool, str] = 'auto',
        fake_num_samples: int = 256,
        fake_image_size: int = 32,
) -> ConvertResult:
    """Write `dataset` (read from `data` as `build_dataset` reads it) into `output` as `to` ('wds' or 'hfds')."""
    if to not in CONVERT_FORMATS:
        raise DataError(f'--to {to!r}; choose wds (WebDataset tar shards) or hfds (Hugging Face parquet)')
    if dataset not in SOURCE_DATASETS:
        raise DataError(f'cannot convert dataset {dataset!r}; choose one of {", ".join(SOURCE_DATASETS)}')
    if not isinstance(shard_size, int) or shard_size < 1:
        raise DataError(f'shard size {shard_size!r}; give a positive number of samples per shard')
    output = _check_output(Path(output).expanduser(), data, force)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f'cannot create {output.parent} ({e}); choose a writable --output') from e

    start_time = time.time()
    in_chans = 1 if dataset in ('mnist', 'fashion_mnist') else 3
    splits = _source_splits(dataset, data, in_chans, fake_num_samples, fake_image_size, seed)
    classes = list(splits[0][1].classes)
    total = sum(len(source) for _, source in splits)

    from tqdm.auto import tqdm
    show = progress in (True, 'on') or (progress == 'auto' and sys.stderr.isatty())
    partial = output.parent / f'.{output.name}.partial-{os.getpid()}'
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir()
    except OSError as e:
        raise _write_failed(e, output) from e
    result = ConvertResult(output=output, format=to, samples={}, shards={}, classes=classes)
    hf_progress = None
    try:
        if to == 'hfds':
            import datasets
            hf_progress = not datasets.utils.are_progress_bars_disabled()
            datasets.utils.disable_progress_bars()  # one bar for the whole conversion, below
        with tqdm(total=total, desc=f'{dataset} -> {to}', unit='img', disable=not show, dynamic_ncols=True) as bar:
            info_splits = _write_splits(partial, to, splits, shard_size, seed, result, bar.update)
        facts = dict(source=dataset, data=str(data) if data is not None else None, in_chans=in_chans,
                     classes=classes, order=f'train shuffled with seed {seed}, other splits in source order',
                     written_by='t2tvit convert-data')
        _write_info(partial, to, dataset, facts, info_splits)
        result.bytes = _fsync_tree(partial)
        _publish(partial, output)
    except BaseException as e:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, InputError):  # the reads above raise DataError
            raise _write_failed(e, output) from e
        raise
    finally:
        if hf_progress:
            import datasets
            datasets.utils.enable_progress_bars()
    result.seconds = time.time() - start_time
    return result
