"""What every data set reader shares: the error it raises, the image errors that count as an unreadable file, the
PIL mode for a channel count, the class-list properties, and the one loop that skips unreadable images."""
from __future__ import annotations

from typing import Callable, List, TypeVar

from PIL import Image

from ..errors import InputError

__all__ = ['DataError', 'UNREADABLE_IMAGE_ERRORS', 'MAX_BAD_IMAGES_IN_A_ROW', 'ClassesMixin', 'pil_mode',
           'read_skipping_unreadable']

# A skipped image is replaced by the next one; give up after this many unreadable files in a row.
MAX_BAD_IMAGES_IN_A_ROW = 64
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

Sample = TypeVar('Sample')


class DataError(InputError, ValueError):
    """Data that cannot be found or read; the message names the path and what to do about it."""


def pil_mode(in_chans: int) -> str:
    """One channel means greyscale images; anything else is read as RGB."""
    return 'L' if in_chans == 1 else 'RGB'


class ClassesMixin:
    classes: List[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def read_skipping_unreadable(index: int, size: int, read: Callable[[int], Sample], *, skip: bool,
                             on_skip: Callable[[int, Exception], None],
                             fail_message: Callable[[int, Exception], str],
                             give_up_message: Callable[[int, int], str],
                             errors: tuple = UNREADABLE_IMAGE_ERRORS, unit: str = 'images') -> Sample:
    """`read(i)` for sample `index`, or (with `skip`) for the first readable sample after it, wrapping round.

    A read that raises one of `errors` fails with `fail_message(i, error)`, or with `skip` calls
    `on_skip(i, error)` and tries the next sample, up to MAX_BAD_IMAGES_IN_A_ROW in a row, then fails with
    `give_up_message(index, tries)`. An index outside the data set raises IndexError, which ends iteration.
    """
    if not -size <= index < size:
        raise IndexError(f'index {index} out of range for {size} {unit}')
    index %= size
    tries = min(size, MAX_BAD_IMAGES_IN_A_ROW)
    for attempt in range(tries):
        position = (index + attempt) % size
        try:
            return read(position)
        except errors as e:
            if not skip:
                raise DataError(fail_message(position, e)) from e
            on_skip(position, e)
    raise DataError(give_up_message(index, tries))
