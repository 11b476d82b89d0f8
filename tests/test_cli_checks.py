"""The command line checks every option and input at the door: one test per kind of failure the checks prevent."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from t2tvit.cli.main import COMMANDS, main
from t2tvit.errors import InputError, TrainingDiverged
from t2tvit.options import DATASET_NAMES, RECIPE_OPTIONS, SCHEDULERS, Option, OptionError

REPO = Path(__file__).resolve().parents[1]
SRC = str(REPO / 'src')


def _env():
    return dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get('PYTHONPATH', ''))


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _one_error_line(err: str, bug: bool = False) -> str:
    """The one `error:` line; it is the bug path's ('error: unexpected ...') only where `bug` says so."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: ') and 'Traceback' not in err, err
    assert lines[0].startswith('error: unexpected ') == bug, err
    return lines[0]


@pytest.fixture
def photo(tmp_path) -> Path:
    from PIL import Image
    Image.new('RGB', (40, 30), (90, 20, 200)).save(tmp_path / 'photo.png')
    return tmp_path / 'photo.png'


# --- the option table ---------------------------------------------------------------------------------------------

def test_every_recipe_default_and_shipped_recipe_passes_its_own_checks():
    from t2tvit.engine.config import DEFAULTS, RECIPES, resolve_config
    for key, option in RECIPE_OPTIONS.items():
        default = DEFAULTS[key]
        expected = pytest.approx(default, rel=1e-12) if option.kind in ('float', 'floats') and default else default
        assert option.check(default) == expected, key
    for name in RECIPES:
        resolve_config(name)


def test_static_name_lists_match_the_library():
    from t2tvit.data import DATASETS
    from t2tvit.models.t2t_vit import SMALL_IMAGE_SOFT_SPLITS
    from t2tvit.tools.ablate_variants import SMALL_IMAGE_SOFT_SPLITS as listed
    assert tuple(DATASET_NAMES) == tuple(DATASETS)
    assert listed == SMALL_IMAGE_SOFT_SPLITS


def test_each_scheduler_gives_its_formulas_learning_rate_per_update():
    """Built as the training loop builds it (stepped per update, no warm-up), each scheduler sets the learning rate
    its formula gives at every update of the run; step and multistep first decay after timm's 90 epochs."""
    import math
    import timm.scheduler
    lr, lr_min, epochs, per_epoch = 0.1, 1e-5, 4, 3
    total = epochs * per_epoch

    def expected(name: str, t: int) -> float:
        if name == 'cosine':
            return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * t / total))
        if name == 'tanh':  # timm's bounds: tanh from -7 to 3
            return lr_min + 0.5 * (lr - lr_min) * (1 - math.tanh(-7 * (1 - t / total) + 3 * t / total))
        if name == 'poly':  # timm passes decay_rate 0.1 as the power
            return lr_min + (lr - lr_min) * (1 - t / total) ** 0.1
        return lr if t < 90 * per_epoch else lr * 0.1  # step, multistep: x0.1 at epoch 90; constant: never

    for name in SCHEDULERS:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        scheduler, _ = timm.scheduler.create_scheduler_v2(
            optimizer, sched=name, num_epochs=epochs, warmup_epochs=0, warmup_lr=1e-6, min_lr=lr_min,
            step_on_epochs=False, updates_per_epoch=per_epoch)
        updates = list(range(total)) + ([90 * per_epoch] if name in ('step', 'multistep') else [])
        seen = []
        for t in updates:
            scheduler.step_update(num_updates=t)
            seen.append(optimizer.param_groups[0]['lr'])
            assert seen[-1] == pytest.approx(expected(name, t), rel=1e-9), (name, t)
        assert seen[0] == pytest.approx(lr, rel=1e-6)  # every schedule starts at the base rate (no warm-up)
        if name in ('cosine', 'tanh', 'poly'):  # these fall at every update
            assert all(a > b for a, b in zip(seen, seen[1:])), (name, seen)


def test_help_shows_each_option_with_its_range_and_default(capsys):
    with pytest.raises(SystemExit):
        main(['train', '--help'])
    text = ' '.join(capsys.readouterr().out.split())
    for key in RECIPE_OPTIONS:
        assert '--' + key.replace('_', '-') in text
    assert '--clip-grad X clip the gradient norm to this [a number > 0, or null (no clipping)]' in text
    assert 'EMA decay per optimizer step [a number in [0, 1)] (default: 0.99996)' in text


