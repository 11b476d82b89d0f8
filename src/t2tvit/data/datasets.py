"""Datasets as users have them on disk, read without downloading anything and without trusting pickles.

Every dataset returned by `build_dataset` behaves the same: `.classes` (names in label order), `.num_classes`,
`len()`, and `ds[i] -> (transform(pil_image), int_label)`, the PIL image being 'L' for one input channel and 'RGB'
otherwise. Bad input raises `DataError`, whose message names the file or folder and says what to put where.
"""
from __future__ import annotations

import gzip
import functools
import importlib
import logging
import math
import os
import pickle
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..options import DATASET_NAMES, not_regular_file
from .readers import ClassesMixin, DataError, pil_mode, read_skipping_unreadable
from .streaming import build_hfds, build_wds

__all__ = [
    'DataError', 'DATASETS', 'build_dataset', 'ImageFolderDataset', 'CifarDataset', 'IdxDataset', 'FakeDataset',
    'read_idx', 'MNIST_FILES', 'STREAMING_DATASETS', 'FASHION_MNIST_CLASSES', 'MNIST_CLASSES',
]

_logger = logging.getLogger(__name__)

PathLike = Union[str, 'os.PathLike[str]']

DATASETS = DATASET_NAMES  # one list: options.py holds it, as the command line is parsed before torch is imported
STREAMING_DATASETS = ('wds', 'hfds')  # sharded stores, read through timm's readers (see streaming.py)
SPLITS = {'train': 'train', 'val': 'val', 'test': 'val'}
BAD_IMAGE_POLICIES = ('fail', 'skip')

# split -> (images file, labels file), as distributed (each may also be gzipped)
MNIST_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'val': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_MNIST_CLASSES = [
    'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot',
]
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension

def _all_files(names: Sequence[str]) -> str:
    return ', '.join(names)


# ---------------------------------------------------------------------------------------------------------------
# ImageNet-style folders


def _imagefolder_layout(root: Path) -> str:
    return (f'expected an ImageNet-style layout: {root}/train/<class>/<image> and {root}/val/<class>/<image> '
            f'(a folder per class, images inside; "validation" is accepted instead of "val")')


def _find_split_folder(root: Path, split: str) -> Optional[Path]:
    names = ('val', 'validation') if split == 'val' else ('train',)
    for name in names:
        if (root / name).is_dir():
            return root / name
    return None


def _class_folders(folder: Path) -> List[str]:
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())


def _open_image(path: str, mode: str) -> Image.Image:
    why = not_regular_file(path)  # a FIFO named like an image would block open() for ever
    if why:
        raise OSError(f'{path} {why}; not opened')
    with open(path, 'rb') as f:
        return Image.open(f).convert(mode)  # convert() reads the whole file, so a corrupt one fails here


class ImageFolderDataset(ClassesMixin, ImageFolder):
    """torchvision's ImageFolder with an explicit class list and a policy for corrupt images.

    `class_names` fixes the label order (val uses train's classes, so a val folder that lacks a class keeps the
    same labels). With `on_bad_image='skip'` an unreadable file is logged once, recorded in `bad_files` and
    replaced by the next readable sample; in DataLoader workers each worker keeps its own `bad_files`.
    """

    def __init__(self, folder: PathLike, transform: Optional[Callable] = None, *, in_chans: int = 3,
                 on_bad_image: str = 'fail', class_names: Optional[Sequence[str]] = None):
        self._class_names = list(class_names) if class_names is not None else None
        self.mode = pil_mode(in_chans)
        self.on_bad_image = on_bad_image
        self.bad_files: List[str] = []
        self._warned: set = set()
        loader = functools.partial(_open_image, mode=self.mode)
        super().__init__(os.fspath(folder), transform=transform, loader=loader, allow_empty=True)

    def find_classes(self, directory: Union[str, Path]) -> Tuple[List[str], Dict[str, int]]:
        if self._class_names is None:
            classes = _class_folders(Path(directory))
        else:
            classes = self._class_names
        return classes, {name: i for i, name in enumerate(classes)}

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        image, target = read_skipping_unreadable(
            index, len(self), self._read, skip=self.on_bad_image != 'fail', on_skip=self._record_bad,
            fail_message=lambda i, e: (f'cannot read image {self.samples[i][0]}: {e}. Delete or replace the file, '
                                       f"or pass on_bad_image='skip' to skip unreadable images"),
            give_up_message=lambda i, tries: (f'{tries} images in a row are unreadable, from {self.samples[i][0]} '
                                              f'on (see the warnings); check the files under {self.root}'))
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    def _read(self, position: int) -> Tuple[Image.Image, int]:
        path, target = self.samples[position]
        return self.loader(path), target

    def _record_bad(self, position: int, error: Exception) -> None:
        path = self.samples[position][0]
        if path in self._warned:
            return
        self._warned.add(path)
        self.bad_files.append(path)
        _logger.warning('skipping unreadable image %s (%s)', path, error)


