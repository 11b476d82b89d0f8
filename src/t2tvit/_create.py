"""`t2tvit.create_model`: timm's, plus any official or t2tvit checkpoint file."""
from __future__ import annotations

from typing import Any, Optional

import timm
import torch.nn as nn
from timm.models import parse_model_name

from .errors import InputError
from .models import load_checkpoint

__all__ = ['create_model', 'check_model_name', 'UnknownModelError']


class UnknownModelError(InputError, RuntimeError):
    """A model name timm has no builder for; a RuntimeError too, as timm's own refusal is."""


def check_model_name(name: str) -> None:
    """Refuse a name timm's registry does not hold, naming where the list is; a hub or local-folder source
    (`hf-hub:ORG/REPO`, `local-dir:PATH`) names its architecture in its own config, so it is left to timm."""
    source, _ = parse_model_name(name)
    if source is None and not timm.is_model(name):
        raise UnknownModelError(f'unknown model {name!r}; `t2tvit info` lists the registered ones')


def create_model(
        model_name: str,
        pretrained: bool = False,
        checkpoint_path: Optional[str] = None,
        **kwargs: Any,
) -> nn.Module:
    """`timm.create_model` for T2T-ViT names, plus `checkpoint_path`: any official or t2tvit checkpoint file.

    Unlike timm's own `checkpoint_path`, the file goes through `checkpoint_filter_fn`, so official EMA checkpoints,
    DDP prefixes, another resolution and another channel count all load; the load stays strict. An unknown name
    raises `UnknownModelError`.
    """
    check_model_name(model_name)
    model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    if checkpoint_path:
        load_checkpoint(model, checkpoint_path)
    return model
