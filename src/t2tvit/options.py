"""Option specifications: one entry per option gives its flag, type, range, default and help.

The command line builds its flags from these entries, checks every value against them before any work starts, and
prints their help; recipes (YAML files) are checked against the same entries. This module imports neither torch nor
timm, so `t2tvit --help` and argument errors answer at once.
"""
from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from .errors import InputError

__all__ = ['Option', 'OptionError', 'RECIPE_OPTIONS', 'parse_yaml', 'KINDS', 'DATASET_NAMES', 'SCHEDULERS',
           'not_regular_file', 'table', 'check_pretrained_flags', 'check_weights_source',
           'check_agreement']

# Data sets `build_dataset` reads (t2tvit.data.DATASETS; a test keeps the two equal).
DATASET_NAMES = ('imagefolder', 'cifar10', 'cifar100', 'mnist', 'fashion_mnist', 'fake', 'wds', 'hfds')
# timm schedulers the training loop can drive: stepped per update, no validation metric needed (a test checks that
# timm's create_scheduler_v2 builds each one)
SCHEDULERS = ('cosine', 'tanh', 'step', 'multistep', 'poly', 'constant')


MESSAGE_MARK = '\x00'  # starts a refusal that names its option itself (argparse's 'argument X: ' prefix goes)


class OptionError(InputError, ValueError):
    """A value an option does not take; the message names the option, the value and what it takes."""


def parse_yaml(text: str) -> Any:
    """A value written as YAML (`1e-3`, `true`, `null`, `[0.5, 0.5]`, `{depth: 2}`), read strictly.

    Text that is not valid YAML is an error rather than a string, and a mapping key holding a colon (`{depth:1}`,
    which YAML reads as the key 'depth:1' with no value) is an error naming the fix.
    """
    import yaml
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise OptionError(f'{text!r} is not valid YAML ({first})') from None
    value = _numbers(value)
    _check_mapping_keys(value, text)
    return value


def _check_mapping_keys(value: Any, text: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and ':' in key and item is None:
                name, _, rest = key.partition(':')
                raise OptionError(f'{text!r}: YAML reads {key!r} as one key without a value; write '
                                  f'"{{{name}: {rest}}}" with a space after the colon')
            _check_mapping_keys(item, text)
    elif isinstance(value, list):
        for item in value:
            _check_mapping_keys(item, text)


def _numbers(value: Any) -> Any:
    """YAML 1.1 reads `5e-4` (no dot) as a string; people mean a number."""
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in '.eE') else int(value)
        except ValueError:
            return value
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    return value