def _build_imagefolder(root: Path, split: str, transform, in_chans: int, on_bad_image: str) -> ImageFolderDataset:
    if not root.is_dir():
        raise DataError(f'image folder root {root} does not exist or is not a folder; {_imagefolder_layout(root)}')
    folder = _find_split_folder(root, split)
    if folder is None:
        wanted = f'{root}/val (or {root}/validation)' if split == 'val' else f'{root}/train'
        raise DataError(f'no {split} split folder: {wanted} is missing; {_imagefolder_layout(root)}')
    classes = _class_folders(folder)
    if not classes:
        raise DataError(f'{folder} has no class folders; {_imagefolder_layout(root)}')

    class_names = None
    train_folder = _find_split_folder(root, 'train')
    if split == 'val' and train_folder is not None and _class_folders(train_folder):
        # labels must mean the same classes in both splits, even when val lacks a class
        class_names = _class_folders(train_folder)
        unknown = sorted(set(classes) - set(class_names))
        if unknown:
            raise DataError(
                f'{folder} has class folders that {train_folder} lacks: {_all_files(unknown[:10])}'
                f'{" ..." if len(unknown) > 10 else ""}; both splits must use the same class folder names')

    dataset = ImageFolderDataset(folder, transform, in_chans=in_chans, on_bad_image=on_bad_image,
                                 class_names=class_names)
    if len(dataset) == 0:
        raise DataError(
            f'no images under {folder} (looked for {", ".join(IMG_EXTENSIONS)} files inside its class folders); '
            f'{_imagefolder_layout(root)}')
    if split == 'train':
        counts = np.bincount(np.asarray(dataset.targets, dtype=np.int64), minlength=len(dataset.classes))
        empty = [dataset.classes[i] for i in np.flatnonzero(counts == 0)]
        if empty:
            raise DataError(
                f'class folders without images under {folder}: {_all_files(empty[:10])}'
                f'{" ..." if len(empty) > 10 else ""}; put images in them or remove them')
    return dataset


# ---------------------------------------------------------------------------------------------------------------
# CIFAR: the official "python version" pickles, read with an unpickler that only rebuilds numpy arrays


def _numpy_core(submodule: str):
    try:
        return importlib.import_module(f'numpy._core.{submodule}')
    except ImportError:  # numpy < 2
        return importlib.import_module(f'numpy.core.{submodule}')


_SAFE_PICKLE_GLOBALS: Dict[Tuple[str, str], Callable[[], Any]] = {}
for _core in ('numpy.core', 'numpy._core'):
    _SAFE_PICKLE_GLOBALS[(f'{_core}.multiarray', '_reconstruct')] = lambda: _numpy_core('multiarray')._reconstruct
    _SAFE_PICKLE_GLOBALS[(f'{_core}.multiarray', 'scalar')] = lambda: _numpy_core('multiarray').scalar
    _SAFE_PICKLE_GLOBALS[(f'{_core}.numeric', '_frombuffer')] = lambda: _numpy_core('numeric')._frombuffer
