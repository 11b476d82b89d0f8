"""Single images as users have them (photos, scans, icons) turned into what a model's transform expects.

`ImageFolderDataset` reads training images as they are; these are files named on a command line, in any mode PIL
reads: phone photos carry an EXIF rotation, icons have transparency, scans are 16-bit.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageOps
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..options import not_regular_file
from .readers import UNREADABLE_IMAGE_ERRORS, DataError

__all__ = ['load_image', 'find_images', 'IMAGE_SUFFIXES', 'UNREADABLE_IMAGE_ERRORS']

IMAGE_SUFFIXES = tuple(sorted(set(IMG_EXTENSIONS) | {'.gif', '.jfif'}))
PathLike = Union[str, 'os.PathLike[str]']


def load_image(path: PathLike, mode: str = 'RGB') -> Image.Image:
    """Open an image upright, in `mode` ('RGB' or 'L'); transparent parts become white, as viewers show them.

    Dropping alpha instead (PIL's convert) would show whatever colour transparent pixels happen to store, often
    black. 16-bit greyscale is scaled to 8 bits rather than clipped.
    """
    why = not_regular_file(os.fspath(path))  # a FIFO would block open() for ever
    if why:
        raise OSError(f'{path} {why}; not opened')
    with open(path, 'rb') as f:
        image = Image.open(f)
        image.load()  # reads the whole file, so a truncated or corrupt one fails here
    image = ImageOps.exif_transpose(image)
    if image.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8))
    has_alpha = image.mode in ('RGBA', 'LA', 'PA') or (image.mode == 'P' and 'transparency' in image.info)
    if has_alpha:
        rgba = image.convert('RGBA')
        image = Image.alpha_composite(Image.new('RGBA', rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert(mode)


def find_images(inputs: Sequence[PathLike], skipped: Optional[List[Tuple[str, str]]] = None) -> List[Path]:
    """Files as given, and the image files under each folder (recursively, sorted); missing paths are refused.

    What is not a regular file (a FIFO, a device, a socket) is never opened: it goes to `skipped` as (path, what it
    is) when a list is given, else it is refused.
    """
    found: List[Path] = []

    def skip(path: Path, why: str) -> None:
        if skipped is None:
            raise DataError(f'{path} {why}; give image files or folders of images')
        skipped.append((str(path), f'{why}; not opened'))

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = []
            for p in sorted(path.rglob('*')):
                if p.suffix.lower() not in IMAGE_SUFFIXES or p.is_dir():
                    continue
                why = not_regular_file(str(p))
                if why is None:
                    files.append(p)
                elif p.exists():  # not a dangling link
                    skip(p, why)
            if not files and not (skipped and any(s[0].startswith(str(path)) for s in skipped)):
                raise DataError(f'folder {path} holds no images (looked for {", ".join(IMAGE_SUFFIXES)})')
            found.extend(files)
        elif path.exists():
            why = not_regular_file(str(path))
            if why is None:
                found.append(path)  # named explicitly: reading it decides whether it is an image
            else:
                skip(path, why)
        else:
            raise DataError(f'{path} does not exist; give image files or folders of images')
    return found
