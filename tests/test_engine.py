"""Training engine end to end on tiny data: learning, exact resumption, DDP equivalence, bad input."""
from __future__ import annotations

import copy
import errno
import importlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import t2tvit
from t2tvit.cli.main import main as cli
from t2tvit.engine import ConfigError, TrainingDiverged, resolve_config, train
from t2tvit.engine import checkpointing
from t2tvit.engine.config import RECIPES, load_recipe
from t2tvit.engine.distributed import cleanup, init_distributed
from t2tvit.engine.evaluate import evaluate_checkpoint
from t2tvit.models import read_checkpoint
from t2tvit.options import OptionError

TINY_MODEL = {'embed_dim': 32, 'depth': 1, 'num_heads': 2, 'token_dim': 8, 't2t_drop_rate': 0.0}


def tiny_config(tmp_path: Path, run_name: str = 'run', **overrides) -> dict:
    config = dict(
        model='t2t_vit_mini', model_kwargs=TINY_MODEL, dataset='fake', img_size=16, in_chans=1, num_classes=4,
        fake_num_samples=64, batch_size=16, epochs=2, workers=0, drop_path=0.0, warmup_epochs=0, lr=2e-3,
        lr_base_size=16, log_interval=1, ckpt_interval=1, progress='off', smoothing=0.0, mean=[0.5], std=[0.5],
        aa=None, color_jitter=None, scale=[0.5, 1.0], output=str(tmp_path), run_name=run_name, seed=7)
    config.update(overrides)
    return resolve_config(None, config)


def cli_args(config: dict) -> list:
    """The same config as command-line flags."""
    args = []
    for key, value in config.items():
        if key in ('recipe',) or value is None:
            continue
        args += [f"--{key.replace('_', '-')}", json.dumps(value)]  # JSON is YAML
    return args


def weights(run_dir: Path, name: str = 'last.pth') -> dict:
    return read_checkpoint(run_dir / name)['state_dict']


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def subprocess_env() -> dict:
    # the same thread count as this process: float sums then add up in the same order as the in-process runs
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONUNBUFFERED='1')
    env.pop('PYTEST_XDIST_WORKER', None)
    return env


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory):
    """An uninterrupted 2-epoch run that the resumed runs must reproduce exactly."""
    tmp = tmp_path_factory.mktemp('reference')
    result = train(tiny_config(tmp, 'reference'))
    return result


def test_run_folder_holds_everything(reference_run):
    run_dir = reference_run.run_dir
    assert reference_run.status == 'finished' and reference_run.global_step == 8  # 2 epochs x 64/16
    for name in ('last.pth', 'best.pth', 'metrics.jsonl', 'config.yaml', 'curves.png', 'confusion_matrix.png',
                 'eval.json'):
        assert (run_dir / name).is_file(), name
    records = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
    assert [r['global_step'] for r in records if r['type'] == 'train'] == list(range(1, 9))
    assert [r['epoch'] for r in records if r['type'] == 'eval'] == [1, 2]
    state = read_checkpoint(run_dir / 'last.pth')
    for key in ('state_dict', 'optimizer', 'scheduler', 'epoch', 'step_in_epoch', 'global_step', 'classes'):
        assert key in state, key
    assert (state['epoch'], state['step_in_epoch'], state['global_step']) == (2, 0, 8)
    saved = yaml.safe_load((run_dir / 'config.yaml').read_text())
    assert saved['lr'] == 2e-3 and saved['num_classes'] == 4


def test_training_learns(tmp_path):
    result = train(tiny_config(tmp_path, 'learn', epochs=6, lr=5e-3))
    records = [json.loads(line) for line in (result.run_dir / 'metrics.jsonl').read_text().splitlines()]
    losses = [r['loss'] for r in records if r['type'] == 'train']
    assert sum(losses[-3:]) < sum(losses[:3]) - 0.3
    assert result.final_eval['top1'] >= 50  # chance is 25%