_SAFE_PICKLE_GLOBALS.update({
    ('numpy', 'ndarray'): lambda: np.ndarray,
    ('numpy', 'dtype'): lambda: np.dtype,
    ('_codecs', 'encode'): lambda: __import__('_codecs').encode,  # how protocol-2 pickles spell bytes
    ('builtins', 'bytearray'): lambda: bytearray,
    ('__builtin__', 'bytearray'): lambda: bytearray,
})


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; refuses every other global, so no pickled code runs."""

    def __init__(self, file, path: PathLike):
        super().__init__(file, encoding='bytes')
        self.path = os.fspath(path)

    def find_class(self, module: str, name: str) -> Any:
        resolve = _SAFE_PICKLE_GLOBALS.get((module, name))
        if resolve is None:
            raise DataError(
                f'refused to unpickle {module}.{name} from {self.path}: a CIFAR batch file holds only dicts, '
                f'lists and numpy arrays. Replace the file with the official one from the CIFAR "python version" '
                f'archive')
        return resolve()

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f'refused to unpickle a persistent id from {self.path}: not a CIFAR batch file')


def _load_cifar_pickle(path: Path) -> Dict[str, Any]:
    """Read one CIFAR pickle into a dict with str keys (the official files use bytes keys)."""
    try:
        with open(path, 'rb') as f:
            obj = _ArrayOnlyUnpickler(f, path).load()
    except DataError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OSError) as e:
        raise DataError(f'{path} is not a readable CIFAR pickle ({type(e).__name__}: {e}); replace it with the '
                        f'official file from the CIFAR "python version" archive') from e
    if not isinstance(obj, dict):
        raise DataError(f'{path} holds a {type(obj).__name__}, not the dict of a CIFAR batch file')
    return {k.decode('latin1') if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


CIFAR_LAYOUTS = {
    # name: (folder, {split: batch files}, meta file, class-names key, labels key)
    'cifar10': ('cifar-10-batches-py', {'train': [f'data_batch_{i}' for i in range(1, 6)], 'val': ['test_batch']},
                'batches.meta', 'label_names', 'labels'),
    'cifar100': ('cifar-100-python', {'train': ['train'], 'val': ['test']}, 'meta', 'fine_label_names',
                 'fine_labels'),
}


class _InMemoryImages(ClassesMixin, Dataset):
    """Images held in one array, (N, H, W) or (N, H, W, 3), with labels beside them."""

    native_mode = 'RGB'

    def __init__(self, data, targets, classes: List[str], transform=None, *, in_chans: int):
        self.data = data
        self.targets = targets
        self.classes = classes
        self.transform = transform
        self.mode = pil_mode(in_chans)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        image = Image.fromarray(np.asarray(self.data[index]))
        if self.mode != self.native_mode:
            image = image.convert(self.mode)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


class CifarDataset(_InMemoryImages):
    """CIFAR images held in memory: `data` is uint8 (N, 32, 32, 3), `targets` a list of ints."""

    native_mode = 'RGB'

    def __init__(self, data: np.ndarray, targets: List[int], classes: List[str], transform=None, *,
                 in_chans: int = 3):
        super().__init__(data, targets, classes, transform, in_chans=in_chans)


def _build_cifar(name: str, root: Path, split: str, transform, in_chans: int) -> CifarDataset:
    folder_name, split_files, meta_name, names_key, labels_key = CIFAR_LAYOUTS[name]
    wanted = list(split_files['train']) + list(split_files['val']) + [meta_name]
    expected = (f'expected {root}/{folder_name}/ (or {root} itself) holding {_all_files(wanted)}: the extracted '
                f'"CIFAR python version" archive')
    if not root.is_dir():
        raise DataError(f'{name} root {root} does not exist or is not a folder; {expected}')
    folder = root / folder_name if (root / folder_name).is_dir() else root
    missing = [f for f in split_files[split] + [meta_name] if not (folder / f).is_file()]
    if missing:
        raise DataError(f'{name}: missing {_all_files(missing)} in {folder}; {expected}')

    meta = _load_cifar_pickle(folder / meta_name)
    if names_key not in meta:
        raise DataError(f'{folder / meta_name} has no {names_key!r} entry; is it the {name} meta file?')
    classes = [n.decode('utf-8') if isinstance(n, bytes) else str(n) for n in meta[names_key]]

    datas, targets = [], []
    for file_name in split_files[split]:
        path = folder / file_name
        batch = _load_cifar_pickle(path)
        if 'data' not in batch or labels_key not in batch:
            raise DataError(f'{path} lacks {"data" if "data" not in batch else labels_key!r}; '
                            f'is it a {name} batch file?')
        data = np.asarray(batch['data'])
        labels = [int(v) for v in batch[labels_key]]
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
            raise DataError(f'{path}: data is {data.dtype} {tuple(data.shape)} with {len(labels)} labels, expected '
                            f'uint8 (N, 3072) with N labels')
        if labels and not 0 <= min(labels) <= max(labels) < len(classes):
            raise DataError(f'{path}: labels run from {min(labels)} to {max(labels)}, but {folder / meta_name} '
                            f'names {len(classes)} classes')
        datas.append(data)
        targets.extend(labels)
    # rows are channel-major (1024 red, 1024 green, 1024 blue): to HWC for PIL
    images = np.ascontiguousarray(np.concatenate(datas).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return CifarDataset(images, targets, classes, transform, in_chans=in_chans)


# ---------------------------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST: IDX files, plain or gzipped


def read_idx(path: PathLike, magic: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes (plain or .gz), checking its magic number, dimensions and size."""
    path = Path(path)
    try:
        opener = gzip.open if path.name.endswith('.gz') else open
        with opener(path, 'rb') as f:
            raw = bytearray(f.read())  # writable, so torch.from_numpy needs no copy
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f'cannot read {path} ({e}); download it again') from e
    if len(raw) < 4:
        raise DataError(f'{path} is truncated: {len(raw)} bytes, not even an IDX header; download it again')
    found = int.from_bytes(raw[:4], 'big')
    if found != magic:
        raise DataError(f'{path}: IDX magic number 0x{found:08x}, expected 0x{magic:08x} '
                        f'({"images" if magic == IDX_IMAGES_MAGIC else "labels"}); is it the right file?')
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f'{path} is truncated inside its IDX header; download it again')
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
    expected = math.prod(shape)
    if len(raw) - header != expected:
        raise DataError(f'{path}: header says {shape} = {expected} bytes of data, the file has {len(raw) - header}; '
                        f'it is {"truncated" if len(raw) - header < expected else "not an IDX file"}, '
                        f'download it again')
    return np.frombuffer(raw, dtype=np.uint8, count=expected, offset=header).reshape(shape)


