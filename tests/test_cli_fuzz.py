"""The command line attacked systematically: for every command and every option of its table, values outside the
option's declared type or range (empty, huge, negative, zero, not a number, not a file, ...).

Each must end with exit status 2 and one `error:` line naming the problem (never the bug path: no "unexpected", no
traceback), within a time limit, and leave every file as it was. The cases are generated from the option tables
themselves, so a new option is attacked as soon as it is declared.
"""
from __future__ import annotations

import math
import os
import shutil
import signal
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from t2tvit.cli.main import COMMANDS, main
from t2tvit.options import RECIPE_OPTIONS, Option

CASE_SECONDS = 60  # a case that takes longer hangs
MEMORY_BOUND = ('img_size',)  # ints whose huge values must be refused for memory, not tried


def _options(command: str) -> List[Option]:
    spec = COMMANDS[command]
    return list(spec.options) + [RECIPE_OPTIONS[k] for k in spec.recipe_keys]


def _below(option: Option) -> List[float]:
    if option.low is None:
        return []
    return [option.low] if option.open_low else [option.low - 1, option.low - 0.5 if option.kind != 'int' else
                                                 option.low - 1]


def _above(option: Option) -> List[float]:
    if option.high is None:
        return []
    return [option.high] if option.open_high else [option.high + 1]


def _number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def bad_values(option: Option, workspace: Path) -> List[str]:
    """Values the option's entry declares out of type or range."""
    empty = [] if option.null is not None else ['']  # '' is YAML's null: valid where null is
    kind = option.kind
    if kind == 'int':
        values = empty + ['abc', '1.5', 'nan', '[1]', 'true']
        values += [_number_text(v) for v in _below(option) + _above(option)]
        if option.name in MEMORY_BOUND:
            values += ['100000', str(10 ** 12)]
        if option.high is not None:
            values.append(str(10 ** 30))
        return values
    if kind == 'float':
        values = empty + ['abc', 'nan', 'inf', '-inf', '[0.5]']
        return values + [_number_text(v) for v in _below(option) + _above(option)]
    if kind == 'floats':
        values = ['[]', 'abc', '[nan]', '[1, x]', '{a: 1}']
        values += [f'[{_number_text(v)}, {_number_text(v)}]' for v in _below(option) + _above(option)]
        if option.lengths:
            values.append('[' + ', '.join(['0.5'] * (max(option.lengths) + 1)) + ']')
        return values
    if kind == 'ints':
        return ['', 'a,b', ',', '1.5'] + [_number_text(v) for v in _below(option)]
    if kind == 'names':
        return [',', ''] + (['nonsense', f'{option.choices[0]},nonsense'] if option.choices else [])
    if kind == 'choice':
        return ['', 'nonsense', option.choices[0].upper() + '_'] + (['null'] if option.null is None else [])
    if kind == 'bool':
        return ['maybe', '2', '[]', '{}'] + empty
    if kind == 'mapping':
        return ['{depth:1}', '[1, 2]', '3', '{a: [1,', 'x', '{nonsense_argument: 1}', '{depth: many}']
    if kind == 'file':
        return ['', 'missing.pth', str(workspace / 'folder'), str(workspace / 'pipe')]
    if kind == 'dir':
        return ['', 'missing-folder', str(workspace / 'image.png')]
    if kind in ('str', 'path'):
        return ['', '   '] if option.name not in ('config', 'recipe') else ['', 'no-such-recipe']
    if kind == 'setting':
        return ['novalue', '=1', 'nokey=1', 'lr=-1', 'epochs=0']
    if kind == 'named_file':
        return ['x', 'a=missing.pth', 'a=']
    if kind == 'flag':
        return ['value']  # a flag given a value: --json=value
    raise AssertionError(f'no bad values for kind {kind}')


def _base_args(command: str, ws: Path) -> List[str]:
    """Valid arguments the attacked option is added to."""
    ckpt, image = str(ws / 'model.pth'), str(ws / 'image.png')
    return {
        'info': [],
        'train': ['--dataset', 'fake', '--output', str(ws / 'runs'), '--progress', 'off'],
        'finetune': ['--checkpoint', ckpt, '--dataset', 'fake', '--output', str(ws / 'runs'), '--progress', 'off'],
        'eval': ['--checkpoint', ckpt, '--dataset', 'fake', '--output', str(ws / 'eval')],
        'predict': [image, '--checkpoint', ckpt],
        'export': ['--format', 'safetensors', '--checkpoint', ckpt, '-o', str(ws / 'exported.safetensors')],
        'visualize': [image, '--checkpoint', ckpt, '-o', str(ws / 'pictures')],
        'ablate': ['--dataset', 'fake', '--output', str(ws / 'runs'), '--max-steps', '1'],
        'benchmark': ['--smoke', '--output', 'none'],
        'convert-data': ['--dataset', 'fake', '--to', 'wds', '--output', str(ws / 'shards')],
    }[command]


