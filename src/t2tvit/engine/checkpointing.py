"""Checkpoints and exported models written so that a crash, a full disk or a kill -9 never leaves a broken file."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict

import torch

from ..models import CheckpointError, read_checkpoint
from ..errors import InputError


class CheckpointSaveError(InputError, OSError):
    """Saving failed; the previous checkpoint at the same path is intact."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[BinaryIO], None], what: str = 'checkpoint') -> None:
    """Call `write` on a temporary file beside `path`, fsync it, then rename over `path` (atomic on POSIX).

    A failure leaves no temporary file behind and whatever `path` held before intact.
    """
    path = Path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    except OSError as e:  # the folder is missing, not a folder, or not writable
        raise CheckpointSaveError(e.errno, f'could not write {what} {path}: {e.strerror or e}; choose a writable '
                                  'place (--output)') from e
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it private; give it the permissions open() would
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException as e:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise CheckpointSaveError(
                e.errno, f'could not write {what} {path}: {e.strerror or e}; '
                f'the previous {path.name} (if any) is intact. Free disk space or choose another --output') from e
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def atomic_torch_save(obj: Any, path: Path) -> None:
    """`torch.save` through `atomic_write`: kill -9 never leaves a broken checkpoint behind."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_training_state(path: Path) -> Dict[str, Any]:
    """A t2tvit training checkpoint, read weights-only like every other checkpoint."""
    state = read_checkpoint(path)
    missing = [k for k in ('state_dict', 'optimizer', 'epoch', 'global_step') if k not in state]
    if missing:
        raise CheckpointError(f'{path} is not a t2tvit training checkpoint to resume from (lacks '
                              f'{", ".join(missing)}); to start from its weights, pass --pretrained {path} instead of '
                              f'--resume')
    return state


def check_writable(folder: Path) -> None:
    """Fail before training, not after an epoch, when the output folder cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / '.write-test'
        probe.write_bytes(b'ok')
        probe.unlink()
    except OSError as e:
        raise CheckpointSaveError(
            e.errno, f'output folder {folder} is not writable ({e.strerror or e}); choose another with --output') from e
