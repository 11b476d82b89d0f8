"""Small model facts shared by the tools: parameter counts and the list of registered variants."""
from __future__ import annotations

from typing import List, Tuple

import timm
import torch.nn as nn


def count_parameters(model: nn.Module) -> Tuple[int, int]:
    """(total, trainable) element counts.

    "Total" is what the official code reports as `model.parameters()`: every parameter plus the frozen tensors it
    kept as parameters (the sinusoid `pos_embed`, the Performer features `w`), which live here as persistent buffers.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    param_names = {name for name, _ in model.named_parameters()}
    buffers = sum(t.numel() for name, t in model.state_dict().items() if name not in param_names)
    return trainable + frozen + buffers, trainable


def list_variants(pretrained_tags: bool = False) -> List[str]:
    """Every registered T2T-ViT name (with `.tag` suffixes when `pretrained_tags`)."""
    from . import t2t_vit  # noqa: F401  (registers the models)
    return timm.list_models(module='t2t_vit', pretrained=pretrained_tags)
