"""Run configuration: defaults, YAML recipes shipped in the package, command-line overrides, the saved copy.

A recipe is a flat YAML mapping over the keys of `DEFAULTS`; every key is also a command-line flag
(`lr_base_size` -> `--lr-base-size`). Values given on the command line are parsed as YAML, so `--mean "[0.5]"`,
`--aa null` and `--model-ema true` work.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from ..options import RECIPE_OPTIONS as OPTIONS
from .checkpointing import atomic_write
from ..options import OptionError, parse_yaml

__all__ = ['DEFAULTS', 'HELP', 'OPTIONS', 'RECIPES', 'ConfigError', 'load_recipe', 'resolve_config', 'save_config',
           'parse_value']

DEFAULTS: Dict[str, Any] = {k: o.default for k, o in OPTIONS.items()}
HELP: Dict[str, str] = {k: o.help for k, o in OPTIONS.items()}


class ConfigError(OptionError):
    """A recipe or override that does not make sense; the message names the key."""


def _recipe_dir() -> Path:
    return Path(str(resources.files('t2tvit') / 'configs'))


def recipes() -> List[str]:
    return sorted(p.stem for p in _recipe_dir().glob('*.yaml'))


RECIPES = recipes()


def parse_value(text: str) -> Any:
    """A command-line value, read as YAML: numbers, booleans, null, lists and mappings come out typed.

    Invalid YAML, or a mapping key with a colon in it (`{depth:1}`), is a ConfigError rather than a string.
    """
    try:
        return parse_yaml(text)
    except OptionError as e:
        raise ConfigError(str(e)) from None


def load_recipe(name_or_path: str) -> Dict[str, Any]:
    """A shipped recipe by name (`fashion_mnist`) or any YAML file by path; every key checked."""
    path = Path(name_or_path)
    if not path.suffix:
        path = _recipe_dir() / f'{name_or_path}.yaml'
    if not path.is_file():
        raise ConfigError(f'recipe {name_or_path!r} not found: use one of {", ".join(recipes())} or a YAML path')
    try:
        recipe = parse_yaml(path.read_text())
    except (OptionError, UnicodeDecodeError) as e:
        raise ConfigError(f'{path}: not valid YAML ({e})') from e
    recipe = recipe or {}
    if not isinstance(recipe, dict):
        raise ConfigError(f'{path}: a recipe is a mapping of keys to values')
    return _checked(recipe, str(path))


def _checked(mapping: Dict[str, Any], where: str) -> Dict[str, Any]:
    unknown = sorted(set(mapping) - set(OPTIONS))
    if unknown:
        raise ConfigError(f'{where}: unknown key(s) {", ".join(unknown)}; known keys: {", ".join(OPTIONS)}')
    out = {}
    for key, value in mapping.items():
        try:
            out[key] = OPTIONS[key].check(value)
        except OptionError as e:
            raise ConfigError(f'{where}: {str(e).replace(OPTIONS[key].flag, key, 1)}') from None
    return out


def resolve_config(recipe: Optional[str], overrides: Optional[Dict[str, Any]] = None,
                   base: Optional[Dict[str, Any]] = None, keep_null: bool = False) -> Dict[str, Any]:
    """DEFAULTS < `base` (e.g. the finetune recipe) < recipe < overrides; every key checked for type and range.

    An override of None means "not given", unless `keep_null` (the command line: `--clip-grad null`).
    """
    config = dict(DEFAULTS)
    config.update(_checked(dict(base or {}), 'base recipe'))
    config['recipe'] = None
    if recipe:
        config.update(load_recipe(recipe))
        config['recipe'] = Path(recipe).stem
    overrides = {k: v for k, v in (overrides or {}).items() if keep_null or v is not None}
    config.update(_checked({k: v for k, v in overrides.items() if k != 'recipe'}, 'command line'))
    _validate(config)
    return config


def _validate(c: Dict[str, Any]) -> None:
    """What no single key can say: how keys go together."""
    def need(cond: bool, message: str) -> None:
        if not cond:
            raise ConfigError(message)

    need(c['batch_size'] % c['accum_steps'] == 0,
         f"batch_size {c['batch_size']} is not divisible by accum_steps {c['accum_steps']}")
    for key in ('mean', 'std'):
        need(c[key] is None or len(c[key]) in (1, c['in_chans']),
             f"{key} has {len(c[key] or [])} values but in_chans is {c['in_chans']}; give one per channel")
    need(c['scale'][0] <= c['scale'][1], f"scale {c['scale']}: the first bound must not exceed the second")
    need(c['ratio'][0] <= c['ratio'][1], f"ratio {c['ratio']}: the first bound must not exceed the second")


def save_config(config: Dict[str, Any], path: Path) -> None:
    """Write the resolved config next to the run's outputs, atomically."""
    text = yaml.safe_dump(config, sort_keys=False)
    atomic_write(Path(path), lambda f: f.write(text.encode()), 'config')
