"""`t2tvit.create_model`: timm's, plus any official or t2tvit checkpoint file."""
from __future__ import annotations

from typing import Any, Optional

import timm
import torch.nn as nn

from .models import load_checkpoint

__all__ = ['create_model']


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