def test_budget_stop_then_rerun_gives_identical_weights(tmp_path, reference_run):
    first = train(tiny_config(tmp_path, 'resumed', max_steps=3))
    assert first.status == 'budget' and first.global_step == 3
    assert read_checkpoint(first.run_dir / 'last.pth')['step_in_epoch'] == 3
    saved = (first.run_dir / 'last.pth').stat().st_mtime_ns
    again = train(tiny_config(tmp_path, 'resumed', max_steps=3))  # the same budget again: nothing left to do
    assert again.status == 'budget' and again.global_step == 3
    assert (first.run_dir / 'last.pth').stat().st_mtime_ns == saved
    second = train(tiny_config(tmp_path, 'resumed'))  # the same command, without the budget: resumes
    assert second.status == 'finished' and second.global_step == 8
    assert_same_weights(weights(second.run_dir), weights(reference_run.run_dir))
    steps = [json.loads(line)['global_step'] for line in (second.run_dir / 'metrics.jsonl').read_text().splitlines()
             if json.loads(line)['type'] == 'train']
    assert steps == list(range(1, 9))  # no step logged twice after the resume


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f'training ended early: {proc.communicate()}')
        metrics = run_dir / 'metrics.jsonl'
        if metrics.exists():
            steps = [json.loads(line)['global_step'] for line in metrics.read_text().splitlines() if line.strip()]
            if steps and max(steps) >= step:
                return
        time.sleep(0.05)
    raise AssertionError(f'no step {step} within {timeout}s')


@pytest.mark.parametrize('how', ['SIGKILL', 'SIGINT'])
def test_interrupted_mid_epoch_then_resumed_ends_with_the_same_weights(tmp_path, reference_run, how):
    config = tiny_config(tmp_path, 'killed')
    command = [sys.executable, '-m', 't2tvit', 'train', *cli_args(config)]
    proc = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(tmp_path / 'killed', 2, proc)
    proc.send_signal(getattr(signal, how))
    out, err = proc.communicate(timeout=120)
    if how == 'SIGINT':
        assert proc.returncode == 130, err
        assert 'SIGINT received' in err and 'resume' in err
        state = read_checkpoint(tmp_path / 'killed' / 'last.pth')
        assert 2 <= state['global_step'] < 8  # saved where it stopped, mid-run
    else:
        assert proc.returncode == -signal.SIGKILL
    resumed = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert 'resuming' in resumed.stdout
    assert_same_weights(weights(tmp_path / 'killed'), weights(reference_run.run_dir))


def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    common = dict(fake_num_samples=32, batch_size=8, epochs=1, eval_interval=1)
    single = tiny_config(tmp_path, 'single', **common)
    double = tiny_config(tmp_path, 'double', **common)
    env = subprocess_env()
    one = subprocess.run([sys.executable, '-m', 't2tvit', 'train', *cli_args(single)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', '2',
                          '-m', 't2tvit', 'train', *cli_args(double)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr
    assert '2 process(es)' in two.stdout
    a, b = weights(tmp_path / 'single'), weights(tmp_path / 'double')
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff < 1e-5, diff
    # distributed evaluation counted every validation sample exactly once
    evals = [json.loads(line) for line in (tmp_path / 'double' / 'metrics.jsonl').read_text().splitlines()
             if json.loads(line)['type'] == 'eval']
    assert evals[-1]['samples'] == 8


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import torch.nn as nn
    calls = {'n': 0}
    original = nn.CrossEntropyLoss.forward

    def poisoned(self, logits, target):
        calls['n'] += 1
        loss = original(self, logits, target)
        return loss * float('nan') if calls['n'] == 5 else loss

    monkeypatch.setattr(nn.CrossEntropyLoss, 'forward', poisoned)
    config = tiny_config(tmp_path, 'nan')
    with pytest.raises(TrainingDiverged, match=r'loss became nan at epoch 2, step 1 \(global step 5\)') as info:
        train(config)
    assert 'last.pth (global step 4)' in str(info.value)
    state = read_checkpoint(tmp_path / 'nan' / 'last.pth')
    assert state['global_step'] == 4
    assert all(torch.isfinite(v).all() for v in state['state_dict'].values())


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, 'full')
    saves = {'n': 0}
    original = torch.save

    def failing_save(obj, f, *args, **kwargs):
        saves['n'] += 1
        if saves['n'] == 3:
            f.write(b'partial')
            raise OSError(errno.ENOSPC, 'No space left on device')
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpointing.torch, 'save', failing_save)
    with pytest.raises(checkpointing.CheckpointSaveError, match='No space left on device.*intact'):
        train(config)
    state = read_checkpoint(tmp_path / 'full' / 'last.pth')  # the save before the failure, whole
    assert state['global_step'] == 2
    assert not [p for p in (tmp_path / 'full').iterdir() if p.name.endswith('.tmp')]


