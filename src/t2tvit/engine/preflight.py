"""Checks a command makes when it starts: before it reads data, makes a folder or begins long work.

Each raises a `ConfigError` (or `OutputError`) whose message names the value and what to do instead.
"""
from __future__ import annotations

import collections.abc
import inspect
import os
import typing
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence, Union

from .config import ConfigError
from ..errors import InputError
from ..outputs import OutputError, claim_all

__all__ = ['OutputError', 'NonFiniteOutputError', 'available_memory', 'input_memory_bytes', 'check_bytes',
           'check_memory',
           'check_model_kwargs', 'check_optimizer', 'check_outputs', 'check_run_folder', 'check_finite', 'RUN_FILES']

PathLike = Union[str, 'os.PathLike[str]']


class NonFiniteOutputError(InputError, ValueError):
    """The model produced NaN or infinite logits: its weights (or the input) are broken."""


# --- memory -------------------------------------------------------------------------------------------------------

def available_memory(device: str = 'cpu') -> Optional[int]:
    """Bytes free for new tensors on `device` ('cpu' or 'cuda'); None when it cannot be told."""
    if str(device).startswith('cuda'):
        import torch
        if torch.cuda.is_available():
            return int(torch.cuda.mem_get_info()[0])
        return None
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    except (ValueError, OSError, AttributeError):
        return None


def input_memory_bytes(img_size: Union[int, Sequence[int]], in_chans: int, batch_size: int) -> int:
    """A lower bound on the float32 activations of one forward pass: the input batch and the first soft split.

    The first soft split (kernel 7, stride 4) unfolds every 7x7 patch at stride 4, 49/16 of the input's size;
    every layer after it adds more, so a size this bound refuses cannot run.
    """
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    return int(4 * batch_size * in_chans * h * w * (1 + 49 / 16))


def check_bytes(need: int, what: str, fix: str, device: str = 'cpu') -> None:
    """Refuse work that needs more than the memory `device` has free."""
    free = available_memory(device)
    if free is not None and need > free:
        raise ConfigError(f'{what} needs at least {need / 2 ** 30:.1f} GiB, more than the {free / 2 ** 30:.1f} GiB '
                          f'free on {device}; {fix}')


def check_memory(img_size: Union[int, Sequence[int]], in_chans: int, batch_size: int, device: str = 'cpu') -> None:
    """Refuse an image size and batch whose activations cannot fit in the memory `device` has free."""
    size = img_size if isinstance(img_size, int) else 'x'.join(map(str, img_size))
    check_bytes(input_memory_bytes(img_size, in_chans, batch_size),
                f'img_size {size} with {in_chans} channel(s) and batch {batch_size}',
                'lower --img-size or --batch-size', device)


# --- model arguments ----------------------------------------------------------------------------------------------