def test_an_option_refuses_values_outside_its_type_and_range():
    decay = RECIPE_OPTIONS['model_ema_decay']
    assert decay.parse('0.5') == 0.5 and decay.parse('0') == 0.0
    for text in ('1', '2', '-0.1', 'nan', 'abc', '[0.5]', ''):
        with pytest.raises(OptionError, match='--model-ema-decay'):
            decay.parse(text)
    size = Option('img_size', 'int', None, 'size', low=1)
    assert size.parse('32') == 32 and size.parse('3.2e1') == 32
    for text in ('0', '-3', '1.5', 'x', 'inf'):
        with pytest.raises(OptionError, match='give a whole number >= 1'):
            size.parse(text)


# --- zero is an error where it means nothing ----------------------------------------------------------------------

@pytest.mark.parametrize('argv', [
    ['eval', '--checkpoint', '{ckpt}', '--img-size', '0'], ['eval', '--checkpoint', '{ckpt}', '--in-chans', '0'],
    ['eval', '--checkpoint', '{ckpt}', '--crop-pct', '0'], ['train', '--num-classes', '0'],
    ['train', '--ckpt-interval', '0'], ['train', '--clip-grad', '-1'], ['train', '--model-ema-decay', '2'],
    ['predict', '{photo}', '--checkpoint', '{ckpt}', '--img-size', '0'],
])
def test_zero_and_out_of_range_values_are_errors_not_defaults(argv, tiny_run, photo, capsys):
    argv = [a.format(ckpt=tiny_run, photo=photo) for a in argv]
    assert main(argv) == 2
    flag = next(a for a in argv if a.startswith('--') and a != '--checkpoint')
    assert f'error: {flag} ' in _one_error_line(capsys.readouterr().err)


def test_library_calls_refuse_zero_sizes_too(tiny_run):
    from t2tvit.engine.config import ConfigError
    from t2tvit.engine.restore import restore_model
    with pytest.raises(ConfigError, match='img_size 0'):
        restore_model(tiny_run, img_size=0)
    with pytest.raises(ConfigError, match='crop_pct 0'):
        restore_model(tiny_run, crop_pct=0.0)


# --- YAML on the command line -------------------------------------------------------------------------------------

def test_yaml_is_read_strictly(tiny_run, photo, capsys):
    base = ['predict', str(photo), '--checkpoint', str(tiny_run)]
    assert main(base + ['--model-kwargs', '{depth:1}']) == 2
    assert 'write "{depth: 1}" with a space after the colon' in _one_error_line(capsys.readouterr().err)
    assert main(base + ['--model-kwargs', '{depht: 1}']) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "'depht' is not an argument of t2t_vit_mini" in line and 'embed_dim' in line and 'depth' in line
    assert main(base + ['--model-kwargs', '{depth: two}']) == 2
    assert "depth='two' is not of type Optional[int]" in _one_error_line(capsys.readouterr().err)
    assert main(['train', '--mean', '[0.5']) == 2
    assert '--mean' in _one_error_line(capsys.readouterr().err)


def test_a_recipe_file_is_checked_like_the_command_line(tmp_path, capsys):
    recipe = tmp_path / 'mine.yaml'
    recipe.write_text('dataset: fake\nclip_grad: -1\n')
    assert main(['train', '--config', str(recipe)]) == 2
    assert 'mine.yaml: clip_grad -1: give a number > 0' in _one_error_line(capsys.readouterr().err)


def test_model_kwargs_in_a_recipe_are_checked_before_the_run_folder(tmp_path, capsys):
    assert main(['train', '--dataset', 'fake', '--model', 't2t_vit_mini', '--model-kwargs', '{depht: 1}',
                 '--output', str(tmp_path / 'runs')]) == 2
    assert "'depht' is not an argument" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / 'runs').exists()


# --- registries and memory: checked when the command starts, before any folder -----------------------------------