def test_unwritable_output_is_refused_before_training(tmp_path, capsys):
    blocker = tmp_path / 'a-file'
    blocker.write_text('not a folder')
    config = tiny_config(blocker, 'x')
    assert cli(['train', *cli_args(config)]) == 2
    assert 'not writable' in capsys.readouterr().err


def test_missing_data_folder_is_named(tmp_path, capsys):
    config = tiny_config(tmp_path, 'x', dataset='fashion_mnist', data=str(tmp_path / 'nowhere'))
    assert cli(['train', *cli_args(config)]) == 2
    err = capsys.readouterr().err
    assert 'nowhere' in err and 'train-images-idx3-ubyte' in err


def test_empty_imagefolder_is_named(tmp_path, capsys):
    (tmp_path / 'data' / 'train').mkdir(parents=True)
    config = tiny_config(tmp_path, 'x', dataset='imagefolder', data=str(tmp_path / 'data'))
    assert cli(['train', *cli_args(config)]) == 2
    assert str(tmp_path / 'data') in capsys.readouterr().err


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match='unknown key.*learning_rate'):
        resolve_config(None, {'learning_rate': 1})
    with pytest.raises(ConfigError, match='batch_size 10 is not divisible by accum_steps 3'):
        resolve_config(None, {'batch_size': 10, 'accum_steps': 3})
    with pytest.raises(ConfigError, match="recipe 'nope' not found"):
        resolve_config('nope')


def test_every_shipped_recipe_resolves():
    assert {'imagenet', 'cifar10', 'cifar100', 'fashion_mnist', 'finetune'} <= set(RECIPES)
    imagenet = resolve_config('imagenet')
    assert (imagenet['epochs'], imagenet['batch_size'], imagenet['lr'], imagenet['weight_decay']) == (
        310, 512, 5e-4, 0.05)
    assert (imagenet['mixup'], imagenet['cutmix'], imagenet['aa'], imagenet['reprob']) == (
        0.8, 1.0, 'rand-m9-mstd0.5-inc1', 0.25)
    assert (imagenet['model_ema_decay'], imagenet['crop_pct'], imagenet['drop_path']) == (0.99996, 0.9, 0.1)
    for name in RECIPES:
        load_recipe(name)


def test_accumulation_matches_one_big_batch(tmp_path):
    big = train(tiny_config(tmp_path, 'big', epochs=1))
    accumulated = train(tiny_config(tmp_path, 'accum', epochs=1, accum_steps=4))
    assert_same_weights(weights(big.run_dir), weights(accumulated.run_dir), atol=1e-5)