class IdxDataset(_InMemoryImages):
    """MNIST-style data held in memory: `data` uint8 (N, H, W) and `targets` int64 (N,) tensors."""

    native_mode = 'L'

    def __init__(self, data: torch.Tensor, targets: torch.Tensor, classes: List[str], transform=None, *,
                 in_chans: int = 1):
        super().__init__(data, targets, classes, transform, in_chans=in_chans)


def _find_idx_file(folder: Path, name: str) -> Optional[Path]:
    for candidate in (folder / name, folder / f'{name}.gz'):
        if candidate.is_file():
            return candidate
    return None


def _build_idx(name: str, root: Path, split: str, transform, in_chans: int) -> IdxDataset:
    images_name, labels_name = MNIST_FILES[split]
    all_names = [n for pair in MNIST_FILES.values() for n in pair]
    # the folder itself, or torchvision's download layout under it
    folders = [root, root / 'raw', root / ('FashionMNIST' if name == 'fashion_mnist' else 'MNIST') / 'raw']
    for folder in folders:
        images_path, labels_path = _find_idx_file(folder, images_name), _find_idx_file(folder, labels_name)
        if images_path and labels_path:
            break
    else:
        hint = ''
        if name == 'fashion_mnist':
            hint = (f' To get them: t2tvit.data.fetch_fashion_mnist({str(root)!r}) in Python, '
                    f'`python -m t2tvit.data.fetch {root}` or `make data`, which take them from Debian\'s '
                    f'dataset-fashion-mnist package.')
        raise DataError(f'{name}: {images_name} and {labels_name} (or .gz) not found in {root}; the folder should '
                        f'hold the four IDX files {_all_files(all_names)}, plain or gzipped.{hint}')

    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise DataError(f'{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels; '
                        f'the two files must come from the same release')
    classes = FASHION_MNIST_CLASSES if name == 'fashion_mnist' else MNIST_CLASSES
    if len(labels) and int(labels.max()) >= len(classes):
        raise DataError(f'{labels_path}: label {int(labels.max())} found, {name} has {len(classes)} classes')
    return IdxDataset(torch.from_numpy(images), torch.from_numpy(labels).to(torch.int64), list(classes), transform,
                      in_chans=in_chans)


# ---------------------------------------------------------------------------------------------------------------
# Synthetic data for smoke tests


