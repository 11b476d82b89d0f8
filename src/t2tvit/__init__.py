"""t2tvit: Tokens-to-Token ViT for timm. `import t2tvit` registers every T2T-ViT variant with timm.

The registration waits for timm: when timm is already imported it happens at once, otherwise the moment timm is
imported (`import t2tvit; import timm; timm.create_model('t2t_vit_14')` works either way). So `import t2tvit`
alone, as the `t2tvit` command does before it knows what to run, costs no torch import; the names below are
loaded on first use.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any, Optional

__version__ = '0.1.0'

# public name -> module that defines it
_LAZY = {
    'CheckpointError': '.models', 'T2TViT': '.models', 'checkpoint_filter_fn': '.models',
    'count_parameters': '.models', 'list_variants': '.models', 'load_checkpoint': '.models',
    'create_model': '._create', 'use_cpu_kernels': '.cpu_kernels',
}

__all__ = [
    'CheckpointError', 'T2TViT', 'checkpoint_filter_fn', 'count_parameters', 'create_model', 'list_variants',
    'load_checkpoint', 'use_cpu_kernels', '__version__',
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


def _register() -> None:
    importlib.import_module('.models', __name__)  # its builders carry @register_model


class _RegisterAfterTimm(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds timm as usual, then registers the T2T-ViT variants right after timm's own package has run."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Optional[Any]:
        if fullname != 'timm':
            return None
        sys.meta_path.remove(self)  # once: find the real spec with the other finders
        spec = importlib.util.find_spec('timm')
        if spec is None or spec.loader is None:
            return None
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        _register()


if 'timm' in sys.modules:
    _register()
elif not any(isinstance(f, _RegisterAfterTimm) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTimm())
