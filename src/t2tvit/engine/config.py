"""Run configuration: defaults, YAML recipes shipped in the package, command-line overrides, the saved copy.

A recipe is a flat YAML mapping over the keys of `DEFAULTS`; every key is also a command-line flag
(`lr_base_size` -> `--lr-base-size`). Values given on the command line are parsed as YAML, so `--mean "[0.5]"`,
`--aa null` and `--model-ema true` work.
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

__all__ = ['DEFAULTS', 'HELP', 'RECIPES', 'ConfigError', 'load_recipe', 'resolve_config', 'save_config',
           'parse_value']

# key: (default, help). One per line; the unit or meaning after the comma.
_SPEC: Dict[str, Tuple[Any, str]] = {
    # model
    'model': ('t2t_vit_14', 'registered model name (t2tvit info lists them)'),
    'model_kwargs': ({}, 'extra keyword arguments for the model builder, as a YAML mapping'),
    'img_size': (224, 'training and evaluation image size, pixels'),
    'in_chans': (3, 'input channels'),
    'num_classes': (None, 'classifier outputs; null takes the data set\'s class count'),
    'drop_path': (0.1, 'stochastic depth rate of the last block'),
    'pretrained': (None, 'checkpoint to start from (official .pth.tar, t2tvit checkpoint or .safetensors)'),
    'freeze_backbone': (False, 'train only the classifier head'),
    # data
    'dataset': ('imagefolder', 'imagefolder | cifar10 | cifar100 | mnist | fashion_mnist | fake | wds (WebDataset '
                                'shards) | hfds (a Hugging Face dataset folder or hub name)'),
    'data': (None, 'data set folder (hfds: also a hub name)'),
    'on_bad_image': ('fail', 'an unreadable image in an ImageFolder: fail (naming it) or skip (and count it)'),
    'val_holdout': (0, 'validate on this many training images, held out by seed, instead of the data set\'s '
                       'validation split (which then stays untouched for a final test); 0 for the split'),
    'fake_num_samples': (256, 'fake data set: training samples (validation gets a quarter)'),
    'mean': (None, 'normalisation mean per channel; null takes the model\'s pretrained_cfg'),
    'std': (None, 'normalisation std per channel; null takes the model\'s pretrained_cfg'),
    'interpolation': ('bicubic', 'resize interpolation'),
    'crop_pct': (0.9, 'evaluation centre crop: resize to img_size / crop_pct, then crop img_size'),
    'scale': ([0.08, 1.0], 'random-resized-crop area range'),
    'ratio': ([0.75, 1.3333333], 'random-resized-crop aspect range'),
    'hflip': (0.5, 'horizontal flip probability'),
    'color_jitter': (0.4, 'colour jitter strength; null for none'),
    'aa': (None, 'timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1; null for none'),
    'reprob': (0.0, 'random erasing probability'),
    'remode': ('pixel', 'random erasing mode'),
    'recount': (1, 'random erasing count'),
    'mixup': (0.0, 'Mixup alpha; 0 disables'),
    'cutmix': (0.0, 'CutMix alpha; 0 disables'),
    'mixup_prob': (1.0, 'probability of applying Mixup or CutMix to a batch'),
    'mixup_switch_prob': (0.5, 'probability of CutMix instead of Mixup when both are on'),
    'mixup_mode': ('batch', 'batch | pair | elem'),
    'smoothing': (0.1, 'label smoothing'),
    'workers': (4, 'data loading processes per training process'),
    # optimisation
    'epochs': (310, 'training epochs'),
    'batch_size': (512, 'global batch size: all processes and accumulation steps together'),
    'accum_steps': (1, 'gradient accumulation steps per optimizer step'),
    'opt': ('adamw', 'timm optimizer name'),
    'momentum': (0.9, 'SGD momentum'),
    'lr': (5e-4, 'learning rate for lr_base_size images, scaled linearly with batch_size'),
    'lr_base_size': (512, 'batch size that lr is given for'),
    'weight_decay': (0.05, 'decoupled weight decay (not on norms, biases, cls_token, pos_embed)'),
    'layer_decay': (None, 'layer-wise LR decay factor for fine-tuning, e.g. 0.75; null for none'),
    'clip_grad': (None, 'clip the gradient norm to this; null for no clipping'),
    'sched': ('cosine', 'timm scheduler name'),
    'warmup_epochs': (5, 'linear warm-up epochs'),
    'warmup_lr': (1e-6, 'learning rate at the start of the warm-up'),
    'min_lr': (1e-5, 'learning rate at the end of the schedule'),
    'model_ema': (False, 'keep an exponential moving average of the weights'),
    'model_ema_decay': (0.99996, 'EMA decay per optimizer step'),
    # execution
    'amp': ('none', 'none | bf16 | fp16 (fp16 needs a GPU; it uses a gradient scaler)'),
    'compile': (False, 'torch.compile the model'),
    'device': ('auto', 'auto | cpu | cuda'),
    'seed': (0, 'seed of every random choice: data order, augmentation, dropout'),
    'max_steps': (None, 'stop after this many optimizer steps in total (a budget); null for none'),
    # output
    'output': ('runs', 'folder holding run folders'),
    'run_name': (None, 'run folder name; null gives RECIPE-MODEL'),
    'ckpt_interval': (200, 'also save last.pth every this many optimizer steps (for resuming mid-epoch)'),
    'log_interval': (50, 'log training metrics every this many optimizer steps'),
    'eval_interval': (1, 'evaluate every this many epochs (and always after the last)'),
    'tensorboard': (False, 'also write TensorBoard event files'),
    'progress': ('auto', 'progress bars: auto (when a terminal), on, off'),
}
DEFAULTS: Dict[str, Any] = {k: v[0] for k, v in _SPEC.items()}
HELP: Dict[str, str] = {k: v[1] for k, v in _SPEC.items()}


class ConfigError(ValueError):
    """A recipe or override that does not make sense; the message names the key."""


def _recipe_dir() -> Path:
    return Path(str(resources.files('t2tvit') / 'configs'))


def recipes() -> List[str]:
    return sorted(p.stem for p in _recipe_dir().glob('*.yaml'))


RECIPES = recipes()


def _numbers(value: Any) -> Any:
    """YAML 1.1 reads `5e-4` (no dot) as a string; people mean a number."""
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in '.eEn') else int(value)
        except ValueError:
            return value
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    return value


def parse_value(text: str) -> Any:
    """A command-line value, read as YAML: numbers, booleans, null, lists and mappings come out typed."""
    try:
        return _numbers(yaml.safe_load(text))
    except yaml.YAMLError:
        return text


def load_recipe(name_or_path: str) -> Dict[str, Any]:
    """A shipped recipe by name (`fashion_mnist`) or any YAML file by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = _recipe_dir() / f'{name_or_path}.yaml'
    if not path.is_file():
        raise ConfigError(f'recipe {name_or_path!r} not found: use one of {", ".join(recipes())} or a YAML path')
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f'{path}: not valid YAML ({e})') from e
    if not isinstance(recipe, dict):
        raise ConfigError(f'{path}: a recipe is a mapping of keys to values')
    recipe = _numbers(recipe)
    _check_keys(recipe, str(path))
    return recipe


