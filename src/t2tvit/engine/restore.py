"""A trained model ready for use: rebuilt from what its checkpoint says, with its eval transform and class names.

`t2tvit eval`, `predict`, `export` and `visualize` all start here, so a checkpoint means the same model, the same
preprocessing and the same labels in every command.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional

import timm
import torch.nn as nn
from torchvision import transforms as T

from ..data.labels import class_names_for
from ..models import CheckpointError, extract_state_dict, load_checkpoint, read_checkpoint
from .config import ConfigError
from .preflight import check_memory, check_model_kwargs
from .train import eval_transform_for

__all__ = ['RestoredModel', 'restore_model', 'checkpoint_facts', 'architecture_of', 'SAFETENSORS_METADATA_KEY']

# safetensors files we write keep the training config and class names under this metadata key, as JSON
SAFETENSORS_METADATA_KEY = 't2tvit'
_CONFIG_FACTS = ('model', 'img_size', 'in_chans', 'model_kwargs', 'mean', 'std', 'crop_pct', 'interpolation',
                 'dataset', 'data', 'fake_num_samples', 'seed')


def _safetensors_metadata(path: str) -> Dict[str, Any]:
    from safetensors import safe_open
    with safe_open(path, framework='pt') as f:
        text = (f.metadata() or {}).get(SAFETENSORS_METADATA_KEY)
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError as e:
        raise CheckpointError(f'{path}: metadata {SAFETENSORS_METADATA_KEY!r} is not JSON ({e})') from e


def checkpoint_facts(raw: Any, saved: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """What a checkpoint says about its model: name, builder arguments, preprocessing, class count and names.

    `raw` is what `read_checkpoint` returned; `saved` holds the 'config'/'classes' entries when they live outside
    it (safetensors metadata).
    """
    facts: Dict[str, Any] = {}
    if not isinstance(raw, Mapping):
        return facts
    saved = dict(saved or {})
    if not saved:
        saved = {k: raw[k] for k in ('config', 'classes', 'arch') if k in raw}
    config = saved.get('config') if isinstance(saved.get('config'), Mapping) else {}
    facts.update({k: config[k] for k in _CONFIG_FACTS if config.get(k) is not None})
    if isinstance(saved.get('classes'), list):
        facts['classes'] = saved['classes']
    arch = saved.get('arch')
    if 'model' not in facts and isinstance(arch, str) and timm.is_model(arch.lower()):
        facts['model'] = arch.lower()  # official release files: arch='T2t_vit_14'
    head = extract_state_dict(raw).get('head.weight')
    if head is not None:
        facts['num_classes'] = head.shape[0]
    return facts


def read_facts(checkpoint: str) -> Any:
    """(raw checkpoint, facts) of a checkpoint file."""
    checkpoint = os.fspath(checkpoint)
    raw = read_checkpoint(checkpoint)
    saved = _safetensors_metadata(checkpoint) if checkpoint.endswith('.safetensors') else {}
    return raw, checkpoint_facts(raw, saved)


def architecture_of(checkpoint: str) -> Dict[str, Any]:
    """The model name and builder arguments a checkpoint was trained with, as recipe keys (empty when it does not
    say): what `t2tvit finetune` builds unless told otherwise."""
    _, facts = read_facts(checkpoint)
    if not facts.get('model'):
        return {}
    kwargs = {k: v for k, v in dict(facts.get('model_kwargs') or {}).items() if k != 'drop_path_rate'}
    return {'model': facts['model'], 'model_kwargs': kwargs}


def _find_transform(transform: Callable, kind: type) -> Any:
    return next((t for t in getattr(transform, 'transforms', []) if isinstance(t, kind)), None)


@dataclass
class RestoredModel:
    """A model in eval mode with everything needed to feed it and to read its outputs."""
    model: nn.Module
    name: str
    model_kwargs: Dict[str, Any]  # what `timm.create_model(name, **model_kwargs)` needs to rebuild it
    preprocess: Dict[str, Any]  # img_size, in_chans, mean, std, crop_pct, interpolation (mean/std None: cfg's)
    classes: List[str]
    checkpoint: Optional[str]
    facts: Dict[str, Any] = field(default_factory=dict)

    def transform(self) -> Callable:
        """PIL image -> normalised tensor, exactly as `t2tvit eval` prepares images."""
        return eval_transform_for(self.preprocess, self.model)

    def preprocessing_facts(self) -> Dict[str, Any]:
        """The eval transform as plain numbers, for code that runs the model without torch."""
        transform = self.transform()
        resize, crop, norm = (_find_transform(transform, kind) for kind in (T.Resize, T.CenterCrop, T.Normalize))
        # an int: the shorter side becomes this, keeping the aspect ratio; [h, w]: exactly this size; None: another
        # resize (timm keeps the ratio its own way for non-square sizes), described in 'transform'
        resize_size = getattr(resize, 'size', None)
        if isinstance(resize_size, (list, tuple)):
            resize_size = [int(v) for v in resize_size]
        return {
            'image_mode': 'L' if self.preprocess['in_chans'] == 1 else 'RGB',
            'resize': resize_size,
            'interpolation': self.preprocess['interpolation'],
            'center_crop': [int(v) for v in crop.size],
            'mean': [float(f'{v:.7g}') for v in norm.mean],  # float32 in the transform: 7 digits are exact
            'std': [float(f'{v:.7g}') for v in norm.std],
            'input_size': [self.preprocess['in_chans'], *[int(v) for v in crop.size]],
            'transform': ' -> '.join(repr(t).replace('\n', ' ') for t in transform.transforms),
        }


def restore_model(
        checkpoint: Optional[str] = None,
        model: Optional[str] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        img_size: Optional[int] = None,
        in_chans: Optional[int] = None,
        crop_pct: Optional[float] = None,
        interpolation: Optional[str] = None,
        labels: Optional[str] = None,
) -> RestoredModel:
    """Rebuild the model a checkpoint holds and load it strictly; without a checkpoint, `model` at random init.

    Arguments left as None come from the checkpoint (t2tvit checkpoints store their training config; safetensors
    files written by `t2tvit export` store it as metadata), then from the model's pretrained_cfg.
    """
    raw: Any = None
    facts: Dict[str, Any] = {}
    if checkpoint is not None:
        checkpoint = os.fspath(checkpoint)
        raw, facts = read_facts(checkpoint)
    name = model or facts.get('model')
    if not name:
        where = f'{checkpoint} does not say which model it holds' if checkpoint else 'no checkpoint given'
        raise ConfigError(f'{where}; pass --model NAME (`t2tvit info` lists them)')
    check_model_kwargs(name, dict(model_kwargs or {}))
    kwargs = dict(facts.get('model_kwargs', {}))
    kwargs.update(model_kwargs or {})
    kwargs.pop('drop_path_rate', None)
    for key, value in (('img_size', img_size), ('in_chans', in_chans)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f'{key} {value!r}: give a whole number >= 1, or None to take the checkpoint\'s')
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise ConfigError(f'crop_pct {crop_pct!r}: give a number in (0, 1], or None to take the checkpoint\'s')
    size = img_size if img_size is not None else facts.get('img_size')
    chans = in_chans if in_chans is not None else facts.get('in_chans')
    if size:
        kwargs['img_size'] = size
    if chans:
        kwargs['in_chans'] = chans
    if 'num_classes' in facts:
        kwargs['num_classes'] = facts['num_classes']
    if kwargs.get('img_size'):
        check_memory(kwargs['img_size'], kwargs.get('in_chans', 3), 1)
    try:
        net = timm.create_model(name, **kwargs)
    except RuntimeError as e:
        if 'Unknown model' in str(e):
            raise ConfigError(f'unknown model {name!r}; `t2tvit info` lists the registered ones') from e
        raise
    except TypeError as e:
        raise ConfigError(f'{name} does not take these arguments {kwargs}: {e}') from e
    except ValueError as e:  # the model refuses a value: its message names it and the allowed ones
        raise ConfigError(f'cannot build {name}: {e}') from e
    if not hasattr(net, 'img_size') or not hasattr(net, 'in_chans'):
        raise ConfigError(f'{name} is a {type(net).__name__}, not a T2T-ViT model; t2tvit commands take T2T-ViT '
                          f'checkpoints (`t2tvit info` lists the models)')
    if raw is not None:
        try:
            load_checkpoint(net, raw)
        except CheckpointError as e:
            raise CheckpointError(f'{checkpoint}: {e}') from e
    net.eval()
    cfg = net.pretrained_cfg
    built_size = net.img_size[0] if net.img_size[0] == net.img_size[1] else list(net.img_size)
    preprocess = {
        'img_size': built_size, 'in_chans': net.in_chans,
        'mean': facts.get('mean'), 'std': facts.get('std'),
        'crop_pct': crop_pct if crop_pct is not None else facts.get('crop_pct') or cfg.get('crop_pct', 0.9),
        'interpolation': interpolation or facts.get('interpolation') or cfg.get('interpolation', 'bicubic'),
    }
    kwargs.update(img_size=built_size, in_chans=net.in_chans, num_classes=net.num_classes)
    classes = class_names_for(net.num_classes, facts.get('classes'), facts.get('dataset'), labels)
    return RestoredModel(net, name, kwargs, preprocess, classes, checkpoint, facts)
