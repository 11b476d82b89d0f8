"""Freed memory kept for reuse on CPU: glibc's malloc told to keep what a training or inference step frees, so that
the next step's tensors land on pages already mapped rather than on fresh ones the kernel must fault in and zero.

By default glibc returns freed memory to the system once more than a threshold of it sits at the top of the heap,
and serves each allocation above another threshold from a fresh mapping. Both thresholds follow the largest
block freed so far (at most 32 MiB), so they depend on a model's shapes: at batch 16 a T2T-ViT-14 step frees blocks
of 14.5 MB (its blocks' widest products) and its heap's top swings by 34 MB, above the 29 MB glibc then keeps, so
every step faulted in 42,000-68,000 fresh pages in inference and 99,000-143,000 in training on an AVX2-only AMD EPYC
(DeiT-S, in a process of its own: 8,000-57,000 and 23,000-108,000). With the thresholds below, fewer than 1,500 a
step; in the benchmark's process, T2T-ViT-14's fp32 training step went from 0.84-0.85 of DeiT-S's speed per MAC to
0.89-1.01 (benchmarks/amd-epyc-avx2-2026-12-07-heap-ab.json).

`keep_heap_pages()` sets them for the whole process, once: `t2tvit` commands on CPU do (through
`t2tvit.cpu_kernels.for_device`), as does `t2tvit benchmark`, for every model it times. It leaves the allocator as
it is where it is not glibc's, where the environment already tunes it (`MALLOC_MMAP_THRESHOLD_`,
`MALLOC_TRIM_THRESHOLD_`, `MALLOC_TOP_PAD_`, `GLIBC_TUNABLES`, or another allocator preloaded), and with
`T2TVIT_KEEP_HEAP=0`. The cost: a process keeps up to `TRIM_THRESHOLD` of freed memory mapped instead of giving it
back (its peak stayed within 3% in those runs).
"""
import ctypes
import os
import platform
from typing import Any, Callable, Dict, Optional

__all__ = ['keep_heap_pages', 'heap_state', 'KEEP_HEAP_ENV', 'MMAP_THRESHOLD', 'TRIM_THRESHOLD']

KEEP_HEAP_ENV = 'T2TVIT_KEEP_HEAP'
MMAP_THRESHOLD = 64 << 20  # blocks up to this size come from the heap (glibc's own rule stops at 32 MiB)
TRIM_THRESHOLD = 512 << 20  # freed memory at the heap's top kept up to this size
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
_TUNING_ENV = ('MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_', 'MALLOC_TOP_PAD_', 'GLIBC_TUNABLES')

_STATE: Optional[Dict[str, Any]] = None  # what keep_heap_pages did, once it has run


def _why_not(environ) -> Optional[str]:
    if environ.get(KEEP_HEAP_ENV, '1').strip().lower() in ('0', 'false', 'no', 'off'):
        return f'{KEEP_HEAP_ENV}={environ[KEEP_HEAP_ENV]}'
    tuned = [name for name in _TUNING_ENV if name in environ]
    if tuned:
        return f'the environment tunes the allocator ({", ".join(tuned)})'
    if 'malloc' in environ.get('LD_PRELOAD', ''):  # jemalloc, tcmalloc, mimalloc
        return f'another allocator is preloaded (LD_PRELOAD={environ["LD_PRELOAD"]})'
    if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
        return 'not glibc\'s allocator'
    return None


def keep_heap_pages(environ=None, mallopt: Optional[Callable[[int, int], int]] = None) -> Dict[str, Any]:
    """Have glibc keep freed memory for reuse (see the module's docstring); returns `heap_state()`. Once per
    process: later calls change nothing. `environ` and `mallopt` stand in for the real ones in tests."""
    global _STATE
    if _STATE is None:
        why = _why_not(os.environ if environ is None else environ)
        if why is None:
            mallopt = mallopt or ctypes.CDLL(None).mallopt
            # the mmap threshold first: setting either fixes both, and glibc's rule would otherwise keep its own
            if not mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) or not mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD):
                why = 'glibc refused the thresholds (mallopt)'
        _STATE = (dict(kept=True, mmap_threshold=MMAP_THRESHOLD, trim_threshold=TRIM_THRESHOLD) if why is None
                  else dict(kept=False, why=why))
    return heap_state()


def heap_state() -> Dict[str, Any]:
    """What `keep_heap_pages` did in this process: `kept` and the thresholds, or `why` not (recorded by
    `t2tvit benchmark`)."""
    return dict(_STATE) if _STATE is not None else {'kept': False, 'why': 'not asked for'}
