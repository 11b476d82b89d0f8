"""No command replaces a file it did not write in this run unless --force is given (t2tvit.outputs).

The collisions are generated from the option tables: every command whose table has an output option is listed in
WRITES with the files its output options name; each of those files is created before the command runs, and the
command must stop with exit status 2 and one `error:` line naming the file and --force, leaving the file as it was.
A new command with an output option fails `test_every_writing_command_is_covered` until it is listed here.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import pytest

from t2tvit.cli.main import COMMANDS, main
from t2tvit.engine.preflight import RUN_FILES
from t2tvit.outputs import OutputError, claim, claim_all, command_outputs, free_stem, unique_stems

OUTPUT_OPTIONS = ('output', 'name', 'run_name')  # the options that name what a command writes


def _option_names(command: str) -> List[str]:
    from t2tvit.options import RECIPE_OPTIONS
    spec = COMMANDS[command]
    return [o.name for o in spec.options] + [RECIPE_OPTIONS[k].name for k in spec.recipe_keys]


# command -> cases: (label, extra argv, the file it writes that is created beforehand, the name the error gives)
Case = Tuple[str, List[str], Path, Path]
FAST_EXPORTS = ('safetensors', 'torchscript', 'hf')
SLOW_EXPORTS = ('onnx', 'exported-program', 'onnx-int8')


def _train_cases(ws: Path, command: str) -> List[Case]:
    base = ['--dataset', 'fake', '--output', str(ws / 'runs'), '--run-name', 'r', '--progress', 'off',
            '--img-size', '32', '--model', 't2t_vit_mini', '--epochs', '1']
    if command == 'finetune':
        base = ['--checkpoint', str(ws / 'model.pth')] + base
    run = ws / 'runs' / 'r'
    cases = [(name, base, run / name, run / name) for name in RUN_FILES if name != 'last.pth']
    # a run folder with last.pth is resumed; only --no-resume would replace it
    cases.append(('last.pth --no-resume', base + ['--no-resume'], run / 'last.pth', run))
    return cases


def _export_cases(ws: Path, fmt: str) -> List[Case]:
    base = ['--format', fmt, '--checkpoint', str(ws / 'model.pth')]
    if fmt == 'hf':  # a repository's own README.md, say
        return [(f'hf {name}', base + ['-o', str(ws / 'repo')], ws / 'repo' / name, ws / 'repo' / name)
                for name in ('README.md', 'config.json', 'model.safetensors')]
    suffix = {'safetensors': '.safetensors', 'torchscript': '.pt', 'onnx': '.onnx', 'exported-program': '.pt2',
              'onnx-int8': '.int8.onnx'}[fmt]
    if fmt == 'onnx-int8':  # calibrated on a few training images of the fake data set, scored on a few
        base += ['--dataset', 'fake', '--calibration-images', '8', '--eval-images', '8']
    out = ws / f'model{suffix}'
    sidecar = out.with_name(out.name + '.json')
    return [(f'{fmt} file', base + ['-o', str(out)], out, out),
            (f'{fmt} sidecar', base + ['-o', str(out)], sidecar, sidecar)]


def _visualize_cases(ws: Path) -> List[Case]:
    base = [str(ws / 'image.png'), '--checkpoint', str(ws / 'model.pth'), '-o', str(ws / 'pictures')]
    return [(kind, base, ws / 'pictures' / f'image_{kind}.png', ws / 'pictures' / f'image_{kind}.png')
            for kind in ('feature_maps', 'attention', 'rollout', 't2t_attention')]


def _ablate_cases(ws: Path) -> List[Case]:
    base = ['--dataset', 'fake', '--output', str(ws / 'runs'), '--name', 'n', '--variants', 't2t_vit_14',
            '--max-steps', '1']
    folder = ws / 'runs' / 'ablate-n'
    cases = [(f'results{s}', base, folder / f'results{s}', folder / f'results{s}')
             for s in ('.json', '.md', '.png', '_macs.png')]
    run = folder / 't2t_vit_14' / 'seed0-all'  # the first run of the study: seed 0, every training image
    cases.append(('run config.yaml', base, run / 'config.yaml', run / 'config.yaml'))
    return cases


def _eval_cases(ws: Path) -> List[Case]:
    base = ['--checkpoint', str(ws / 'model.pth'), '--dataset', 'fake', '--output', str(ws / 'eval')]
    return [(name, base, ws / 'eval' / name, ws / 'eval' / name) for name in ('eval.json', 'confusion_matrix.png')]


def _convert_cases(ws: Path) -> List[Case]:
    base = ['--dataset', 'fake', '--to', 'wds', '--output', str(ws / 'shards')]
    return [('folder', base, ws / 'shards' / 'notes.txt', ws / 'shards')]


WRITES: Dict[str, Callable[[Path], List[Case]]] = {
    'train': lambda ws: _train_cases(ws, 'train'),
    'finetune': lambda ws: _train_cases(ws, 'finetune'),
    'eval': _eval_cases,
    **{f'export:{fmt}': (lambda fmt: lambda ws: _export_cases(ws, fmt))(fmt) for fmt in FAST_EXPORTS + SLOW_EXPORTS},
    'visualize': _visualize_cases,
    'ablate': _ablate_cases,
    'convert-data': _convert_cases,
}
PICKS_FREE_NAMES = ('benchmark',)  # writes files of its own naming: never refuses, takes STEM-1, STEM-2, ...
WRITES_NOTHING = ('info', 'predict')


def test_every_writing_command_is_covered():
    covered = {key.split(':')[0] for key in WRITES}
    for command in COMMANDS:
        names = _option_names(command)
        writes = any(n in OUTPUT_OPTIONS for n in names)
        if command in WRITES_NOTHING:
            assert not writes, f'{command} has an output option: list it in WRITES'
            continue
        assert writes, command
        assert command in covered or command in PICKS_FREE_NAMES, f'{command} writes files: list them in WRITES'
        if command not in PICKS_FREE_NAMES:
            assert 'force' in names, f'{command} has no --force to replace what it refuses to'
    formats = next(o for o in COMMANDS['export'].options if o.name == 'format').choices
    assert set(formats) == set(FAST_EXPORTS + SLOW_EXPORTS), 'a new export format: list it in FAST/SLOW_EXPORTS'


def _cases(keys) -> List[Tuple[str, str]]:
    probe = Path('/WS')
    return [(key, label) for key in keys for label, *_ in WRITES[key](probe)]


@pytest.fixture(scope='module')
def ready(tiny_run, tmp_path_factory) -> Path:
    from PIL import Image
    ws = tmp_path_factory.mktemp('collide')
    shutil.copy(tiny_run, ws / 'model.pth')
    Image.new('RGB', (40, 40), (10, 200, 30)).save(ws / 'image.png')
    return ws


def _workspace(ready: Path, tmp_path: Path) -> Path:
    ws = tmp_path / 'ws'
    ws.mkdir()
    for name in ('model.pth', 'image.png'):
        shutil.copy(ready / name, ws / name)
    return ws


def _collide(key: str, label: str, ready: Path, tmp_path: Path, capsys) -> None:
    ws = _workspace(ready, tmp_path)
    case = next(c for c in WRITES[key](ws) if c[0] == label)
    _, extra, existing, named = case
    command = key.split(':')[0]
    existing.parent.mkdir(parents=True, exist_ok=True)
    if existing.name == 'tensorboard':
        existing.mkdir()
        (existing / 'events.out').write_bytes(b'user data')
        keep = existing / 'events.out'
    else:
        existing.write_bytes(b'user data\n')
        keep = existing
    before = (keep.read_bytes(), keep.stat().st_mtime_ns)
    capsys.readouterr()
    code = main([command] + extra)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith('error:')]
    assert code == 2, (command, extra, code, err)
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert str(named) in errors[0] and '--force' in errors[0], errors[0]
    assert (keep.read_bytes(), keep.stat().st_mtime_ns) == before, f'{keep} was changed'
    assert 'Traceback' not in out + err


# every format is refused before any export work starts, so the slow ones are cheap here too
@pytest.mark.parametrize('key, label', _cases(WRITES))
def test_an_existing_output_is_refused_without_force(key, label, ready, tmp_path, capsys):
    _collide(key, label, ready, tmp_path, capsys)


@pytest.mark.slow
@pytest.mark.parametrize('fmt', SLOW_EXPORTS)
def test_force_replaces_the_export_of_a_slow_format(fmt, ready, tmp_path):
    ws = _workspace(ready, tmp_path)
    _, extra, existing, _ = _export_cases(ws, fmt)[0]
    existing.write_bytes(b'old')
    assert main(['export'] + extra + ['--force']) == 0
    assert existing.read_bytes() != b'old' and existing.stat().st_size > 1000


# --- what --force allows, and the names a command picks itself ------------------------------------------------------

def test_force_replaces_an_earlier_export_but_never_the_checkpoint(ready, tmp_path, capsys):
    ws = _workspace(ready, tmp_path)
    out = ws / 'model.safetensors'
    out.write_bytes(b'old')
    assert main(['export', '--format', 'safetensors', '--checkpoint', str(ws / 'model.pth'), '-o', str(out),
                 '--force']) == 0
    assert out.read_bytes()[:3] != b'old'
    before = (ws / 'model.pth').read_bytes()
    assert main(['export', '--format', 'safetensors', '--checkpoint', str(ws / 'model.pth'), '-o',
                 str(ws / 'model.pth'), '--force']) == 2
    assert 'is the input' in capsys.readouterr().err and (ws / 'model.pth').read_bytes() == before


def test_hf_export_with_force_keeps_the_other_files_of_the_folder(ready, tmp_path, capsys):
    ws = _workspace(ready, tmp_path)
    repo = ws / 'repo'
    repo.mkdir()
    (repo / 'README.md').write_text('my repository\n')
    (repo / '.gitattributes').write_text('*.safetensors filter=lfs\n')
    assert main(['export', '--format', 'hf', '--checkpoint', str(ws / 'model.pth'), '-o', str(repo),
                 '--force']) == 0
    assert 'my repository' not in (repo / 'README.md').read_text()
    assert (repo / '.gitattributes').read_text() == '*.safetensors filter=lfs\n'


def test_visualize_gives_two_images_of_one_name_their_own_files(ready, tmp_path, capsys):
    from PIL import Image
    ws = _workspace(ready, tmp_path)
    for sub, colour in (('a', (200, 10, 10)), ('b', (10, 10, 200))):
        (ws / sub).mkdir()
        Image.new('RGB', (40, 40), colour).save(ws / sub / 'x.png')
    assert main(['visualize', str(ws / 'a' / 'x.png'), str(ws / 'b' / 'x.png'), '--checkpoint',
                 str(ws / 'model.pth'), '-o', str(ws / 'pictures'), '--channels', '4']) == 0
    out = capsys.readouterr().out
    written = sorted(p.name for p in (ws / 'pictures').iterdir())
    kinds = ('attention', 'feature_maps', 'rollout', 't2t_attention')
    assert written == sorted([f'x_{k}.png' for k in kinds] + [f'x-1_{k}.png' for k in kinds])
    assert all(f'wrote {ws / "pictures" / name}' in out for name in written)
    assert (ws / 'pictures' / 'x_rollout.png').read_bytes() != (ws / 'pictures' / 'x-1_rollout.png').read_bytes()


def test_a_second_benchmark_on_the_same_day_gets_its_own_file(tmp_path, capsys):
    (tmp_path / 'cpu-day.json').write_text('{"earlier": true}')
    argv = ['benchmark', '--smoke', '--models', 't2t_vit_7', '--peers', 'none', '--runs', 'infer:fp32',
            '--reps', '1', '--iters', '1', '--warmup', '1', '--no-variants-table', '--no-plot', '--agreement-images',
            '0', '--peak-size', '64', '--output', str(tmp_path), '--name', 'cpu-day']
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert (tmp_path / 'cpu-day.json').read_text() == '{"earlier": true}'
    assert (tmp_path / 'cpu-day-1.json').is_file() and f'wrote {tmp_path / "cpu-day-1.json"}' in out
    assert main(argv) == 0
    assert (tmp_path / 'cpu-day-2.json').is_file()


# --- the rule itself ----------------------------------------------------------------------------------------------

def test_claim_refuses_an_existing_file_unless_forced(tmp_path):
    (tmp_path / 'a').write_text('x')
    with pytest.raises(OutputError, match=r'a exists already; pass --force'):
        claim(tmp_path / 'a')
    assert claim(tmp_path / 'a', force=True) == tmp_path / 'a'
    os.symlink(tmp_path / 'nowhere', tmp_path / 'dangling')
    with pytest.raises(OutputError, match='dangling exists already'):
        claim(tmp_path / 'dangling')


def test_a_name_claimed_twice_in_one_command_is_refused_even_with_force(tmp_path):
    with command_outputs():
        claim(tmp_path / 'x.png', what='a/x.png')
        with pytest.raises(OutputError, match=r'x.png would be written twice by this command \(a/x.png and b/x.png'):
            claim(tmp_path / 'sub' / '..' / 'x.png', force=True, what='b/x.png')
    claim(tmp_path / 'x.png')  # outside a command nothing is remembered
    claim(tmp_path / 'x.png')
    with pytest.raises(OutputError, match='written twice'):
        claim_all([tmp_path / 'y', tmp_path / 'y'], force=True)


def test_free_names():
    assert unique_stems(['x', 'x', 'x-1', 'y', 'x']) == ['x', 'x-2', 'x-1', 'y', 'x-3']
    assert unique_stems(['a', 'b']) == ['a', 'b']


def test_free_stem_skips_names_taken_on_disk_or_claimed(tmp_path):
    (tmp_path / 'r.json').write_text('{}')
    (tmp_path / 'r-1.png').write_bytes(b'')
    assert free_stem(tmp_path, 'r', ('.json', '.png')) == 'r-2'
    with command_outputs():
        claim(tmp_path / 'r-2.json')
        assert free_stem(tmp_path, 'r', ('.json', '.png')) == 'r-3'


def test_train_with_force_starts_afresh_in_a_folder_without_last_pth(ready, tmp_path, capsys):
    ws = _workspace(ready, tmp_path)
    _, base, existing, _ = _train_cases(ws, 'train')[0]
    existing.parent.mkdir(parents=True)
    (existing.parent / 'config.yaml').write_text('from a run that stopped before its first checkpoint\n')
    tiny = ['--model-kwargs', '{embed_dim: 32, depth: 1, num_heads: 2, token_dim: 8}', '--fake-num-samples', '16',
            '--batch-size', '8', '--workers', '0', '--val-holdout', '0']
    assert main(['train'] + base + tiny + ['--force']) == 0, capsys.readouterr().err
    assert 'model: t2t_vit_mini' in (existing.parent / 'config.yaml').read_text()
    assert (existing.parent / 'last.pth').is_file()
    capsys.readouterr()
    assert main(['train'] + base + tiny) == 0  # the same command again resumes the run: no --force needed
    assert f'resuming {existing.parent} at epoch 2' in capsys.readouterr().out


def test_a_torchrun_restart_continues_its_own_run_folder(tmp_path, monkeypatch):
    from t2tvit.engine.preflight import check_run_folder
    (tmp_path / 'config.yaml').write_text('written by the first attempt\n')
    with pytest.raises(OutputError, match='config.yaml exists already; pass --force'):
        check_run_folder(tmp_path, None)
    monkeypatch.setenv('TORCHELASTIC_RESTART_COUNT', '1')
    check_run_folder(tmp_path, None)
    check_run_folder(tmp_path, str(tmp_path / 'last.pth'))  # resuming this run's own checkpoint
    monkeypatch.setenv('TORCHELASTIC_RESTART_COUNT', '0')
    with pytest.raises(OutputError):
        check_run_folder(tmp_path, str(tmp_path / 'other' / 'last.pth'))