@pytest.mark.parametrize('opt', ['adamw', 'sgd', 'nesterov'])
def test_cpu_training_takes_the_multi_tensor_optimizer_step_with_the_same_numbers(opt, tmp_path, monkeypatch):
    """On a CPU the optimizer is built with foreach=True (torch chooses it only for CUDA tensors); for the
    recipes' optimizers that gives the numbers of the per-parameter loop bit for bit."""
    import timm.optim
    from t2tvit.engine.build import optimizer_foreach
    assert optimizer_foreach(opt, torch.device('cpu')) is True
    assert optimizer_foreach(opt, torch.device('cuda')) is None  # torch's own choice there
    assert optimizer_foreach('no_such_optimizer', torch.device('cpu')) is None
    torch.manual_seed(0)
    start = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.LayerNorm(12), torch.nn.Linear(12, 3))
    finals = []
    for foreach in (None, optimizer_foreach(opt, torch.device('cpu'))):
        model = copy.deepcopy(start)
        optimizer = timm.optim.create_optimizer_v2(model, opt=opt, lr=0.05, weight_decay=0.05, momentum=0.9,
                                                   foreach=foreach)
        assert optimizer.defaults['foreach'] is foreach
        gradients = torch.Generator().manual_seed(1)
        for _ in range(4):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gradients)
            optimizer.step()
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.equal(finals[0], torch.cat([p.detach().flatten() for p in start.parameters()]))
    assert torch.equal(finals[0], finals[1])
    built = []
    real_create = timm.optim.create_optimizer_v2
    monkeypatch.setattr(timm.optim, 'create_optimizer_v2',
                        lambda *a, **k: built.append(real_create(*a, **k)) or built[-1])
    train(tiny_config(tmp_path, opt, opt=opt, momentum=0.9, max_steps=1))
    assert built and built[-1].defaults['foreach'] is True  # what `t2tvit train` built on this CPU


def test_ema_mixup_and_bf16_run(tmp_path):
    result = train(tiny_config(tmp_path, 'ema', epochs=1, model_ema=True, model_ema_decay=0.9, mixup=0.8,
                               cutmix=1.0, amp='bf16', smoothing=0.1, clip_grad=1.0))
    state = read_checkpoint(result.run_dir / 'last.pth')
    assert state['state_dict_ema'] is not None
    assert any(not torch.equal(state['state_dict_ema'][k], state['state_dict'][k]) for k in state['state_dict'])
    evals = [json.loads(line) for line in (result.run_dir / 'metrics.jsonl').read_text().splitlines()
             if json.loads(line)['type'] == 'eval']
    assert 'ema_top1' in evals[-1]


def test_best_checkpoint_evaluates_the_weights_that_scored(tmp_path, monkeypatch):
    """With EMA on, each epoch keeps the better of the raw and EMA weights; best.pth names the set that scored, so
    evaluating it reads those weights even when they are the raw ones."""
    train_module = importlib.import_module('t2tvit.engine.train')  # (t2tvit.engine.train is also the function)
    real = train_module.evaluate
    # (raw, EMA) held-out top-1 per epoch: epoch 1's raw weights are the best; epoch 2's EMA beats its raw ones
    scores = iter([60.0, 50.0, 55.0, 58.0])

    def scripted(*args, **kwargs):
        return dict(real(*args, **kwargs), top1=next(scores))
    monkeypatch.setattr(train_module, 'evaluate', scripted)
    result = train(tiny_config(tmp_path, 'ema-raw', epochs=2, model_ema=True, model_ema_decay=0.9))
    best, last = (read_checkpoint(result.run_dir / name) for name in ('best.pth', 'last.pth'))
    assert (best['best_epoch'], best['best_top1'], best['eval_state_dict']) == (1, 60.0, 'state_dict')
    assert last['eval_state_dict'] == 'state_dict_ema'
    assert any(not torch.equal(best['state_dict'][k], best['state_dict_ema'][k]) for k in best['state_dict'])
    for state, key in ((best, 'state_dict'), (last, 'state_dict_ema')):
        loaded = t2tvit.models.checkpoint.extract_state_dict(state)
        assert all(torch.equal(loaded[k], state[key][k]) for k in state[key])


