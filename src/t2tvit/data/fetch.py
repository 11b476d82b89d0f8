"""Get Fashion-MNIST from Debian's `dataset-fashion-mnist` package, without root and without Python downloading.

`apt-get download` fetches the .deb through the machine's configured apt sources and `dpkg -x` unpacks it into a
temporary folder; only the four IDX files are kept. Run as `python -m t2tvit.data.fetch DEST`.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence, Union

from .datasets import MNIST_FILES, DataError

__all__ = ['fetch_fashion_mnist', 'FASHION_MNIST_PACKAGE', 'FASHION_MNIST_GZ_FILES']

FASHION_MNIST_PACKAGE = 'dataset-fashion-mnist'
PACKAGE_DATA_DIR = Path('usr/share/datasets/fashion-mnist')
FASHION_MNIST_GZ_FILES = tuple(f'{name}.gz' for pair in MNIST_FILES.values() for name in pair)
_TIMEOUT_S = 1800


def _manual_fix(dest: Path) -> str:
    return (f'Fix: on a Debian/Ubuntu machine run `apt-get download {FASHION_MNIST_PACKAGE} && dpkg -x '
            f'{FASHION_MNIST_PACKAGE}_*.deb x` and copy x/{PACKAGE_DATA_DIR}/*-ubyte.gz into {dest}, or download '
            f'the four IDX files ({", ".join(FASHION_MNIST_GZ_FILES)}) by hand into {dest}; then point --data at '
            f'that folder')


def _present(dest: Path) -> bool:
    """All four files are there, gzipped or not (both forms are read)."""
    return all((dest / name).is_file() or (dest / name[:-len('.gz')]).is_file() for name in FASHION_MNIST_GZ_FILES)


def _run(command: List[str], cwd: Path, dest: Path) -> None:
    tool = command[0]
    if shutil.which(tool) is None:
        raise DataError(f'cannot fetch Fashion-MNIST: `{tool}` is not installed here (it needs a Debian-based '
                        f'system). {_manual_fix(dest)}')
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DataError(f'cannot fetch Fashion-MNIST: `{" ".join(command)}` failed to run ({e}). '
                        f'{_manual_fix(dest)}') from e
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise DataError(f'cannot fetch Fashion-MNIST: `{" ".join(command)}` exited with {result.returncode}'
                        f'{": " + " / ".join(output) if output else ""}. {_manual_fix(dest)}')


def _copy_atomically(source: Path, target: Path) -> None:
    """Copy to a temporary name beside the target, then rename: a reader never sees half a file."""
    partial = target.with_name(f'.{target.name}.{os.getpid()}.part')  # created with the usual permissions
    try:
        shutil.copyfile(source, partial)
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def fetch_fashion_mnist(dest: Union[str, Path]) -> Path:
    """Put the four Fashion-MNIST `.gz` IDX files into `dest` (a no-op when they are already there); return it."""
    dest = Path(dest).expanduser()
    if _present(dest):
        return dest
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f'cannot create {dest} for Fashion-MNIST ({e}); choose a writable folder') from e
    with tempfile.TemporaryDirectory(prefix='t2tvit-fashion-mnist-') as tmp:
        tmp = Path(tmp)
        _run(['apt-get', 'download', FASHION_MNIST_PACKAGE], tmp, dest)
        debs = sorted(tmp.glob(f'{FASHION_MNIST_PACKAGE}_*.deb'))
        if not debs:
            raise DataError(f'cannot fetch Fashion-MNIST: `apt-get download {FASHION_MNIST_PACKAGE}` left no .deb '
                            f'in {tmp}. {_manual_fix(dest)}')
        _run(['dpkg', '-x', str(debs[-1]), str(tmp / 'x')], tmp, dest)
        source = tmp / 'x' / PACKAGE_DATA_DIR
        missing = [name for name in FASHION_MNIST_GZ_FILES if not (source / name).is_file()]
        if missing:
            raise DataError(f'cannot fetch Fashion-MNIST: {debs[-1].name} lacks {", ".join(missing)} under '
                            f'/{PACKAGE_DATA_DIR}. {_manual_fix(dest)}')
        for name in FASHION_MNIST_GZ_FILES:
            _copy_atomically(source / name, dest / name)
    return dest


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m t2tvit.data.fetch', description=fetch_fashion_mnist.__doc__)
    parser.add_argument('dest', help='folder to hold the four Fashion-MNIST IDX files')
    args = parser.parse_args(argv)
    try:
        dest = fetch_fashion_mnist(args.dest)
    except DataError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    print(f'Fashion-MNIST IDX files are in {dest.resolve()}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