def test_unknown_optimizer_is_named_before_any_folder(tmp_path, capsys):
    assert main(['train', '--dataset', 'fake', '--opt', 'nonsense', '--output', str(tmp_path / 'runs')]) == 2
    assert "opt 'nonsense' is not an optimizer in timm's registry" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / 'runs').exists()
    assert main(['train', '--sched', 'nonsense']) == 2
    assert '--sched nonsense: give one of cosine' in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize('command', ['train', 'eval', 'predict', 'export'])
def test_sizes_beyond_memory_are_refused(command, tiny_run, photo, tmp_path, capsys):
    argv = {'train': ['train', '--dataset', 'fake', '--output', str(tmp_path / 'runs')],
            'eval': ['eval', '--checkpoint', str(tiny_run), '--dataset', 'fake', '--output', str(tmp_path / 'e')],
            'predict': ['predict', str(photo), '--checkpoint', str(tiny_run)],
            'export': ['export', '--format', 'safetensors', '--checkpoint', str(tiny_run), '-o',
                       str(tmp_path / 'm.safetensors')]}[command]
    start = time.time()
    assert main(argv + ['--img-size', '100000']) == 2
    assert 'GiB' in _one_error_line(capsys.readouterr().err) and time.time() - start < 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ['photo.png']


# --- nothing overwrites an input or an earlier result -------------------------------------------------------------

def test_export_never_overwrites_its_checkpoint(tiny_run, tmp_path, capsys):
    ckpt = tmp_path / 'v.pth'
    ckpt.write_bytes(tiny_run.read_bytes())
    (tmp_path / 'link.safetensors').symlink_to(ckpt)
    os.link(ckpt, tmp_path / 'hard.safetensors')
    digest = _md5(ckpt)
    for output in ('v.pth', 'link.safetensors', 'hard.safetensors'):
        assert main(['export', '--format', 'safetensors', '--checkpoint', str(ckpt), '-o', str(tmp_path / output),
                     '--force']) == 2
        assert 'would destroy the input' in _one_error_line(capsys.readouterr().err)
    assert _md5(ckpt) == digest


def test_an_existing_output_is_kept_unless_force(tiny_run, tmp_path, capsys):
    out = tmp_path / 'm.safetensors'
    argv = ['export', '--format', 'safetensors', '--checkpoint', str(tiny_run), '-o', str(out)]
    assert main(argv) == 0
    first = _md5(out)
    capsys.readouterr()
    assert main(argv) == 2
    assert 'exists already; pass --force' in _one_error_line(capsys.readouterr().err)
    assert _md5(out) == first
    assert main(argv + ['--force']) == 0


def test_eval_checks_its_output_before_evaluating(tiny_run, tmp_path, capsys, monkeypatch):
    import t2tvit.engine.evaluate as evaluate
    monkeypatch.setattr(evaluate, 'evaluate', lambda *a, **k: pytest.fail('evaluated before checking the output'))
    (tmp_path / 'blocked').write_text('a file where the output folder should go')
    assert main(['eval', '--checkpoint', str(tiny_run), '--dataset', 'fake',
                 '--output', str(tmp_path / 'blocked' / 'sub')]) == 2
    assert 'is a file, not a folder' in _one_error_line(capsys.readouterr().err)
    (tmp_path / 'done').mkdir()
    (tmp_path / 'done' / 'eval.json').write_text('{"top1": 90}')
    assert main(['eval', '--checkpoint', str(tiny_run), '--dataset', 'fake', '--output', str(tmp_path / 'done')]) == 2
    assert 'eval.json exists already; pass --force' in _one_error_line(capsys.readouterr().err)
    assert json.loads((tmp_path / 'done' / 'eval.json').read_text()) == {'top1': 90}


def test_export_to_an_unwritable_output_is_refused_first(tiny_run, tmp_path, capsys, monkeypatch):
    """Unwritable in ways root cannot bypass: a path under a file, and a folder the permission check refuses."""
    (tmp_path / 'blocked').write_text('a file where a folder should be')
    assert main(['export', '--format', 'safetensors', '--checkpoint', str(tiny_run), '-o',
                 str(tmp_path / 'blocked' / 'm.safetensors')]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{tmp_path / 'blocked'} " in line and '--output' in line
    folder = tmp_path / 'ro'
    folder.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, 'access', lambda path, mode, **kw: False if Path(path) == folder and mode & os.W_OK
                        else real_access(path, mode, **kw))
    assert main(['export', '--format', 'safetensors', '--checkpoint', str(tiny_run), '-o', str(folder)]) == 2
    assert f'folder {folder} is not writable' in _one_error_line(capsys.readouterr().err)
    assert list(folder.iterdir()) == []