def make_trainer(tmp_path: Path, **overrides):
    """A run set up as `train` sets it up (data, model, optimizer, schedule, loss), with no step taken."""
    from t2tvit.engine.train import Trainer
    info = init_distributed('cpu')
    try:
        return Trainer(tiny_config(tmp_path, **overrides), None, info)
    finally:
        cleanup(info)


def cosine_lr(t: int, total: int, lr: float = 2e-3, min_lr: float = 1e-5) -> float:
    """timm's cosine schedule per update: from lr at update 0 to min_lr at update `total`."""
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t / total))


def test_logged_learning_rates_follow_the_cosine_schedule(reference_run):
    records = [json.loads(line) for line in (reference_run.run_dir / 'metrics.jsonl').read_text().splitlines()]
    logged = [r['lr'] for r in records if r['type'] == 'train']  # after each update: 2 epochs x 4 steps
    assert logged == pytest.approx([cosine_lr(t, 8) for t in range(1, 9)], rel=1e-12, abs=0)
    assert logged[-1] == pytest.approx(1e-5, rel=1e-12)  # min_lr at the last step


def test_warmup_rises_linearly_from_warmup_lr_then_follows_the_cosine(tmp_path):
    trainer = make_trainer(tmp_path, warmup_epochs=1, warmup_lr=1e-6)  # 4 steps per epoch: 4 warm-up updates
    rates = []
    for t in range(1, 9):
        trainer.scheduler.step_update(num_updates=t)
        rates.append(trainer.optimizer.param_groups[0]['lr'])
    warmup = [1e-6 + t * (2e-3 - 1e-6) / 4 for t in (1, 2, 3)]
    assert rates == pytest.approx(warmup + [cosine_lr(t, 8) for t in range(4, 9)], rel=1e-12, abs=0)


def smoothed_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    return torch.full((len(labels), num_classes), off).scatter_(1, labels[:, None], 1 - smoothing + off)


def test_mixup_mixes_images_and_smoothed_targets_by_the_same_weight(tmp_path):
    trainer = make_trainer(tmp_path, mixup=0.8, cutmix=0.0, smoothing=0.1)
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.rand(8, 1, 16, 16, generator=generator), torch.arange(8) % 4
    torch.manual_seed(1)
    mixed, target = trainer.mixup(images.clone(), labels)
    # batch mode: each image is lam * itself + (1 - lam) * its partner in the reversed batch
    partner, delta = images.flip(0), (images - images.flip(0)).flatten()
    lam = float(((mixed - partner).flatten() @ delta) / (delta @ delta))
    assert 0 < lam < 1
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * partner)
    expected = lam * smoothed_one_hot(labels, 4, 0.1) + (1 - lam) * smoothed_one_hot(labels.flip(0), 4, 0.1)
    torch.testing.assert_close(target, expected)
    torch.testing.assert_close(target.sum(dim=1), torch.ones(8))
    logits = torch.randn(8, 4, generator=generator)
    torch.testing.assert_close(trainer.criterion(logits, target),
                               -(expected * F.log_softmax(logits, dim=1)).sum(dim=1).mean())


def test_cutmix_target_weight_is_the_pasted_area(tmp_path):
    trainer = make_trainer(tmp_path, mixup=0.0, cutmix=1.0, smoothing=0.0)
    images, labels = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 4
    torch.manual_seed(2)
    mixed, target = trainer.mixup(images.clone(), labels)
    pasted = (mixed == images.flip(0)) & (mixed != images)
    assert torch.equal(pasted | (mixed == images), torch.ones_like(pasted))  # every pixel from one of the two
    assert torch.equal(pasted, pasted[:1].expand_as(pasted))  # one box for the whole batch
    lam = 1 - pasted[0].float().mean().item()
    assert 0 < lam < 1
    expected = lam * F.one_hot(labels, 4).float() + (1 - lam) * F.one_hot(labels.flip(0), 4).float()
    torch.testing.assert_close(target, expected)


