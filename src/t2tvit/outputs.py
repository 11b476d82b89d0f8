"""The one rule for every file a command writes: a file that existed before the command started is not replaced
or removed unless the user passed `--force`, and no command writes the same name twice.

A writer calls `claim(path, force)` (or `claim_all`) for each output before it does any work. Inside a command
(`command_outputs()`, which the command line opens around every command) the claimed names are remembered, so a
second claim of the same name in the same invocation is refused whatever `--force` says: it would replace the
command's own first output. Outside a command (library use) only the names of one `claim_all` call are compared.

The one exception, a run folder's own files when a command resumes that run, is decided by the caller: it does not
claim them. Writers that name many files themselves may pick free names instead (`unique_stems`, `free_stem`).

This module imports only the standard library.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Union

from .errors import InputError

__all__ = ['OutputError', 'claim', 'claim_all', 'command_outputs', 'unique_stems', 'free_stem']

PathLike = Union[str, 'os.PathLike[str]']

_claimed: Optional[Dict[str, str]] = None  # absolute path -> what claimed it; None outside a command


class OutputError(InputError, ValueError):
    """An output that would replace a file the command did not create, or that cannot be written."""


@contextlib.contextmanager
def command_outputs() -> Iterator[None]:
    """Remember every name claimed until the block ends: one command line invocation."""
    global _claimed
    previous, _claimed = _claimed, {}
    try:
        yield
    finally:
        _claimed = previous


def _key(path: Path) -> str:
    return os.path.normpath(os.path.abspath(path))


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()  # a dangling link is replaced by a write as well


def claim(path: PathLike, force: bool = False, what: str = '') -> Path:
    """Refuse `path` when it exists (unless `force`) or was claimed already in this command; else remember it."""
    path = Path(path)
    key = _key(path)
    if _claimed is not None and key in _claimed:
        first = _claimed[key]
        raise OutputError(f'{path} would be written twice by this command ({first} and {what or "again"}); '
                          f'give the outputs different names (--force does not help: both are new)')
    if _exists(path) and not force:
        raise OutputError(f'{path} exists already; pass --force to replace it, or choose another output')
    if _claimed is not None:
        _claimed[key] = what or str(path)
    return path


def claim_all(paths: Iterable[PathLike], force: bool = False, what: Optional[Sequence[str]] = None) -> List[Path]:
    """`claim` each path; two equal names among `paths` are refused even outside a command."""
    paths = [Path(p) for p in paths]
    labels = list(what) if what is not None else [str(p) for p in paths]
    seen: Dict[str, str] = {}
    for path, label in zip(paths, labels):
        key = _key(path)
        if key in seen:
            raise OutputError(f'{path} would be written twice by this command ({seen[key]} and {label}); give the '
                              f'outputs different names (--force does not help: both are new)')
        seen[key] = label
    for path, label in zip(paths, labels):
        claim(path, force, label)
    return paths


def unique_stems(stems: Sequence[str]) -> List[str]:
    """`stems` with repeats renamed STEM-1, STEM-2, ... (never equal to another given stem)."""
    taken, used, out = set(stems), set(), []
    for stem in stems:
        name, n = stem, 0
        while name in used or (name != stem and name in taken):
            n += 1
            name = f'{stem}-{n}'
        used.add(name)
        out.append(name)
    return out


def free_stem(folder: PathLike, stem: str, suffixes: Sequence[str]) -> str:
    """STEM, or the first STEM-1, STEM-2, ... for which no FOLDER/NAME+SUFFIX exists or was claimed."""
    folder = Path(folder)
    n, name = 0, stem
    while any(_exists(folder / f'{name}{s}') or (_claimed is not None and _key(folder / f'{name}{s}') in _claimed)
              for s in suffixes):
        n += 1
        name = f'{stem}-{n}'
    return name