def not_regular_file(path: str) -> Optional[str]:
    """None for a regular file (or a link to one); else what the path is, in words, without opening it."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return 'does not exist'
    except OSError as e:
        return f'cannot be examined ({e.strerror or e})'
    if stat.S_ISREG(mode):
        return None
    for test, words in ((stat.S_ISDIR, 'a folder'), (stat.S_ISFIFO, 'a FIFO (named pipe)'),
                        (stat.S_ISSOCK, 'a socket'), (stat.S_ISCHR, 'a character device'),
                        (stat.S_ISBLK, 'a block device')):
        if test(mode):
            return f'is {words}, not a regular file'
    return 'is not a regular file'


# --- kinds: what each accepts, how it is worded, shown and read --------------------------------------------------

@dataclass(frozen=True)
class Kind:
    """How an option of one kind checks a value and words, shows and reads it.

    check(option, value): the value converted, or `option.fail(...)` raised (null is handled before).
    takes(option): what it accepts in words, without the null clause.
    typed: a YAML value of another type than text is this kind's value (`1e-3` a number, `[1, 2]` a list); text
        kinds keep the text as written when YAML reads something else.
    """
    check: Callable[['Option', Any], Any]
    takes: Callable[['Option'], str]
    metavar: Callable[['Option'], str] = lambda option: 'TEXT'
    typed: bool = False
    always_yaml: bool = False  # written as YAML even on a flag that is not a recipe key
    takes_in_help: bool = False  # the help line ends with `[takes()]`
    has_value: bool = True  # False: present or not (store_true)
    repeatable: bool = False  # each use adds one item (argparse 'append')


def _fixed(text: str) -> Callable[['Option'], str]:
    return lambda option: text


def _with_range(option: 'Option', what: str) -> str:
    lo, hi = option.low, option.high
    if lo is not None and hi is not None:
        return what + f" in {'(' if option.open_low else '['}{_fmt(lo)}, {_fmt(hi)}{')' if option.open_high else ']'}"
    if lo is not None:
        return what + f" {'>' if option.open_low else '>='} {_fmt(lo)}"
    if hi is not None:
        return what + f" {'<' if option.open_high else '<='} {_fmt(hi)}"
    return what


def _floats_words(option: 'Option') -> str:
    what = f"a list of {' or '.join(map(str, option.lengths))} numbers" if option.lengths else 'a list of numbers'
    return _with_range(option, what)


def _check_number(whole: bool) -> Callable[['Option', Any], Any]:
    def check(option: 'Option', value: Any) -> Any:
        number = _to_number(value, whole=whole)
        if number is None:
            raise option.fail(value)
        number = option._in_range(number, value)
        return int(number) if whole else float(number)
    return check


def _check_floats(option: 'Option', value: Any) -> Any:
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        value = [value]  # `--mean 0.5` for one channel
    if not isinstance(value, (list, tuple)) or not value or (option.lengths and len(value) not in option.lengths):
        raise option.fail(value)
    numbers = [_to_number(v, whole=False) for v in value]
    if any(n is None for n in numbers):
        raise option.fail(value)
    return [float(option._in_range(n, value)) for n in numbers]


def _check_bool(option: 'Option', value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ('true', 'false', 'yes', 'no', 'on', 'off'):
        return value.lower() in ('true', 'yes', 'on')
    raise option.fail(value)


def _check_choice(option: 'Option', value: Any) -> Any:
    if isinstance(value, bool) and 'on' in option.choices:  # YAML 1.1 reads on/off as booleans
        value = 'on' if value else 'off'
    if not isinstance(value, str) or value not in option.choices:
        raise option.fail(value)
    return value


def _check_ints(option: 'Option', value: Any) -> Any:
    items = value.split(',') if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not [i for i in items if str(i).strip()]:
        raise option.fail(value)
    numbers = [_to_number(str(i).strip(), whole=True) for i in items if str(i).strip()]
    if any(n is None for n in numbers):
        raise option.fail(value)
    return [int(option._in_range(n, value)) for n in numbers]


def _check_names(option: 'Option', value: Any) -> Any:
    if not isinstance(value, str):
        raise option.fail(value)
    if value.strip().lower() == 'none':
        return []
    items = [v.strip() for v in value.split(',') if v.strip()]
    unknown = [v for v in items if option.choices and v not in option.choices]
    if not items or unknown:
        raise option.fail(value, (f"unknown name(s) {', '.join(unknown)}; " if unknown else '')
                          + f'give {option.takes()}')
    return items


def _split_pair(option: 'Option', value: Any, recipe_key: bool) -> Tuple[str, str]:
    """KEY=VALUE split at the first '='; neither side may be empty."""
    key, sep, text = value.partition('=') if isinstance(value, str) else ('', '', '')
    key = key.strip().replace('-', '_') if recipe_key else key.strip()
    if not sep or not key or not text.strip():
        raise option.fail(value)
    return key, text


def _check_setting(option: 'Option', value: Any) -> Any:
    key, text = _split_pair(option, value, recipe_key=True)
    if key not in RECIPE_OPTIONS:
        raise option.fail(value, f"unknown recipe key {key!r}; known keys: {', '.join(RECIPE_OPTIONS)}")
    try:
        return key, RECIPE_OPTIONS[key].parse(text)
    except OptionError as e:
        raise option.fail(value, str(e)) from None


def _check_named_file(option: 'Option', value: Any) -> Any:
    key, text = _split_pair(option, value, recipe_key=False)
    why = not_regular_file(text)
    if why:
        raise option.fail(value, f'{text} {why}; give NAME=FILE with an existing file')
    return key, text


def _check_mapping(option: 'Option', value: Any) -> Any:
    if isinstance(value, str):
        value = parse_yaml(value)
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise option.fail(value)
    return value


def _check_text(option: 'Option', value: Any) -> Any:
    if not isinstance(value, str) or not value.strip() or '\0' in value:
        raise option.fail(value)
    return value


def _check_file(option: 'Option', value: Any) -> Any:
    why = not_regular_file(_check_text(option, value))
    if why:
        raise OptionError(f'{option._prefix()}{value} {why}; give an existing file')
    return value


def _check_dir(option: 'Option', value: Any) -> Any:
    if not os.path.isdir(_check_text(option, value)):
        raise OptionError(f'{option._prefix()}{value} is not an existing folder; give one')
    return value


_KINDS: Dict[str, Kind] = {
    'int': Kind(_check_number(whole=True), lambda o: _with_range(o, 'a whole number'), _fixed('N'), typed=True,
                takes_in_help=True),
    'float': Kind(_check_number(whole=False), lambda o: _with_range(o, 'a number'), _fixed('X'), typed=True,
                  takes_in_help=True),
    'bool': Kind(_check_bool, _fixed('true or false'), _fixed('BOOL'), typed=True, takes_in_help=True),
    'str': Kind(_check_text, _fixed('a non-empty text')),
    'choice': Kind(_check_choice, lambda o: 'one of ' + ', '.join(o.choices),
                   lambda o: '{' + ','.join(o.choices) + '}'),
    'floats': Kind(_check_floats, _floats_words, _fixed('LIST'), typed=True, takes_in_help=True),
    'ints': Kind(_check_ints, lambda o: 'comma-separated whole numbers' + (
        f' >= {_fmt(o.low)}' if o.low is not None else ''), takes_in_help=True),
    'names': Kind(_check_names, lambda o: 'comma-separated names' + (
        f" from {', '.join(o.choices)}" if o.choices else '')),
    'mapping': Kind(_check_mapping, _fixed('a YAML mapping such as "{depth: 2}"'), _fixed('YAML'), typed=True,
                    always_yaml=True, takes_in_help=True),
    'file': Kind(_check_file, _fixed('an existing file'), _fixed('FILE')),
    'dir': Kind(_check_dir, _fixed('an existing folder'), _fixed('DIR')),
    'path': Kind(_check_text, _fixed('a path'), _fixed('PATH')),
    'flag': Kind(_check_bool, _fixed('no value'), has_value=False),
    'setting': Kind(_check_setting, _fixed('KEY=VALUE with a recipe key (t2tvit train --help lists them)'),
                    repeatable=True),
    'named_file': Kind(_check_named_file, _fixed('NAME=FILE with an existing file'), repeatable=True),
}
# What each kind accepts; `Option.takes` words the whole requirement.
KINDS = tuple(_KINDS)


@dataclass(frozen=True)
class Option:
    """One option: `name` is the recipe key and the flag's dest (`img_size` -> `--img-size`).

    kind: int | float | bool | str | choice | floats (a list of numbers) | ints (comma-separated whole numbers) |
        names (comma-separated names, each one of `choices` when given; 'none': no names) | mapping | file (an
        existing regular file) | dir (an existing folder) | path (any path: an output) | flag (present or not) |
        setting (KEY=VALUE of a recipe key, repeatable) | named_file (NAME=FILE, repeatable); `_KINDS` holds how
        each checks, words and shows a value.
    low/high: the range of an int, a float or each number of floats; `open_low`/`open_high` exclude the bound.
    null: what null (`--x null`) means; None: null is not allowed.
    yaml: the value is written as YAML (recipe keys); else as plain text.
    """
    name: str
    kind: str = 'str'
    default: Any = None
    help: str = ''
    low: Optional[float] = None
    high: Optional[float] = None
    open_low: bool = False
    open_high: bool = False
    choices: Tuple[str, ...] = ()
    null: Optional[str] = None
    lengths: Tuple[int, ...] = ()  # floats: the list lengths allowed (empty: any but zero)
    yaml: bool = False
    flags: Tuple[str, ...] = ()  # short aliases, e.g. ('-o',)
    required: bool = False
    metavar: Optional[str] = None
    positional: Optional[str] = None  # nargs of a positional argument ('+', '*'); the name is the metavar

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f'option {self.name}: kind {self.kind!r} is not one of {KINDS}')

    @property
    def flag(self) -> str:
        return self.name if self.positional else '--' + self.name.replace('_', '-')

    @property
    def _kind(self) -> Kind:
        return _KINDS[self.kind]

    def _prefix(self) -> str:
        return '' if self.positional else self.flag + ' '

    def takes(self) -> str:
        """What the option takes, in words: 'a whole number >= 1', 'a number in (0, 1]', 'one of a, b'."""
        what = self._kind.takes(self)
        if self.null is not None:
            what += f', or null ({self.null})'
        return what

    def fail(self, value: Any, why: str = '') -> OptionError:
        plain = not isinstance(value, str) or (value.strip() and ' ' not in value and value.isprintable())
        shown = str(value) if plain else repr(value)
        if self.positional:
            return OptionError(f'{shown} {why or ": give " + self.takes()}')
        return OptionError(f'{self.flag} {shown}: {why or "give " + self.takes()}')

    def parse(self, text: str) -> Any:
        """A command-line value: read (as YAML for recipe keys), then checked.

        A recipe key of a text kind (str, choice, path, file) takes YAML's string (`"fake"` is fake), YAML's null
        where null is allowed, and otherwise the text as written (`--run-name 2024` is the name 2024).
        """
        value: Any = text
        typed = self._kind.typed
        if self.yaml or self._kind.always_yaml:
            try:
                parsed = parse_yaml(text)
            except OptionError as e:
                if typed:
                    raise OptionError(f'{self.flag} {e}') from None
                parsed = text
            if typed or isinstance(parsed, str) or (parsed is None and text.strip()):
                value = parsed
        elif self.null is not None and text.strip() in ('null', '~', 'none', 'None'):
            value = None
        return self.check(value)

    def check(self, value: Any) -> Any:
        """The value if this option takes it (numbers from text converted), else an OptionError saying why."""
        if value is None:
            if self.null is None:
                raise self.fail('null')
            return None
        return self._kind.check(self, value)

    def _in_range(self, number: float, value: Any) -> float:
        lo, hi = self.low, self.high
        if not math.isfinite(number) or (lo is not None and (number < lo or (self.open_low and number == lo))) or \
                (hi is not None and (number > hi or (self.open_high and number == hi))):
            raise self.fail(value)
        return number

    def help_text(self) -> str:
        text = self.help
        if self._kind.takes_in_help and not self.positional:
            text += f' [{self.takes()}]'
        elif self.null is not None:
            text += f' [null: {self.null}]'
        if self.default is not None and self._kind.has_value:
            shown = ','.join(self.default) if self.kind == 'names' else _show(self.default)
            text += f' (default: {shown})'
        return text.replace('%', '%%')

    def argparse_type(self) -> Any:
        """`parse` for argparse: its refusal becomes the ArgumentTypeError argparse reports word for word."""
        import argparse

        def convert(text: str) -> Any:
            try:
                return self.parse(text)
            except OptionError as e:
                raise argparse.ArgumentTypeError(MESSAGE_MARK + str(e)) from None
        convert.__name__ = self.name
        return convert

    def add_to(self, parser: Any, default: Any = None) -> None:
        """Add this option to an argparse parser or group; `default` replaces the entry's own (e.g. SUPPRESS)."""
        if self.positional:
            parser.add_argument(self.name, nargs=self.positional, metavar=self.metavar or self.name.upper(),
                                type=self.argparse_type(), help=self.help_text())
            return
        if not self._kind.has_value:
            parser.add_argument(self.flag, *self.flags, dest=self.name, action='store_true', help=self.help_text())
            return
        parser.add_argument(self.flag, *self.flags, dest=self.name, type=self.argparse_type(), required=self.required,
                            default=self.default if default is None else default, help=self.help_text(),
                            metavar=self.metavar or self._kind.metavar(self),
                            action='append' if self._kind.repeatable else 'store')