def test_a_full_disk_while_writing_keeps_the_earlier_output(tiny_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / 'm.safetensors'
    argv = ['export', '--format', 'safetensors', '--checkpoint', str(tiny_run), '-o', str(out), '--force']
    assert main(argv) == 0
    first = _md5(out)
    capsys.readouterr()

    def full(fd):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(os, 'fsync', full)
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f'could not write safetensors export {out}: No space left on device' in line and 'Free disk space' in line
    assert _md5(out) == first and sorted(p.name for p in tmp_path.iterdir()) == ['m.safetensors',
                                                                                 'm.safetensors.json']


# --- inputs that are not regular files ----------------------------------------------------------------------------

def test_a_fifo_is_skipped_and_named_never_opened(tiny_run, photo, tmp_path, capsys):
    fifo = tmp_path / 'f.png'
    os.mkfifo(fifo)
    done = []
    worker = threading.Thread(target=lambda: done.append(main(['predict', str(fifo), str(photo),
                                                                '--checkpoint', str(tiny_run)])), daemon=True)
    worker.start()
    worker.join(120)
    assert done == [1], 'predict hung on a FIFO'
    out, err = capsys.readouterr()
    assert 'photo.png' in out and 'f.png (is a FIFO (named pipe), not a regular file; not opened)' in err
    assert main(['predict', str(tmp_path), '--checkpoint', str(tiny_run), '--json']) == 1  # inside a folder too
    out, err = capsys.readouterr()
    assert json.loads(out)['failed'][0]['image'] == str(fifo) and 'FIFO' in err
    assert main(['predict', str(photo), '--checkpoint', str(fifo)]) == 2
    assert 'is a FIFO (named pipe), not a regular file' in _one_error_line(capsys.readouterr().err)


def test_a_fifo_in_an_image_folder_fails_naming_it_or_is_skipped(tmp_path):
    from PIL import Image
    from t2tvit.data import ImageFolderDataset
    folder = tmp_path / 'train' / 'cat'
    folder.mkdir(parents=True)
    Image.new('RGB', (8, 8)).save(folder / 'a.png')
    os.mkfifo(folder / 'b.png')
    with pytest.raises(ValueError, match='b.png is a FIFO'):  # DataError, naming the file
        ImageFolderDataset(tmp_path / 'train')[1]
    skipping = ImageFolderDataset(tmp_path / 'train', on_bad_image='skip')
    assert skipping[1][0].size == (8, 8) and skipping.bad_files == [str(folder / 'b.png')]


# --- outputs are checked ------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def broken_checkpoint(tiny_run, tmp_path_factory) -> Path:
    state = torch.load(tiny_run, weights_only=True)
    state['state_dict']['head.weight'][0, 0] = float('nan')
    path = tmp_path_factory.mktemp('broken') / 'nan.pth'
    torch.save(state, path)
    return path


@pytest.mark.parametrize('command', ['predict', 'eval', 'export'])
def test_non_finite_logits_fail_the_command(command, broken_checkpoint, photo, tmp_path, capsys):
    argv = {'predict': ['predict', str(photo)],
            'eval': ['eval', '--dataset', 'fake', '--output', str(tmp_path / 'eval')],
            'export': ['export', '--format', 'safetensors', '-o', str(tmp_path / 'm.safetensors')]}[command]
    assert main(argv + ['--checkpoint', str(broken_checkpoint)]) == 2
    out, err = capsys.readouterr()
    assert 'NaN or infinite logits' in _one_error_line(err) and 'nan%' not in out
    assert not (tmp_path / 'm.safetensors').exists() and not (tmp_path / 'eval' / 'eval.json').exists()


def test_a_checkpoint_of_another_model_family_is_named(tmp_path, photo, capsys):
    import timm
    torch.save(timm.create_model('resnet10t', num_classes=4).state_dict(), tmp_path / 'resnet.pth')
    assert main(['predict', str(photo), '--checkpoint', str(tmp_path / 'resnet.pth'), '--model', 'resnet10t']) == 2
    assert 'resnet10t is a ResNet, not a T2T-ViT model' in _one_error_line(capsys.readouterr().err)


# --- one error boundary -------------------------------------------------------------------------------------------

def test_an_unexpected_error_is_one_line_and_a_traceback_file(monkeypatch, capsys):
    def boom(args):
        raise RuntimeError('something nobody expected')
    from t2tvit.cli import main as cli_module
    monkeypatch.setitem(COMMANDS, 'info', cli_module.Command('info', 'x', 'x', cli_module.INFO, boom))
    assert main(['info']) == 1
    line = _one_error_line(capsys.readouterr().err, bug=True)
    assert 'unexpected RuntimeError: something nobody expected' in line
    path = Path(line.split('the full traceback is in ')[1].split(')')[0])
    assert 'Traceback' in path.read_text() and 'boom' in path.read_text()
    path.unlink()
    assert main(['--debug', 'info']) == 1
    err = capsys.readouterr().err
    assert 'Traceback' in err and 'something nobody expected' in err


def _raising(error):
    def run(args):
        raise error
    return run


@pytest.mark.parametrize('error, code, line', [
    (OptionError('--x 3: give 1'), 2, 'error: --x 3: give 1'),
    (InputError('a named input error'), 2, 'error: a named input error'),
    (TrainingDiverged('loss is nan at step 3'), 3, 'error: loss is nan at step 3'),
    (MemoryError(), 2, 'error: out of memory (MemoryError: MemoryError()); lower --batch-size or --img-size'),
    (torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2 GiB'), 2,
     'error: out of memory (CUDA out of memory. Tried to allocate 2 GiB); lower --batch-size or --img-size'),
    (ValueError('a builtin error is a bug'), 1, 'error: unexpected ValueError: a builtin error is a bug'),
    (OSError(5, 'Input/output error'), 1, 'error: unexpected OSError: [Errno 5] Input/output error'),
    (FileNotFoundError(2, 'No such file or directory'), 1, 'error: unexpected FileNotFoundError: '),
])
def test_the_boundary_decides_by_class(error, code, line, monkeypatch, capsys):
    """InputError: exit 2; out of memory: exit 2 with the fix; TrainingDiverged: 3; any other class, builtin
    ValueError and OSError included, is a bug (exit 1), whatever its message says."""
    from t2tvit.cli import main as cli_module
    monkeypatch.setitem(COMMANDS, 'info', cli_module.Command('info', 'x', 'x', cli_module.INFO, _raising(error)))
    monkeypatch.setattr(cli_module, '_write_traceback', lambda e: Path('/nowhere/traceback.txt'))
    assert main(['info']) == code
    assert _one_error_line(capsys.readouterr().err, bug=code == 1).startswith(line)


def test_one_rule_for_the_weights_source():
    from t2tvit.options import check_agreement, check_pretrained_flags, check_weights_source
    check_weights_source('a.pth', False, None)
    check_weights_source(None, True, 't2t_vit_7.in1k')
    check_weights_source(None, False, 't2t_vit_7', random_use='export')
    cases = [
        (('a.pth', True, 't2t_vit_7.in1k'), {}, 'give either --checkpoint FILE or --pretrained (the released '
                                                 'weights of --model), not both'),
        ((None, True, None), {}, "--pretrained needs --model TAG, e.g. t2t_vit_14.in1k (timm.list_pretrained"),
        ((None, False, 't2t_vit_7'), {}, 'give --checkpoint FILE, or --model TAG --pretrained for released weights'),
        ((None, False, None), {'purpose': 'to start from'},
         'give --checkpoint FILE to start from, or --model TAG --pretrained'),
        ((None, False, None), {'random_use': 'export'}, 'give --checkpoint FILE, or --model NAME to export a '
                                                        'randomly initialised model (--model TAG --pretrained'),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(OptionError) as caught:
            check_weights_source(*args, **kwargs)
        assert str(caught.value).startswith(message), (args, kwargs, str(caught.value))
    with pytest.raises(OptionError, match='not both'):
        check_pretrained_flags('a.pth', True, 't2t_vit_7.in1k')
    check_agreement(True, 'bf16')
    check_agreement(False, 'none')
    with pytest.raises(OptionError, match='--agreement compares a reduced precision with fp32: give --amp bf16'):
        check_agreement(True, 'none')


def test_an_unknown_model_name_is_an_input_error_of_its_own_class():
    import timm
    from t2tvit import create_model
    from t2tvit._create import UnknownModelError
    with pytest.raises(UnknownModelError, match="unknown model 'resnet_t2t'; `t2tvit info` lists") as caught:
        create_model('resnet_t2t')
    assert isinstance(caught.value, InputError) and isinstance(caught.value, RuntimeError)
    assert timm.is_model('t2t_vit_7.in1k') and type(create_model('t2t_vit_7.in1k', img_size=32)).__name__ == 'T2TViT'


def test_expected_errors_are_one_line_with_exit_2(tmp_path, capsys):
    assert main(['eval', '--checkpoint', str(tmp_path / 'missing.pth')]) == 2
    assert 'missing.pth does not exist' in _one_error_line(capsys.readouterr().err)
    assert main(['nonsense']) == 2
    assert "invalid choice: 'nonsense'" in _one_error_line(capsys.readouterr().err)
    assert main(['train', '--resume', str(tmp_path / 'x.pth')]) == 2
    _one_error_line(capsys.readouterr().err)


# --- the README's finetune example --------------------------------------------------------------------------------

def test_finetune_without_model_builds_the_checkpoints_architecture(tiny_run, tmp_path, capsys):
    from PIL import Image
    for split in ('train', 'val'):
        for c in range(5):
            folder = tmp_path / 'my_photos' / split / f'class{c}'
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new('RGB', (36, 36), (40 * c, 10 * i, 90)).save(folder / f'{i}.png')
    code = main(['finetune', '--checkpoint', str(tiny_run), '--dataset', 'imagefolder', '--data',
                 str(tmp_path / 'my_photos'), '--num-classes', '5', '--img-size', '32', '--freeze-backbone', 'true',
                 '--epochs', '1', '--batch-size', '5', '--workers', '0', '--progress', 'off',
                 '--output', str(tmp_path / 'runs')])
    out = capsys.readouterr().out
    assert code == 0, out
    config = yaml.safe_load((tmp_path / 'runs' / 'finetune-t2t_vit_mini' / 'config.yaml').read_text())
    assert config['model'] == 't2t_vit_mini' and config['model_kwargs']['embed_dim'] == 32
    assert config['num_classes'] == 5 and 'started from' in out


# --- a CLI that answers at once -----------------------------------------------------------------------------------

_PROBE = ("import runpy, sys; sys.argv = ['t2tvit'] + sys.argv[1:]\n"
          "try:\n    runpy.run_module('t2tvit', run_name='__main__')\n"
          "except SystemExit:\n    pass\n"
          "print('HEAVY', sorted(m for m in ('torch', 'timm', 'numpy', 'PIL') if m in sys.modules))")


@pytest.mark.parametrize('argv', [['--help']] + [[c, '--help'] for c in COMMANDS] + [
    ['train', '--lr', '-1'], ['eval', '--checkpoint', 'missing.pth'], ['predict'], ['export', '--format', 'x']])
def test_help_and_argument_errors_import_no_torch(argv):
    result = subprocess.run([sys.executable, '-c', _PROBE, *argv], capture_output=True, text=True, env=_env(),
                            timeout=120)
    assert result.stdout.strip().splitlines()[-1] == 'HEAVY []', result.stdout + result.stderr
    assert 'Traceback' not in result.stderr


def _best_of(command, runs=3) -> float:
    best = float('inf')
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True, env=_env(), timeout=120)
        best = min(best, time.perf_counter() - start)
    return best


def test_help_takes_at_most_half_the_time_of_importing_timm():
    timm_import = _best_of([sys.executable, '-c', 'import timm'], runs=2)
    help_time = _best_of([sys.executable, '-m', 't2tvit', '--help'])
    assert help_time / timm_import <= 0.5, f'--help {help_time:.2f} s, import timm {timm_import:.2f} s'


def test_import_t2tvit_still_registers_the_models_with_timm():
    code = ("import t2tvit, sys; assert 'torch' not in sys.modules; import timm; "
            "assert timm.is_model('t2t_vit_14'); print(type(timm.create_model('t2t_vit_7', img_size=64)).__name__)")
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=_env(), timeout=120)
    assert result.stdout.strip() == 'T2TViT', result.stderr