def _argv(command: str, option: Option, value: str, ws: Path) -> List[str]:
    base = _base_args(command, ws)
    if option.positional:  # replace the positional argument
        return [command, value] + [a for a in base if a != str(ws / 'image.png')]
    if option.kind == 'flag':
        return [command] + base + [f'{option.flag}={value}']
    flag = option.flag
    if flag in base:  # the attacked option replaces its valid value
        i = base.index(flag)
        base = base[:i] + base[i + 2:]
    return [command] + base + [f'{flag}={value}']  # '=' keeps values such as -1 or '' whole


CASES: List[Tuple[str, str, str]] = []  # (command, option name, value); the workspace path is filled in at run time
_WS_MARK = Path('/WORKSPACE')
for _command in COMMANDS:
    for _option in _options(_command):
        for _value in bad_values(_option, _WS_MARK):
            CASES.append((_command, _option.name, _value))


def _snapshot(folder: Path) -> Dict[str, Tuple[int, int]]:
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            st_ = path.lstat()
            out[str(path.relative_to(folder))] = (st_.st_size, st_.st_mtime_ns)
    return out


@pytest.fixture(scope='module')
def workspace(tiny_run, tmp_path_factory) -> Path:
    from PIL import Image
    ws = tmp_path_factory.mktemp('fuzz')
    shutil.copy(tiny_run, ws / 'model.pth')
    Image.new('RGB', (40, 40), (10, 200, 30)).save(ws / 'image.png')
    (ws / 'folder').mkdir()
    os.mkfifo(ws / 'pipe')
    return ws


def _alarm(signum, frame):
    raise TimeoutError(f'a case ran longer than {CASE_SECONDS} s')


def run_case(command: str, name: str, value: str, ws: Path, capsys) -> None:
    option = next(o for o in _options(command) if o.name == name)
    value = value.replace(str(_WS_MARK), str(ws))
    argv = _argv(command, option, value, ws)
    before = _snapshot(ws)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    try:
        code = main(argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    out, err = capsys.readouterr()
    # a bad value is the user's input: exit 2 and a named error, never the bug path (exit 1, 'unexpected');
    # predict's images may also be named and skipped as unreadable, which exits 1 (its documented status)
    expected = (1, 2) if command == 'predict' and option.positional else (2,)
    assert code in expected, (argv, code, err)
    assert 'unexpected' not in err and 'Traceback' not in out + err, (argv, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith('error: '), (argv, err)
    assert _snapshot(ws) == before, f'{argv} changed files'


def test_the_cases_cover_every_option_of_every_command():
    attacked = {(c, n) for c, n, _ in CASES}
    assert all((c, o.name) in attacked for c in COMMANDS for o in _options(c))
    assert len(CASES) > 700


@pytest.mark.parametrize('command', list(COMMANDS))
def test_bad_values_of_every_option_are_refused(command, workspace, capsys, monkeypatch):
    monkeypatch.chdir(workspace)
    cases = [c for c in CASES if c[0] == command]
    for _, name, value in cases:
        run_case(command, name, value, workspace, capsys)


def _out_of_range(option: Option):
    """Numbers outside an int or float option's range, drawn by hypothesis."""
    parts = []
    if option.low is not None:
        if option.kind == 'int':
            parts.append(st.integers(max_value=int(math.ceil(option.low)) - 1))
        else:
            parts.append(st.floats(max_value=option.low, exclude_max=not option.open_low, allow_nan=False))
    if option.high is not None:
        if option.kind == 'int':
            parts.append(st.integers(min_value=int(option.high) + 1))
        else:
            parts.append(st.floats(min_value=option.high, exclude_min=not option.open_high, allow_nan=False))
    if option.kind == 'float':
        parts.append(st.sampled_from([math.nan, math.inf, -math.inf]))
    else:
        parts.append(st.floats(allow_nan=False, allow_infinity=False).filter(lambda v: not float(v).is_integer()))
    return st.one_of(parts).map(lambda v: repr(v) if isinstance(v, float) else str(v))


_NUMERIC = [(c, o) for c in COMMANDS for o in _options(c) if o.kind in ('int', 'float') and
            (o.low is not None or o.high is not None)]
_CHOICES = [(c, o) for c in COMMANDS for o in _options(c) if o.kind == 'choice']


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_numbers_outside_the_declared_range_are_refused(data, workspace, capsys, monkeypatch):
    monkeypatch.chdir(workspace)
    command, option = data.draw(st.sampled_from(_NUMERIC))
    value = data.draw(_out_of_range(option))
    run_case(command, option.name, value, workspace, capsys)


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_words_outside_a_choice_are_refused(data, workspace, capsys, monkeypatch):
    monkeypatch.chdir(workspace)
    command, option = data.draw(st.sampled_from(_CHOICES))
    value = data.draw(st.text(min_size=1, max_size=12).filter(
        lambda t: t not in option.choices and '\0' not in t and not t.startswith('-') and t.strip() not in (
            'null', '~', 'none', 'None', '') and not (option.null is not None and t.strip() in ('NULL', 'Null'))))
    run_case(command, option.name, value, workspace, capsys)