def _to_number(value: Any, whole: bool) -> Optional[float]:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = int(value) if whole else float(value)
        except ValueError:
            try:
                value = float(value)
            except ValueError:
                return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if whole and not (math.isfinite(value) and value.is_integer()):
            return None
        return int(value) if whole else value
    return None


def _fmt(number: float) -> str:
    return str(int(number)) if float(number).is_integer() and abs(number) < 1e15 else f'{number:g}'


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return '[' + ', '.join(_show(v) for v in value) + ']'
    if isinstance(value, dict):
        return '{' + ', '.join(f'{k}: {_show(v)}' for k, v in value.items()) + '}'
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def table(*options: Option) -> Dict[str, Option]:
    """Options by name, refusing a name given twice."""
    out: Dict[str, Option] = {}
    for option in options:
        if option.name in out:
            raise ValueError(f'option {option.name} is given twice')
        out[option.name] = option
    return out


# --- rules several commands (and the library behind them) share ------------------------------------------------

def check_pretrained_flags(checkpoint: Optional[str], pretrained: bool, model: Optional[str]) -> None:
    """`--pretrained` takes the released weights of `--model TAG`: never beside `--checkpoint FILE`, never without a
    model."""
    if pretrained and checkpoint is not None:
        raise OptionError('give either --checkpoint FILE or --pretrained (the released weights of --model), not both')
    if pretrained and not model:
        raise OptionError("--pretrained needs --model TAG, e.g. t2t_vit_14.in1k (timm.list_pretrained('t2t*'))")