def test_label_smoothing_loss_is_cross_entropy_against_the_smoothed_target(tmp_path):
    trainer = make_trainer(tmp_path, smoothing=0.1)
    assert trainer.mixup is None
    logits, labels = torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 4
    target = smoothed_one_hot(labels, 4, 0.1)
    assert target[0].tolist() == pytest.approx([0.925, 0.025, 0.025, 0.025])
    torch.testing.assert_close(trainer.criterion(logits, labels),
                               -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean())


def test_eval_command_reports_and_writes_files(reference_run, tmp_path, capsys):
    out = tmp_path / 'eval'
    code = cli(['eval', '--checkpoint', str(reference_run.run_dir / 'best.pth'), '--workers', '0',
                '--output', str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert 'top-1' in printed and 'per-class top-1' in printed and 'class_0' in printed
    report = json.loads((out / 'eval.json').read_text())
    assert report['samples'] == 16 and set(report['per_class_top1']) == {f'class_{i}' for i in range(4)}
    assert (out / 'confusion_matrix.png').stat().st_size > 1000
    expected = json.loads((reference_run.run_dir / 'eval.json').read_text())
    assert report['top1'] == pytest.approx(expected['top1'])


def test_eval_agreement_compares_reduced_precision_with_fp32(reference_run, tmp_path, capsys):
    checkpoint = str(reference_run.run_dir / 'best.pth')
    code = cli(['eval', '--checkpoint', checkpoint, '--workers', '0', '--amp', 'bf16', '--agreement',
                '--output', str(tmp_path / 'bf16')])
    assert code == 0
    assert 'bf16 against fp32 on the same images: top-1 agreement' in capsys.readouterr().out
    report = json.loads((tmp_path / 'bf16' / 'eval.json').read_text())
    agreement = report['agreement']
    assert 0 <= agreement['top1_agreement'] <= 100 and agreement['precision'] == 'bf16'
    assert 0 < agreement['mean_abs_logit_diff'] <= agreement['max_abs_logit_diff'] < 1  # bf16 moved the logits
    expected = json.loads((reference_run.run_dir / 'eval.json').read_text())
    assert agreement['fp32_top1'] == pytest.approx(expected['top1'])  # the fp32 side is the plain evaluation
    with pytest.raises(OptionError, match='--agreement compares a reduced precision with fp32: give --amp bf16'):
        evaluate_checkpoint(checkpoint, None, workers=0, agreement=True)


def test_eval_uses_the_model_transform_for_imagenet_models():
    from t2tvit.engine.build import eval_transform_for
    model = t2tvit.create_model('t2t_vit_7')
    config = {'img_size': 224, 'in_chans': 3, 'mean': None, 'std': None, 'crop_pct': 0.9,
              'interpolation': 'bicubic'}
    text = str(eval_transform_for(config, model))
    assert 'Resize(size=248' in text and 'bicubic' in text and 'CenterCrop(size=(224, 224))' in text


def test_finetune_to_new_classes_and_resolution_lowers_the_loss(reference_run, tmp_path):
    config = tiny_config(tmp_path, 'ft', num_classes=3, img_size=24, epochs=3, lr=3e-3,
                         pretrained=str(reference_run.run_dir / 'best.pth'), layer_decay=0.75)
    result = train(config)
    state = read_checkpoint(result.run_dir / 'last.pth')
    assert state['state_dict']['head.weight'].shape == (3, 32)
    assert state['state_dict']['pos_embed'].shape[1] == 1 + 3 * 3  # 24 px -> 12 -> 6 -> a 3x3 grid
    records = [json.loads(line) for line in (result.run_dir / 'metrics.jsonl').read_text().splitlines()]
    losses = [r['loss'] for r in records if r['type'] == 'train']
    assert sum(losses[-3:]) < sum(losses[:3])


def test_finetune_cli_freezes_the_backbone(reference_run, tmp_path):
    config = tiny_config(tmp_path, 'frozen', num_classes=3, epochs=1, freeze_backbone=True)
    assert cli(['finetune', '--checkpoint', str(reference_run.run_dir / 'best.pth'), *cli_args(config)]) == 0
    before, after = weights(reference_run.run_dir, 'best.pth'), weights(tmp_path / 'frozen')
    assert torch.equal(before['blocks.0.attn.qkv.weight'], after['blocks.0.attn.qkv.weight'])
    assert after['head.weight'].shape == (3, 32)


def test_finetune_from_another_architecture_is_refused(reference_run, tmp_path, capsys):
    config = tiny_config(tmp_path, 'wrong', model='t2t_vit_7', model_kwargs={}, img_size=32, in_chans=1)
    assert cli(['finetune', '--checkpoint', str(reference_run.run_dir / 'best.pth'), *cli_args(config)]) == 2
    assert 'does not fit' in capsys.readouterr().err


def test_eval_of_an_official_checkpoint(fixtures_dir, tiny_configs, tmp_path, capsys):
    """An official-format .pth.tar (EMA weights, argparse args) evaluates with the model named on the command line."""
    kwargs = dict(tiny_configs['tiny_performer']['kwargs'])
    kwargs.pop('tokens_type'), kwargs.pop('num_classes'), kwargs.pop('img_size')
    code = cli(['eval', '--checkpoint', str(fixtures_dir / 'official' / 'tiny_performer.pth.tar'),
                '--model', 't2t_vit_7', '--model-kwargs', json.dumps(kwargs), '--img-size', '64',
                '--dataset', 'fake', '--workers', '0', '--output', str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    # --img-size 64 with the default crop fraction 0.9: resize to int(64 / 0.9) = 71, then crop 64
    assert 't2t_vit_7 on 64 images (fake, split val; resize 71 bicubic, centre crop 64)' in out, out
    report = json.loads((tmp_path / 'eval.json').read_text())
    assert len(report['per_class_top1']) == 10 and 0 <= report['top1'] <= 100


def test_corrupt_checkpoint_is_named(tmp_path, capsys):
    bad = tmp_path / 'broken.pth'
    bad.write_bytes(b'PK\x03\x04 not really a zip')
    assert cli(['eval', '--checkpoint', str(bad), '--model', 't2t_vit_7', '--dataset', 'fake']) == 2
    assert 'broken.pth' in capsys.readouterr().err


def test_corrupt_image_in_imagefolder_fails_naming_it_or_is_skipped(tmp_path, capsys):
    from PIL import Image
    for split in ('train', 'val'):
        for c in range(2):
            folder = tmp_path / 'data' / split / f'c{c}'
            folder.mkdir(parents=True)
            for i in range(8):
                Image.new('L', (16, 16), color=40 + 150 * c + i).save(folder / f'{i}.png')
    (tmp_path / 'data' / 'train' / 'c0' / 'broken.png').write_bytes(b'\x89PNG garbage')
    base = dict(dataset='imagefolder', data=str(tmp_path / 'data'), num_classes=2, batch_size=8, epochs=1)
    assert cli(['train', *cli_args(tiny_config(tmp_path, 'fail', **base))]) == 2
    assert 'broken.png' in capsys.readouterr().err
    assert cli(['train', *cli_args(tiny_config(tmp_path, 'skip', on_bad_image='skip', **base))]) == 0
    assert 'skipped 1 unreadable image' in capsys.readouterr().err


@pytest.mark.slow
def test_compiled_training_matches_eager_closely(tmp_path):
    """--compile true trains the same model (inductor kernels, so equal to float tolerance, not bit for bit)."""
    eager = train(tiny_config(tmp_path, 'eager', epochs=1))
    compiled = train(tiny_config(tmp_path, 'compiled', epochs=1, compile=True))
    assert_same_weights(weights(eager.run_dir), weights(compiled.run_dir), atol=1e-4)
