"""What a training run is made of, built from its config: the model, its transforms, its data and the checks that
come before any of them."""
from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Any, Dict, List, Optional

import timm
import timm.optim
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from .._create import check_model_name
from ..data import build_dataset, build_transform, holdout_split
from ..models import CheckpointError, checkpoint_filter_fn, mismatch_report, read_weights
from .config import ConfigError
from .preflight import check_memory, check_model_kwargs, check_optimizer

__all__ = ['build_model', 'preflight', 'load_pretrained_weights', 'resolve_norm', 'eval_transform_for',
           'train_transform_for', 'fake_split_size', 'dataset_split', 'training_sets', 'autocast_for',
           'optimizer_foreach', 'DATA_LAYOUT']


def build_model(config: Dict[str, Any], num_classes: int) -> nn.Module:
    kwargs = dict(config['model_kwargs'])
    kwargs.setdefault('drop_path_rate', config['drop_path'])
    check_model_name(config['model'])
    args = dict(num_classes=num_classes, in_chans=config['in_chans'], **kwargs)
    try:
        try:
            return timm.create_model(config['model'], img_size=config['img_size'], **args)
        except TypeError:
            # CNN builders (resnet18, mobilenetv2_100) take any image size and have no img_size argument; any
            # other refused argument fails again below, and its message names it
            return timm.create_model(config['model'], **args)
    except (TypeError, ValueError) as e:  # the builder refuses an argument: its message names it
        raise ConfigError(f"cannot build {config['model']} with model_kwargs {config['model_kwargs']}: {e}") from e


# what each data set's folder holds, for the message when it is missing
DATA_LAYOUT = {
    'imagefolder': 'train/ and val/ folders of class folders',
    'cifar10': 'cifar-10-batches-py (the python version)',
    'cifar100': 'cifar-100-python (the python version)',
    'mnist': 'train-images-idx3-ubyte(.gz), train-labels-idx1-ubyte(.gz), t10k-images-idx3-ubyte(.gz), ...',
    'fashion_mnist': 'train-images-idx3-ubyte(.gz), train-labels-idx1-ubyte(.gz), t10k-images-idx3-ubyte(.gz), '
                     '... (python -m t2tvit.data.fetch DIR fetches them)',
}


def preflight(config: Dict[str, Any], micro_batch: int, device: torch.device) -> None:
    """What can be checked before any folder is made or any data read: builder arguments, the optimizer name,
    the memory one micro-batch needs, that the model builds (on the meta device: no memory), the data folder."""
    check_model_kwargs(config['model'], config['model_kwargs'])
    check_optimizer(config['opt'])
    check_memory(config['img_size'], config['in_chans'], micro_batch, 'cuda' if device.type == 'cuda' else 'cpu')
    with torch.device('meta'):
        build_model(config, config['num_classes'] or 2)
    if config['dataset'] != 'fake':
        data = config['data']
        if data is None or not Path(data).is_dir():
            raise ConfigError(f"dataset {config['dataset']} reads a folder: --data {data} "
                              f"{'is not given' if data is None else 'is not an existing folder'}; give a folder "
                              f"holding {DATA_LAYOUT.get(config['dataset'], 'the data set')}")
    if config['pretrained'] is not None and not Path(config['pretrained']).is_file():
        raise ConfigError(f"pretrained {config['pretrained']} is not an existing file")


def load_pretrained_weights(model: nn.Module, path: str) -> List[str]:
    """Start from a checkpoint of any supported kind, or a pretrained tag's released weights (downloaded once), at
    another class count, resolution or channel count.

    Everything but the classifier must fit (after resizing `pos_embed` and adapting the first layer); a classifier
    of another shape is left freshly initialised. Returns the keys left at their initial values.
    """
    path, raw = read_weights(path)
    state_dict = checkpoint_filter_fn(raw, model)
    model_sd = model.state_dict()
    head_keys = [k for k in ('head.weight', 'head.bias') if k in model_sd]
    reset = [k for k in head_keys if k in state_dict and state_dict[k].shape != model_sd[k].shape]
    for k in reset:
        del state_dict[k]
    report = mismatch_report(state_dict, model, allow_missing=head_keys)
    if report:
        raise CheckpointError(f'{path} does not fit {type(model).__name__} beyond its classifier: {report}; '
                              f'is --model the architecture it was trained as?')
    model.load_state_dict(state_dict, strict=False)
    return reset + [k for k in head_keys if k not in state_dict and k not in reset]