def check_weights_source(checkpoint: Optional[str], pretrained: bool, model: Optional[str], random_use: str = '',
                         purpose: str = '') -> None:
    """Where a command's weights come from: `--checkpoint FILE`, or `--model TAG --pretrained`, or, where
    `random_use` says what a randomly initialised model is good for (export, look at), `--model NAME` alone.

    `purpose` words what the checkpoint is for in the message ('to start from').
    """
    check_pretrained_flags(checkpoint, pretrained, model)
    if checkpoint is not None or pretrained or (random_use and model):
        return
    if random_use:
        raise OptionError(f'give --checkpoint FILE, or --model NAME to {random_use} a randomly initialised model '
                          '(--model TAG --pretrained: its released weights)')
    raise OptionError(f"give --checkpoint FILE{' ' + purpose if purpose else ''}, or --model TAG --pretrained"
                      + ('' if purpose else ' for released weights'))


def check_agreement(agreement: bool, amp: str) -> None:
    """The top-1 agreement compares a reduced precision with fp32, so it needs one."""
    if agreement and amp == 'none':
        raise OptionError('--agreement compares a reduced precision with fp32: give --amp bf16 or fp16 as well')


# --- recipe keys: `t2tvit train` / `finetune` flags and the keys of a YAML recipe ----------------------------