def _matches(value: Any, annotation: Any) -> bool:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any or annotation is typing.Any:
        return True
    if origin is Union:
        return any(_matches(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (tuple, list, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return not args or all(_matches(v, args[0]) for v in value)
    return True  # an annotation this check does not read: the builder decides


def _describe(annotation: Any) -> str:
    text = str(annotation).replace('typing.', '')
    return text if not isinstance(annotation, type) else annotation.__name__


def check_model_kwargs(model: str, kwargs: Dict[str, Any]) -> None:
    """Every key of `kwargs` must be an argument of the T2T-ViT model class, with a value of its type.

    Models from outside t2tvit are left to their builder (a wrong key there raises a TypeError that names it).
    """
    import timm
    import t2tvit  # noqa: F401  (registers the models)
    from ..models.t2t_vit import T2TViT
    if not kwargs or model.split('.')[0] not in timm.list_models(module='t2t_vit'):
        return
    hints = typing.get_type_hints(T2TViT.__init__)
    accepted = [p for p in T2TViT.__init__.__code__.co_varnames[1:T2TViT.__init__.__code__.co_argcount]]
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        raise ConfigError(f"model_kwargs: {', '.join(map(repr, unknown))} is not an argument of {model}; it takes "
                          f"{', '.join(accepted)}")
    for key, value in kwargs.items():
        if key in hints and not _matches(value, hints[key]):
            raise ConfigError(f'model_kwargs: {key}={value!r} is not of type {_describe(hints[key])}; give a value '
                              f'of that type (default: {_default_of(key)!r})')


def _default_of(key: str) -> Any:
    from ..models.t2t_vit import T2TViT
    return inspect.signature(T2TViT.__init__).parameters[key].default


def check_optimizer(name: str) -> None:
    """The optimizer must be one timm's registry builds."""
    import timm.optim
    listing = getattr(timm.optim, 'list_optimizers', None)
    if listing is None:  # an older timm: create_optimizer_v2 will say
        return
    known = listing()
    if str(name).lower() not in known:
        close = [n for n in known if n.startswith(str(name).lower()[:3])][:8]
        raise ConfigError(f'opt {name!r} is not an optimizer in timm\'s registry; use e.g. adamw, sgd, lamb'
                          + (f' (close: {", ".join(close)})' if close else '')
                          + '; python -c "import timm.optim; print(timm.optim.list_optimizers())" lists them')


# --- outputs ------------------------------------------------------------------------------------------------------

def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_outputs(outputs: Iterable[PathLike], inputs: Iterable[Optional[PathLike]] = (), force: bool = False) -> None:
    """Before any work: no output is an input, none exists already (unless `force`) or is named twice, all can be
    written. Each output is claimed (`t2tvit.outputs.claim`), so a later claim of it in the same command is refused.

    `force` allows replacing an earlier result, never an input.
    """
    outputs = [Path(p) for p in outputs]
    inputs = [Path(p) for p in inputs if p is not None]
    for out in outputs:
        for given in inputs:
            if _same(out, given):
                raise OutputError(f'output {out} is the input {given}; writing it would destroy the input. Choose '
                                  f'another output (-o/--output)')
        if out.is_dir():
            raise OutputError(f'output {out} is a folder; name a file, or a folder ending in /')
        if out.exists() and not out.is_file():
            raise OutputError(f'{out} is not a regular file; choose another output')
        parent = _nearest_existing(out.parent)
        if not parent.is_dir():
            raise OutputError(f'cannot write {out}: {parent} is a file, not a folder')
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f'cannot write {out}: folder {parent} is not writable; choose another output')
    claim_all(outputs, force=force)


# the files `t2tvit train` writes into its run folder
RUN_FILES = ('last.pth', 'best.pth', 'metrics.jsonl', 'config.yaml', 'curves.png', 'confusion_matrix.png',
             'eval.json', 'tensorboard')


def check_run_folder(run_dir: PathLike, resume: Optional[PathLike], force: bool = False) -> None:
    """A run folder's own files may be replaced only by a command that resumes that run (from its last.pth, or
    restarted by torchrun --max-restarts, maybe before its first last.pth); a fresh start (or one resumed from
    another run's checkpoint) claims them like any output."""
    run_dir = Path(run_dir)
    if resume is not None and _same(Path(resume).parent, run_dir):
        return
    if int(os.environ.get('TORCHELASTIC_RESTART_COUNT') or 0) > 0:  # torchrun restarted this same command
        return
    claim_all([run_dir / name for name in RUN_FILES], force=force)


def check_finite(logits: Any, what: str) -> None:
    """Raise when `logits` hold NaN or infinity: probabilities computed from them would be garbage."""
    import torch
    if not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).any(dim=-1).sum()) if logits.dim() > 1 else 1
        raise NonFiniteOutputError(
            f'the model gave NaN or infinite logits for {bad} input(s) ({what}); its weights are broken (a diverged '
            f'run or EMA?). Use another checkpoint, e.g. an earlier last.pth/best.pth')

