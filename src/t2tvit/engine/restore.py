"""A trained model ready for use: rebuilt from what its checkpoint says, with its eval transform and class names.

`t2tvit eval`, `predict`, `export` and `visualize` all start here, so a checkpoint means the same model, the same
preprocessing and the same labels in every command.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional

import timm
import torch.nn as nn
from torchvision import transforms as T

from ..data.labels import class_names_for
from .._create import check_model_name
from ..models import CheckpointError, extract_state_dict, load_checkpoint, read_checkpoint, read_weights
from ..options import check_pretrained_flags
from .config import ConfigError
from .preflight import check_memory, check_model_kwargs
from .build import eval_transform_for

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


def _args_facts(args: Any) -> Dict[str, Any]:
    """What the official (timm 0.3) and timm training scripts record in `args`: model, img_size or input_size,
    in_chans, model_kwargs, crop_pct, interpolation, mean, std."""
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if not isinstance(args, Mapping):
        return {}
    facts: Dict[str, Any] = {}
    model = args.get('model')
    if isinstance(model, str) and timm.is_model(model.lower()):
        facts['model'] = model.lower()  # official scripts: --model T2t_vit_14
    kwargs = args.get('model_kwargs')
    if isinstance(kwargs, Mapping) and kwargs:
        facts['model_kwargs'] = dict(kwargs)  # timm train.py --model-kwargs img_size=64
    input_size = args.get('input_size')
    if isinstance(input_size, (list, tuple)) and len(input_size) == 3:
        facts['in_chans'], size = int(input_size[0]), [int(v) for v in input_size[1:]]
        facts['img_size'] = size[0] if size[0] == size[1] else size
    elif isinstance(args.get('img_size'), int):
        facts['img_size'] = args['img_size']
    if isinstance(args.get('in_chans'), int):
        facts['in_chans'] = args['in_chans']
    if isinstance(args.get('crop_pct'), float):
        facts['crop_pct'] = args['crop_pct']
    if isinstance(args.get('interpolation'), str) and args['interpolation']:
        facts['interpolation'] = args['interpolation']
    for key in ('mean', 'std'):
        if isinstance(args.get(key), (list, tuple)) and args[key]:
            facts[key] = [float(v) for v in args[key]]
    return facts


def checkpoint_facts(raw: Any, saved: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """What a checkpoint says about its model: name, builder arguments, preprocessing, class count and names.

    `raw` is what `read_checkpoint` returned; `saved` holds the 'config'/'classes' entries when they live outside
    it (safetensors metadata). A t2tvit training config comes first, then the `args` the official and timm training
    scripts save, then the official `arch`. `facts['sources']` says where each fact came from.
    """
    facts: Dict[str, Any] = {}
    sources: Dict[str, str] = {}
    if not isinstance(raw, Mapping):
        return facts
    saved = dict(saved or {})
    if not saved:
        saved = {k: raw[k] for k in ('config', 'classes', 'arch') if k in raw}
    config = saved.get('config') if isinstance(saved.get('config'), Mapping) else {}
    facts.update({k: config[k] for k in _CONFIG_FACTS if config.get(k) is not None})
    sources.update({k: 'checkpoint config' for k in facts})
    for key, value in _args_facts(raw.get('args')).items():
        if key not in facts:
            facts[key], sources[key] = value, 'checkpoint args'
    if isinstance(saved.get('classes'), list):
        facts['classes'] = saved['classes']
    arch = saved.get('arch')
    if 'model' not in facts and isinstance(arch, str) and timm.is_model(arch.lower()):
        facts['model'], sources['model'] = arch.lower(), 'checkpoint arch'  # official release files: 'T2t_vit_14'
    for key in ('best_top1', 'metric', 'acc'):  # t2tvit, official main.py (top-1), official transfer_learning.py
        if isinstance(raw.get(key), (int, float)) and not isinstance(raw.get(key), bool):
            facts['recorded_top1'] = float(raw[key])
            break
    head = extract_state_dict(raw).get('head.weight')
    if head is not None:
        facts['num_classes'], sources['num_classes'] = head.shape[0], 'checkpoint weights'
    if sources:
        facts['sources'] = sources
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
    sources: Dict[str, str] = field(default_factory=dict)  # setting -> where it came from (flag, checkpoint, cfg)

    def describe_sources(self) -> str:
        """One line: each setting that built and feeds the model, and where it came from."""
        values = dict(self.model_kwargs, model=self.name, **{k: v for k, v in self.preprocess.items()
                                                              if k not in ('mean', 'std') or v is not None})
        by_source: Dict[str, List[str]] = {}
        for key, source in self.sources.items():
            if key in values:
                by_source.setdefault(source, []).append(f'{key}={values[key]}')
        return '; '.join(f"{', '.join(items)} ({source})" for source, items in by_source.items())

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


def _model_settings(facts: Dict[str, Any], found: Dict[str, Any], flags: Dict[str, Any], img_size: Optional[int],
                    in_chans: Optional[int], sources: Dict[str, str]) -> Dict[str, Any]:
    """The model's kwargs: the checkpoint's, with the flags over them; where each came from goes into `sources`."""
    kwargs = dict(facts.get('model_kwargs', {}))
    kwargs.update(flags)
    kwargs.pop('drop_path_rate', None)
    for key in kwargs:
        sources[key] = 'flag' if key in flags else found.get('model_kwargs', 'checkpoint')
    for key, flag in (('img_size', img_size), ('in_chans', in_chans)):
        if flag:
            kwargs[key], sources[key] = flag, 'flag'
        elif facts.get(key):
            kwargs[key], sources[key] = facts[key], found[key]
    if 'num_classes' in facts:
        kwargs['num_classes'], sources['num_classes'] = facts['num_classes'], found['num_classes']
    return kwargs


def _preprocess_settings(net: nn.Module, name: str, facts: Dict[str, Any], found: Dict[str, Any],
                         crop_pct: Optional[float], interpolation: Optional[str],
                         sources: Dict[str, str]) -> Dict[str, Any]:
    """How inputs for the built model are prepared: the flags, else the checkpoint's record, else the model's
    pretrained_cfg; where each came from goes into `sources` (the cfg also for the size settings not yet there)."""
    cfg = net.pretrained_cfg
    cfg_name = f"pretrained cfg {cfg.get('architecture', name)}.{cfg.get('tag')}" if cfg.get('tag') else \
        'pretrained cfg'
    for key in ('img_size', 'in_chans', 'num_classes'):
        sources.setdefault(key, cfg_name)
    built_size = net.img_size[0] if net.img_size[0] == net.img_size[1] else list(net.img_size)
    preprocess = {'img_size': built_size, 'in_chans': net.in_chans}
    for key, flag in (('crop_pct', crop_pct), ('interpolation', interpolation), ('mean', None), ('std', None)):
        if flag:
            preprocess[key], sources[key] = flag, 'flag'
        elif facts.get(key) is not None:
            preprocess[key], sources[key] = facts[key], found[key]
        else:  # mean/std None: the transform takes the cfg's
            preprocess[key] = None if key in ('mean', 'std') else cfg.get(key, {'crop_pct': 0.9}.get(key, 'bicubic'))
            sources[key] = cfg_name
    return preprocess


def restore_model(
        checkpoint: Optional[str] = None,
        model: Optional[str] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        img_size: Optional[int] = None,
        in_chans: Optional[int] = None,
        crop_pct: Optional[float] = None,
        interpolation: Optional[str] = None,
        labels: Optional[str] = None,
        pretrained: bool = False,
) -> RestoredModel:
    """Rebuild the model a checkpoint holds and load it strictly; without a checkpoint, `model` at random init, or
    with `pretrained` its released weights (`model` a pretrained tag such as 't2t_vit_14.in1k', downloaded once).

    Arguments left as None come from the checkpoint (t2tvit checkpoints store their training config, official and
    timm ones their `args`; safetensors files written by `t2tvit export` store it as metadata), then from the
    model's pretrained_cfg. `RestoredModel.sources` says where each setting came from.
    """
    check_pretrained_flags(checkpoint, pretrained, model)
    raw: Any = None
    facts: Dict[str, Any] = {}
    if checkpoint is not None:
        checkpoint = os.fspath(checkpoint)
        raw, facts = read_facts(checkpoint)
    found = dict(facts.get('sources', {}))
    sources: Dict[str, str] = {}
    name = model or facts.get('model')
    if not name:
        where = f'{checkpoint} does not say which model it holds' if checkpoint else 'no checkpoint given'
        raise ConfigError(f'{where}; pass --model NAME (`t2tvit info` lists them)')
    check_model_kwargs(name, dict(model_kwargs or {}))
    sources['model'] = 'flag' if model else found['model']
    _check_preprocess_args(img_size, in_chans, crop_pct)
    kwargs = _model_settings(facts, found, model_kwargs or {}, img_size, in_chans, sources)
    if kwargs.get('img_size'):
        check_memory(kwargs['img_size'], kwargs.get('in_chans', 3), 1)
    release = _read_release(name) if pretrained else None
    net = _create_t2t_model(name, release, kwargs)
    if raw is not None:
        try:
            load_checkpoint(net, raw)
        except CheckpointError as e:
            raise CheckpointError(f'{checkpoint}: {e}') from e
    net.eval()
    cfg = net.pretrained_cfg
    preprocess = _preprocess_settings(net, name, facts, found, crop_pct, interpolation, sources)
    kwargs.update(img_size=preprocess['img_size'], in_chans=net.in_chans, num_classes=net.num_classes)
    classes = class_names_for(net.num_classes, facts.get('classes'), facts.get('dataset') or _dataset_of(cfg), labels)
    if release is not None:
        facts['release'] = f"{cfg.get('architecture', name)}.{cfg.get('tag')}"
        # the release file's own record of its accuracy, as a checkpoint file's is read above
        facts.update({k: v for k, v in checkpoint_facts(release).items() if k == 'recorded_top1'})
    where = checkpoint if checkpoint is not None else (f"{name} released weights ({cfg.get('url')})"
                                                        if pretrained else None)
    return RestoredModel(net, name, kwargs, preprocess, classes, where, facts, sources)


def _check_preprocess_args(img_size: Optional[int], in_chans: Optional[int], crop_pct: Optional[float]) -> None:
    for key, value in (('img_size', img_size), ('in_chans', in_chans)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f'{key} {value!r}: give a whole number >= 1, or None to take the checkpoint\'s')
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise ConfigError(f'crop_pct {crop_pct!r}: give a number in (0, 1], or None to take the checkpoint\'s')


def _read_release(name: str) -> Any:
    """The release file of pretrained tag `name` (downloaded once), read weights-only; refuses a tag without one."""
    if name not in timm.list_pretrained():
        base = name.partition('.')[0]
        tags = timm.list_pretrained(f'{base}.*')
        released = f"released weights: {', '.join(tags)}" if tags else f'no weights of {base} were released'
        raise ConfigError(f"{name} has no weights to download ({released}; timm.list_pretrained('t2t*') lists "
                          f"every tag with weights)")
    where, raw = read_weights(name)
    try:
        extract_state_dict(raw)
    except CheckpointError as e:
        raise CheckpointError(f'{where}: {e}') from e
    return raw


def _create_t2t_model(name: str, release: Any, kwargs: Dict[str, Any]) -> nn.Module:
    """timm's model `name`, loaded with the weights of `release` (a release file as read) when given; refuses
    anything but a T2T-ViT."""
    check_model_name(name)
    # timm's loader takes the weights from the cfg: its filter, classifier swap and strict load apply as usual
    extra = {} if release is None else dict(
        pretrained=True, pretrained_cfg_overlay=dict(state_dict=extract_state_dict(release)))
    try:
        net = timm.create_model(name, **extra, **kwargs)
    except TypeError as e:
        raise ConfigError(f'{name} does not take these arguments {kwargs}: {e}') from e
    except ValueError as e:  # the model refuses a value: its message names it and the allowed ones
        if isinstance(e, CheckpointError):
            raise
        raise ConfigError(f'cannot build {name}: {e}') from e
    if not hasattr(net, 'img_size') or not hasattr(net, 'in_chans'):
        raise ConfigError(f'{name} is a {type(net).__name__}, not a T2T-ViT model; t2tvit commands take T2T-ViT '
                          f'checkpoints (`t2tvit info` lists the models)')
    return net


def _dataset_of(cfg: Mapping[str, Any]) -> Optional[str]:
    """The named data set a pretrained tag's classes are those of: `..._ft_cifar10` -> 'cifar10'."""
    tag = cfg.get('tag') or ''
    return next((d for d in ('cifar100', 'cifar10') if tag.endswith(d)), None)