def _check_keys(mapping: Dict[str, Any], where: str) -> None:
    unknown = sorted(set(mapping) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f'{where}: unknown key(s) {", ".join(unknown)}; known keys: {", ".join(DEFAULTS)}')


def resolve_config(recipe: Optional[str], overrides: Optional[Dict[str, Any]] = None,
                   base: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """DEFAULTS < `base` (e.g. the finetune recipe) < recipe < overrides; checked for sense."""
    config = dict(DEFAULTS)
    config.update(base or {})
    config['recipe'] = None
    if recipe:
        config.update(load_recipe(recipe))
        config['recipe'] = Path(recipe).stem
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    _check_keys({k: v for k, v in overrides.items() if k != 'recipe'}, 'command line')
    config.update(overrides)
    _validate(config)
    return config


def _validate(c: Dict[str, Any]) -> None:
    def need(cond: bool, message: str) -> None:
        if not cond:
            raise ConfigError(message)

    need(isinstance(c['epochs'], int) and c['epochs'] >= 1, f"epochs must be a positive integer, got {c['epochs']!r}")
    need(isinstance(c['batch_size'], int) and c['batch_size'] >= 1,
         f"batch_size must be a positive integer, got {c['batch_size']!r}")
    need(isinstance(c['accum_steps'], int) and c['accum_steps'] >= 1,
         f"accum_steps must be a positive integer, got {c['accum_steps']!r}")
    need(c['batch_size'] % c['accum_steps'] == 0,
         f"batch_size {c['batch_size']} is not divisible by accum_steps {c['accum_steps']}")
    need(c['amp'] in ('none', 'bf16', 'fp16'), f"amp must be none, bf16 or fp16, got {c['amp']!r}")
    need(c['device'] in ('auto', 'cpu', 'cuda'), f"device must be auto, cpu or cuda, got {c['device']!r}")
    need(c["progress"] in ("auto", "on", "off", True, False), "progress must be auto, on or off")
    need(c['on_bad_image'] in ('fail', 'skip'), f"on_bad_image must be fail or skip, got {c['on_bad_image']!r}")
    need(isinstance(c['lr'], (int, float)) and c['lr'] > 0, f"lr must be a positive number, got {c['lr']!r}")
    need(isinstance(c['model_kwargs'], dict), 'model_kwargs must be a mapping')
    need(isinstance(c['val_holdout'], int) and not isinstance(c['val_holdout'], bool) and c['val_holdout'] >= 0,
         f"val_holdout must be a non-negative integer (images held out of the training split), "
         f"got {c['val_holdout']!r}")
    need(c['max_steps'] is None or (isinstance(c['max_steps'], int) and c['max_steps'] >= 1),
         f"max_steps must be a positive integer or null, got {c['max_steps']!r}")


def save_config(config: Dict[str, Any], path: Path) -> None:
    """Write the resolved config next to the run's outputs, atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    os.replace(tmp, path)
