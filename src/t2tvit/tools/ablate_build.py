"""Which models `t2tvit ablate` trains and how each is built: the design study's variants at their common small
scale, or any timm model built for the data set's image size, channels and classes.

A timm model whose builder has no `img_size` argument (the CNNs) is built without it; `--model-kwargs
NAME="{...}"` adds or overrides builder arguments of one variant. Every model is built and run on one batch of
the data set's image shape before any training, so a model that cannot take it stops the study at once with the fix.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import timm
import torch
import torch.nn as nn

from ..engine.config import ConfigError
from ..engine.build import build_model
from .ablate_variants import ABLATION_VARIANTS

__all__ = ['check_variants', 'variant_kwargs', 'build_variant', 'check_variant_input', 'idea_of']


def _is_timm_model(name: str) -> bool:
    import t2tvit  # noqa: F401  (registers the T2T-ViT models with timm)
    return bool(name) and (timm.is_model(name) or timm.is_model(name.split('.')[0]))


def check_variants(variants: Sequence[str], model_kwargs: Optional[Mapping[str, Any]] = None) -> List[str]:
    """The variants in order without repeats; each a design-study variant or a timm model name."""
    chosen = list(dict.fromkeys(v.strip() for v in variants if v.strip()))
    if not chosen:
        raise ConfigError(f'no variants given; choose from: {", ".join(ABLATION_VARIANTS)}, or any timm model name')
    unknown = [v for v in chosen if v not in ABLATION_VARIANTS and not _is_timm_model(v)]
    if unknown:
        raise ConfigError(f'unknown variant(s) {", ".join(unknown)}; the ablation knows {", ".join(ABLATION_VARIANTS)} '
                          f'and every timm model name (timm.list_models() lists them); pass them comma-separated '
                          f'to --variants')
    stray = sorted(set(model_kwargs or {}) - set(chosen))
    if stray:
        raise ConfigError(f'--model-kwargs names {", ".join(stray)}, which is not among --variants '
                          f'({", ".join(chosen)}); give NAME="{{...}}" for a variant that is trained')
    return chosen


def variant_kwargs(variant: str, scale: str, extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Builder arguments of `variant`: the small-scale build of a design-study variant (nothing at scale 'paper'
    and for timm models), then what --model-kwargs gives for it."""
    kwargs: Dict[str, Any] = {}
    if variant in ABLATION_VARIANTS and scale == 'small':
        kwargs = dict(ABLATION_VARIANTS[variant].small_kwargs)
        if 'soft_splits' in kwargs:  # as YAML-friendly lists, the way the run's config.yaml stores them
            kwargs['soft_splits'] = [list(split) for split in kwargs['soft_splits']]
        if 'block_config' in kwargs:
            kwargs['block_config'] = list(kwargs['block_config'])
    kwargs.update(dict((extra or {}).get(variant) or {}))
    return kwargs


def idea_of(variant: str) -> str:
    return ABLATION_VARIANTS[variant].idea if variant in ABLATION_VARIANTS else 'timm model'


def build_variant(variant: str, kwargs: Mapping[str, Any], img_size: int, in_chans: int,
                  num_classes: int) -> nn.Module:
    """The model the training engine builds for this variant (the same function), in eval mode on the CPU."""
    config = dict(model=variant, model_kwargs=dict(kwargs), drop_path=0.0, img_size=img_size, in_chans=in_chans)
    return build_model(config, num_classes).eval()


def check_variant_input(variant: str, kwargs: Mapping[str, Any], img_size: int, in_chans: int,
                        num_classes: int) -> None:
    """Build `variant` and run two blank images of the data set's shape through it; a model that cannot take them
    is the user's choice of model, reported with the fix."""
    shape = f'{in_chans}x{img_size}x{img_size}'
    fix = (f'give it builder arguments that fit, e.g. --model-kwargs {variant}="{{patch_size: 4}}" for a ViT, or '
           f'choose another model')
    try:
        model = build_variant(variant, kwargs, img_size, in_chans, num_classes)
        with torch.no_grad():
            out = model(torch.zeros(2, in_chans, img_size, img_size))
    except ConfigError as e:
        raise ConfigError(f'{variant} cannot be built for {shape} input: {e}; {fix}') from e
    # the model's own refusal (a kernel larger than the feature map, a size check): the message says which
    except (RuntimeError, ValueError, AssertionError, TypeError, IndexError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f'{variant} cannot take {shape} input ({first}); {fix}') from e
    if tuple(out.shape) != (2, num_classes):
        raise ConfigError(f'{variant} gives outputs of shape {tuple(out.shape)} for {shape} input, not (2, '
                          f'{num_classes}); {fix}')