def resolve_norm(config: Dict[str, Any], model: nn.Module):
    cfg = getattr(model, 'pretrained_cfg', {}) or {}
    mean = config['mean'] if config['mean'] is not None else cfg.get('mean')
    std = config['std'] if config['std'] is not None else cfg.get('std')
    return tuple(mean), tuple(std)


def eval_transform_for(config: Dict[str, Any], model: nn.Module):
    mean, std = resolve_norm(config, model)
    return build_transform(False, config['img_size'], in_chans=config['in_chans'], mean=mean, std=std,
                           interpolation=config['interpolation'], crop_pct=config['crop_pct'])


def train_transform_for(config: Dict[str, Any], model: nn.Module):
    mean, std = resolve_norm(config, model)
    return build_transform(
        True, config['img_size'], in_chans=config['in_chans'], mean=mean, std=std,
        interpolation=config['interpolation'], crop_pct=config['crop_pct'], scale=tuple(config['scale']),
        ratio=tuple(config['ratio']), hflip=config['hflip'], color_jitter=config['color_jitter'],
        auto_augment=config['aa'], re_prob=config['reprob'], re_mode=config['remode'], re_count=config['recount'])


def fake_split_size(fake_num_samples: int, split: str) -> int:
    """The fake data set's validation split is a quarter of its training split."""
    return fake_num_samples if split == 'train' else max(1, fake_num_samples // 4)


def dataset_split(config: Dict[str, Any], split: str) -> Dataset:
    """The run's data set `split` as stored, without transforms."""
    return build_dataset(
        config['dataset'], config['data'], split, transform=None, in_chans=config['in_chans'],
        on_bad_image=config['on_bad_image'], fake_num_samples=fake_split_size(config['fake_num_samples'], split),
        fake_num_classes=config['num_classes'] or 10, fake_image_size=config['img_size'], seed=config['seed'])


def training_sets(config: Dict[str, Any]):
    """(train, validation) of a run. With `val_holdout` N > 0, validation is N training images held out by seed
    and the data set's own validation split (the test set of MNIST-style data) is not read at all."""
    train_set = dataset_split(config, 'train')
    if config['val_holdout']:
        try:
            return holdout_split(train_set, config['val_holdout'], config['seed'])
        except ValueError as e:
            raise ConfigError(str(e)) from e
    return train_set, dataset_split(config, 'val')


def optimizer_foreach(opt: str, device: torch.device) -> Optional[bool]:
    """`foreach` for `timm.optim.create_optimizer_v2`: True on a CPU when the optimizer has a multi-tensor step.

    torch picks the multi-tensor step by itself only for CUDA tensors; on a CPU it loops over the parameters in
    Python. For AdamW and SGD the multi-tensor step gives the same numbers (tests/test_engine.py) in less time:
    AdamW on t2t_vit_mini's 75 tensors took 2.85 ms a step instead of 3.77
    (benchmarks/demo-fashion_mnist-loader-ab-2026-12-06.json). timm's LAMB, NAdam and RAdam round differently in the
    last bit with it.
    """
    if torch.device(device).type != 'cpu':
        return None
    try:
        opt_class = timm.optim.get_optimizer_class(opt.lower(), bind_defaults=False)
    except (ValueError, AssertionError, ImportError):
        return None  # an unknown name or one this machine cannot run: check_optimizer and timm report it
    return True if 'foreach' in inspect.signature(opt_class).parameters else None


def autocast_for(amp: str, device: torch.device):
    if amp == 'none':
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == 'bf16' else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
