"""t2tvit: Tokens-to-Token ViT for timm. `import t2tvit` registers every T2T-ViT variant with timm."""
from __future__ import annotations

from typing import Any, Optional

import timm
import torch.nn as nn

from .cpu_kernels import use_cpu_kernels
from .models import (  # noqa: F401  (registers the models with timm)
    CheckpointError,
    T2TViT,
    checkpoint_filter_fn,
    count_parameters,
    list_variants,
    load_checkpoint,
)

__version__ = '0.1.0'


def create_model(
        model_name: str,
        pretrained: bool = False,
        checkpoint_path: Optional[str] = None,
        **kwargs: Any,
) -> nn.Module:
    """`timm.create_model` for T2T-ViT names, plus `checkpoint_path`: any official or t2tvit checkpoint file.

    Unlike timm's own `checkpoint_path`, the file goes through `checkpoint_filter_fn`, so official EMA checkpoints,
    DDP prefixes, another resolution and another channel count all load; the load stays strict.
    """
    model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    if checkpoint_path:
        load_checkpoint(model, checkpoint_path)
    return model


__all__ = [
    'CheckpointError', 'T2TViT', 'checkpoint_filter_fn', 'count_parameters', 'create_model', 'list_variants',
    'load_checkpoint', 'use_cpu_kernels', '__version__',
]