class FakeDataset(ClassesMixin, Dataset):
    """Deterministic synthetic images that a tiny model can learn.

    Sample i depends only on (seed, split, i): its label is drawn from that seed, and its pixels are a
    class-dependent colour (brightness rises with the label, a hue turns with it) plus noise.
    """

    def __init__(self, num_samples: int = 256, num_classes: int = 10, image_size: int = 32, split: str = 'train',
                 transform=None, *, in_chans: int = 3, seed: int = 0):
        self.num_samples = num_samples
        self.classes = [f'class_{i}' for i in range(num_classes)]
        self.image_size = image_size
        self.split = split
        self.transform = transform
        self.mode = pil_mode(in_chans)
        self.seed = seed
        self._split_id = 0 if split == 'train' else 1
        steps = np.arange(num_classes)
        brightness = 0.2 + 0.6 * steps / max(num_classes - 1, 1)
        hue = 2 * np.pi * steps[:, None] / num_classes + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
        self._class_colours = np.clip(brightness[:, None] + 0.15 * np.cos(hue), 0, 1)  # (num_classes, 3)

    def __len__(self) -> int:
        return self.num_samples

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self._split_id, index])

    def label(self, index: int) -> int:
        return int(self._rng(index).integers(self.num_classes))

    @property
    def targets(self) -> List[int]:
        return [self.label(i) for i in range(len(self))]

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        if not 0 <= index < len(self):
            raise IndexError(f'index {index} out of range for {len(self)} fake samples')
        rng = self._rng(index)
        target = int(rng.integers(self.num_classes))
        size = self.image_size
        pixels = self._class_colours[target] + rng.normal(0.0, 0.08, (size, size, 3))
        image = Image.fromarray(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8))  # RGB
        if self.mode != 'RGB':
            image = image.convert(self.mode)
        if self.transform is not None:
            image = self.transform(image)
        return image, target


# ---------------------------------------------------------------------------------------------------------------


def build_dataset(
        name: str,
        root: Union[str, Path, None],
        split: str,
        transform: Optional[Callable] = None,
        *,
        in_chans: int = 3,
        on_bad_image: str = 'fail',
        fake_num_samples: int = 256,
        fake_num_classes: int = 10,
        fake_image_size: int = 32,
        seed: int = 0,
) -> Dataset:
    """One entry point for every dataset: `name` in DATASETS, `split` 'train' or 'val' ('test' = 'val').

    'wds' (a folder of WebDataset shards) and 'hfds' (a folder or hub name that `datasets.load_dataset` reads) keep
    'test' apart from 'val' where the store has both. 'wds' returns a `WdsDataset`, which is read as a stream.

    Images reach `transform` as PIL images, 'L' when `in_chans` is 1 and 'RGB' otherwise; `on_bad_image`
    ('fail' or 'skip') decides what an unreadable image file in an image folder does.
    """
    if name not in DATASETS:
        raise DataError(f'unknown dataset {name!r}; choose one of {", ".join(DATASETS)}')
    if split not in SPLITS:
        raise DataError(f'unknown split {split!r}; use train or val (test is the same as val)')
    asked_split, split = split, SPLITS[split]
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise DataError(f"on_bad_image={on_bad_image!r}; use 'fail' (raise on a corrupt image) or 'skip'")
    if not isinstance(in_chans, int) or in_chans < 1:
        raise DataError(f'in_chans={in_chans!r}; use 1 (greyscale) or 3 (RGB)')

    if name == 'fake':
        for arg, value in (('fake_num_samples', fake_num_samples), ('fake_num_classes', fake_num_classes),
                           ('fake_image_size', fake_image_size)):
            if not isinstance(value, int) or value < 1:
                raise DataError(f'{arg}={value!r}; it must be a positive integer')
        return FakeDataset(fake_num_samples, fake_num_classes, fake_image_size, split, transform, in_chans=in_chans,
                           seed=seed)

    if root is None or str(root) == '':
        raise DataError(f'dataset {name!r} needs its folder: pass root (--data on the command line)')
    if name == 'hfds':  # a folder or a hub name; test and val stay apart where the store has both
        return build_hfds(str(root), asked_split, transform, in_chans, on_bad_image)
    root = Path(root).expanduser()
    if name == 'wds':
        if transform is not None:
            raise DataError('a WebDataset split is a stream: pass its transform to WdsDataset.stream()')
        return build_wds(root, asked_split, in_chans, on_bad_image)
    if name == 'imagefolder':
        return _build_imagefolder(root, split, transform, in_chans, on_bad_image)
    if name in CIFAR_LAYOUTS:
        return _build_cifar(name, root, split, transform, in_chans)
    return _build_idx(name, root, split, transform, in_chans)