_INTERPOLATIONS = ('bicubic', 'bilinear', 'nearest', 'box', 'hamming', 'lanczos')


def _key(name: str, kind: str, default: Any, help: str, **limits: Any) -> Option:
    return Option(name, kind, default, help, yaml=True, **limits)


# One entry per recipe key: type, range, default and meaning (the unit after the comma). Each is also a flag.
RECIPE_OPTIONS: Dict[str, Option] = table(
    # model
    _key('model', 'str', 't2t_vit_14', 'registered model name (t2tvit info lists them)'),
    _key('model_kwargs', 'mapping', {}, 'extra keyword arguments for the model builder, as a YAML mapping'),
    _key('img_size', 'int', 224, 'training and evaluation image size, pixels', low=1),
    _key('in_chans', 'int', 3, 'input channels', low=1),
    _key('num_classes', 'int', None, 'classifier outputs', low=1, null="the data set's class count"),
    _key('drop_path', 'float', 0.1, 'stochastic depth rate of the last block', low=0, high=1, open_high=True),
    _key('pretrained', 'str', None, 'checkpoint file to start from (official .pth.tar, t2tvit checkpoint or '
         '.safetensors) or a pretrained tag such as t2t_vit_14.in1k (its released weights)',
         null='random initialisation'),
    _key('freeze_backbone', 'bool', False, 'train only the classifier head'),
    # data
    _key('dataset', 'choice', 'imagefolder', 'data set kind (wds: WebDataset shards; hfds: a Hugging Face dataset '
         'folder or hub name)', choices=DATASET_NAMES),
    _key('data', 'path', None, 'data set folder (hfds: also a hub name)', null='no folder: fake data'),
    _key('val_holdout', 'int', 0, 'validate on this many training images, held out by seed, instead of the data '
         "set's validation split (which then stays untouched for a final test); 0 for the split", low=0),
    _key('on_bad_image', 'choice', 'fail', 'an unreadable image in an ImageFolder: fail (naming it) or skip '
         '(and count it)', choices=('fail', 'skip')),
    _key('fake_num_samples', 'int', 256, 'fake data set: training samples (validation gets a quarter)', low=1),
    _key('mean', 'floats', None, 'normalisation mean per channel', null="the model's pretrained_cfg"),
    _key('std', 'floats', None, 'normalisation std per channel', low=0, open_low=True,
         null="the model's pretrained_cfg"),
    _key('interpolation', 'choice', 'bicubic', 'resize interpolation', choices=_INTERPOLATIONS),
    _key('crop_pct', 'float', 0.9, 'evaluation centre crop: resize to img_size / crop_pct, then crop img_size',
         low=0, high=1, open_low=True),
    _key('scale', 'floats', [0.08, 1.0], 'random-resized-crop area range', low=0, high=1, open_low=True,
         lengths=(2,)),
    _key('ratio', 'floats', [0.75, 1.3333333], 'random-resized-crop aspect range', low=0, open_low=True,
         lengths=(2,)),
    _key('hflip', 'float', 0.5, 'horizontal flip probability', low=0, high=1),
    _key('color_jitter', 'float', 0.4, 'colour jitter strength', low=0, null='none'),
    _key('aa', 'str', None, 'timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1', null='none'),
    _key('reprob', 'float', 0.0, 'random erasing probability', low=0, high=1),
    _key('remode', 'choice', 'pixel', 'random erasing mode', choices=('pixel', 'rand', 'const')),
    _key('recount', 'int', 1, 'random erasing count', low=1),
    _key('mixup', 'float', 0.0, 'Mixup alpha; 0 disables', low=0),
    _key('cutmix', 'float', 0.0, 'CutMix alpha; 0 disables', low=0),
    _key('mixup_prob', 'float', 1.0, 'probability of applying Mixup or CutMix to a batch', low=0, high=1),
    _key('mixup_switch_prob', 'float', 0.5, 'probability of CutMix instead of Mixup when both are on', low=0,
         high=1),
    _key('mixup_mode', 'choice', 'batch', 'how Mixup/CutMix pairs images', choices=('batch', 'pair', 'elem')),
    _key('smoothing', 'float', 0.1, 'label smoothing', low=0, high=1, open_high=True),
    _key('workers', 'int', 4, 'data loading processes per training process', low=0, high=256),
    # optimisation
    _key('epochs', 'int', 310, 'training epochs', low=1),
    _key('batch_size', 'int', 512, 'global batch size: all processes and accumulation steps together', low=1),
    _key('accum_steps', 'int', 1, 'gradient accumulation steps per optimizer step', low=1),
    _key('opt', 'str', 'adamw', "timm optimizer name (checked against timm's registry when the run starts)"),
    _key('momentum', 'float', 0.9, 'SGD momentum', low=0, high=1, open_high=True),
    _key('lr', 'float', 5e-4, 'learning rate for lr_base_size images, scaled linearly with batch_size', low=0,
         open_low=True),
    _key('lr_base_size', 'int', 512, 'batch size that lr is given for', low=1),
    _key('weight_decay', 'float', 0.05, 'decoupled weight decay (not on norms, biases, cls_token, pos_embed)',
         low=0),
    _key('layer_decay', 'float', None, 'layer-wise LR decay factor for fine-tuning, e.g. 0.75', low=0, high=1,
         open_low=True, null='none'),
    _key('clip_grad', 'float', None, 'clip the gradient norm to this', low=0, open_low=True, null='no clipping'),
    _key('sched', 'choice', 'cosine', 'timm scheduler name', choices=SCHEDULERS),
    _key('sched_steps', 'int', None, 'length of the learning-rate schedule in optimizer steps, e.g. max_steps so '
         'that a step budget anneals to min_lr', low=1, null='epochs x steps per epoch'),
    _key('warmup_epochs', 'float', 5, 'linear warm-up epochs', low=0),
    _key('warmup_lr', 'float', 1e-6, 'learning rate at the start of the warm-up', low=0),
    _key('min_lr', 'float', 1e-5, 'learning rate at the end of the schedule', low=0),
    _key('model_ema', 'bool', False, 'keep an exponential moving average of the weights'),
    _key('model_ema_decay', 'float', 0.99996, 'EMA decay per optimizer step', low=0, high=1, open_high=True),
    # execution
    _key('amp', 'choice', 'none', 'mixed precision (fp16 needs a GPU; it uses a gradient scaler; auto: bf16 on a '
         'CPU with AMX or AVX-512 BF16 or a GPU with bf16, else none)', choices=('none', 'bf16', 'fp16', 'auto')),
    _key('compile', 'bool', False, 'torch.compile the model'),
    _key('device', 'choice', 'auto', 'where to train', choices=('auto', 'cpu', 'cuda')),
    _key('seed', 'int', 0, 'seed of every random choice: data order, augmentation, dropout', low=0,
         high=2 ** 63 - 1),
    _key('max_steps', 'int', None, 'stop after this many optimizer steps in total (a budget)', low=1, null='none'),
    # output
    _key('output', 'path', 'runs', 'folder holding run folders'),
    _key('run_name', 'str', None, 'run folder name', null='RECIPE-MODEL'),
    _key('ckpt_interval', 'int', 200, 'also save last.pth every this many optimizer steps (for resuming '
         'mid-epoch)', low=1),
    _key('log_interval', 'int', 50, 'log training metrics every this many optimizer steps', low=1),
    _key('eval_interval', 'int', 1, 'evaluate every this many epochs (and always after the last)', low=1),
    _key('tensorboard', 'bool', False, 'also write TensorBoard event files'),
    _key('progress', 'choice', 'auto', 'progress bars: auto (when a terminal), on, off',
         choices=('auto', 'on', 'off')),
)
