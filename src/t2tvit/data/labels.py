"""Class names for a model's outputs: a data set's own, ImageNet-1k's, or a user's labels file.

`imagenet_classes.txt` (shipped with the package, one class per line in index order) holds the WordNet lemmas that
timm lists in `timm.data.ImageNetInfo`; a test checks that the two agree.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import List, Optional, Sequence, Union

from .datasets import FASHION_MNIST_CLASSES, MNIST_CLASSES, DataError

__all__ = [
    'CIFAR10_CLASSES', 'CIFAR100_CLASSES', 'IMAGENET_CLASSES_FILE', 'dataset_classes', 'imagenet_classes',
    'read_labels_file', 'class_names_for',
]

IMAGENET_CLASSES_FILE = Path(__file__).with_name('imagenet_classes.txt')

# the order of batches.meta / meta in the CIFAR python archives (CIFAR-100: fine labels, alphabetical)
CIFAR10_CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
CIFAR100_CLASSES = [
    'apple', 'aquarium_fish', 'baby', 'bear', 'beaver', 'bed', 'bee', 'beetle', 'bicycle', 'bottle',
    'bowl', 'boy', 'bridge', 'bus', 'butterfly', 'camel', 'can', 'castle', 'caterpillar', 'cattle',
    'chair', 'chimpanzee', 'clock', 'cloud', 'cockroach', 'couch', 'crab', 'crocodile', 'cup', 'dinosaur',
    'dolphin', 'elephant', 'flatfish', 'forest', 'fox', 'girl', 'hamster', 'house', 'kangaroo', 'keyboard',
    'lamp', 'lawn_mower', 'leopard', 'lion', 'lizard', 'lobster', 'man', 'maple_tree', 'motorcycle', 'mountain',
    'mouse', 'mushroom', 'oak_tree', 'orange', 'orchid', 'otter', 'palm_tree', 'pear', 'pickup_truck', 'pine_tree',
    'plain', 'plate', 'poppy', 'porcupine', 'possum', 'rabbit', 'raccoon', 'ray', 'road', 'rocket',
    'rose', 'sea', 'seal', 'shark', 'shrew', 'skunk', 'skyscraper', 'snail', 'snake', 'spider',
    'squirrel', 'streetcar', 'sunflower', 'sweet_pepper', 'table', 'tank', 'telephone', 'television', 'tiger',
    'tractor', 'train', 'trout', 'tulip', 'turtle', 'wardrobe', 'whale', 'willow_tree', 'wolf', 'woman', 'worm',
]

_DATASET_CLASSES = {
    'fashion_mnist': FASHION_MNIST_CLASSES,
    'mnist': MNIST_CLASSES,
    'cifar10': CIFAR10_CLASSES,
    'cifar100': CIFAR100_CLASSES,
}


def dataset_classes(name: Optional[str]) -> Optional[List[str]]:
    """The fixed class list of a named data set, or None for data sets whose classes live on disk."""
    names = _DATASET_CLASSES.get(name or '')
    return list(names) if names is not None else None


@functools.lru_cache(maxsize=1)
def _imagenet_classes() -> tuple:
    return tuple(IMAGENET_CLASSES_FILE.read_text(encoding='utf-8').splitlines())


def imagenet_classes() -> List[str]:
    """The 1000 ImageNet-1k class names in index order ('tench, Tinca tinca', 'goldfish, Carassius auratus', ...)."""
    return list(_imagenet_classes())


def read_labels_file(path: Union[str, 'os.PathLike[str]'], num_classes: Optional[int] = None) -> List[str]:
    """One class name per line, in index order; a trailing empty line is allowed, none in between."""
    path = Path(path)
    try:
        text = path.read_text(encoding='utf-8')
    except FileNotFoundError:
        raise DataError(f'labels file {path} does not exist; give a text file with one class name per line') from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f'cannot read labels file {path} ({e}); give a UTF-8 text file, one class name per line') \
            from e
    names = [line.strip() for line in text.splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise DataError(f'labels file {path} is empty; write one class name per line, in index order')
    if num_classes is not None and len(names) != num_classes:
        raise DataError(f'labels file {path} has {len(names)} names but the model predicts {num_classes} classes; '
                        f'give one name per class, in index order')
    return names


def class_names_for(
        num_classes: int,
        saved: Optional[Sequence[str]] = None,
        dataset: Optional[str] = None,
        labels_file: Optional[Union[str, 'os.PathLike[str]']] = None,
) -> List[str]:
    """Names for `num_classes` outputs: a labels file, else the names a checkpoint saved, else the data set's,
    else ImageNet's for 1000 outputs, else the indices as text. A list of the wrong length is passed over."""
    if labels_file is not None:
        return read_labels_file(labels_file, num_classes)
    for names in (saved, dataset_classes(dataset)):
        if names is not None and len(names) == num_classes:
            return [str(n) for n in names]
    if num_classes == 1000:
        return imagenet_classes()
    return [str(i) for i in range(num_classes)]
