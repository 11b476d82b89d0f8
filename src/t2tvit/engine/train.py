"""Training and fine-tuning: one loop from a 2-core laptop to a multi-node cluster (evaluation: evaluate.py).

One process:       t2tvit train --config fashion_mnist
One node, 8 GPUs:  torchrun --nproc-per-node 8 -m t2tvit train --config imagenet --data /data/imagenet
Several nodes:     torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
                       -m t2tvit train --config imagenet --data /data/imagenet

Every random choice (data order, augmentation, Mixup, dropout) is derived from (seed, epoch, step, index), not from
a running generator (see sampling.py), so a run resumed from any checkpoint takes exactly the steps the
uninterrupted run took. `Trainer` holds one run: its set-up, the epoch loader, the step, the end of an epoch.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import timm
import timm.data
import timm.loss
import timm.optim
import timm.scheduler
import timm.utils
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from ..cpu_kernels import for_device
from ..data.streaming import check_bad_samples
from ..errors import TrainingDiverged
from ..models import read_checkpoint
from ..models.checkpoint import EVAL_STATE_DICT_KEY
from .build import (autocast_for, build_model, eval_transform_for, load_pretrained_weights, optimizer_foreach,
                    preflight, train_transform_for, training_sets)
from .checkpointing import atomic_torch_save, check_writable, load_training_state
from .config import ConfigError, save_config
from .distributed import DistInfo, barrier, broadcast_flag, cleanup, collectives, init_distributed
from .evaluate import eval_loader, evaluate
from .metrics import MetricsLog, plot_confusion, plot_curves, write_eval_json
from .precision import emulated_bf16_warning, resolve_amp
from .preflight import NonFiniteOutputError, check_run_folder
from .sampling import (RankBatches, SeededTransform, StreamTransform, derived_seed, epoch_micro_batches,
                       first_batches, seed_everything)

# build_model, eval_transform_for, preflight, evaluate, SeededTransform and StreamTransform are used here and are
# also imported from this module by name elsewhere
__all__ = ['train', 'Trainer', 'evaluate', 'TrainingDiverged', 'RunResult', 'build_model', 'eval_transform_for',
           'preflight', 'NonFiniteOutputError', 'SeededTransform', 'StreamTransform']


@dataclass
class RunResult:
    run_dir: Path
    status: str  # 'finished', 'interrupted', 'budget' (max_steps reached)
    epoch: int
    global_step: int
    best_top1: Optional[float] = None
    final_eval: Dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


# --- interruption -----------------------------------------------------------------------------------------------

class StopRequest:
    """First SIGINT/SIGTERM: finish the current step, save, exit. A second SIGINT stops at once."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        print(f'\n{signal.Signals(signum).name} received: saving a checkpoint after this step '
              f'(Ctrl-C again to stop at once)', file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


# --- the loop ---------------------------------------------------------------------------------------------------

def _progress(enabled: str, info: DistInfo, **kwargs):
    from tqdm.auto import tqdm
    show = info.is_main and (enabled in ('on', True) or (enabled == 'auto' and sys.stderr.isatty()))
    return tqdm(disable=not show, dynamic_ncols=True, **kwargs)


def run_dir_for(config: Dict[str, Any]) -> Path:
    name = config['run_name'] or f"{config['recipe'] or 'run'}-{config['model']}"
    return Path(config['output']) / name


def train(config: Dict[str, Any], resume: Optional[str] = 'auto', force: bool = False) -> RunResult:
    """Train (or fine-tune, when `config['pretrained']` is set) as `config` says; returns where and how it ended.

    `resume='auto'` continues from `RUN_DIR/last.pth` when it exists, a path resumes from that checkpoint, None
    starts afresh (refusing to overwrite an existing run). Outside a resumed run, files of the run folder that
    exist already are replaced only with `force` (`preflight.check_run_folder`).
    """
    info = init_distributed(config['device'])
    try:
        return Trainer(config, resume, info, force).run()
    finally:
        cleanup(info)


@dataclass
class LogWindow:
    """What happened since the last `train` record of metrics.jsonl: its loss is the mean over these micro-batches."""
    start: float = field(default_factory=time.time)
    images: int = 0
    loss: float = 0.0
    micro: int = 0


class Trainer:
    """One run: everything is built in `__init__` (data, model, optimizer, the state to resume), then `run` trains
    epoch by epoch, each a sequence of steps followed by evaluation and a checkpoint."""

    def __init__(self, config: Dict[str, Any], resume: Optional[str], info: DistInfo, force: bool = False):
        self.start_time = time.time()
        config = dict(config, amp=resolve_amp(config['amp'], info.device))  # 'auto': bf16 where native, else none
        self.config, self.info, self.device, self.world = config, info, info.device, info.world_size
        emulated = emulated_bf16_warning(config['amp'], info.device)
        if emulated and info.is_main:
            print(emulated, file=sys.stderr)
        self.check_batching()
        preflight(config, self.micro_local, self.device)
        self.run_dir = run_dir_for(config)
        self.last_path, self.best_path = self.run_dir / 'last.pth', self.run_dir / 'best.pth'
        self.resume = self.resume_from(resume, force)
        if info.is_main:
            check_writable(self.run_dir)
        barrier(info)
        self.build_data()
        self.build_model()
        self.build_optimization()
        self.build_loss()
        self.restore()
        self.open_logs()
        self.train_model: nn.Module = self.model
        if config['compile']:
            self.train_model = torch.compile(self.model)
        if info.distributed:
            self.train_model = nn.parallel.DistributedDataParallel(
                self.train_model, device_ids=[self.device.index] if self.device.type == 'cuda' else None)
        self.status, self.final_eval, self.completed_epochs = 'finished', {}, self.start_epoch
        self.eval_loader = eval_loader(self.val_set, self.eval_transform, self.micro_local, config['workers'], info)
        self.eval_split = 'held-out' if config['val_holdout'] else 'eval'  # what best.pth is chosen on

    # --- set-up ---------------------------------------------------------------------------------------------------

    def check_batching(self) -> None:
        config = self.config
        if config['amp'] == 'fp16' and self.device.type != 'cuda':
            raise ConfigError('amp fp16 needs a GPU (it relies on a gradient scaler); use --amp bf16 on CPU')
        if config['batch_size'] % (config['accum_steps'] * self.world):
            raise ConfigError(f"batch_size {config['batch_size']} must divide evenly into accum_steps "
                              f"{config['accum_steps']} x {self.world} processes")
        self.micro_global = config['batch_size'] // config['accum_steps']
        self.micro_local = self.micro_global // self.world

    def resume_from(self, resume: Optional[str], force: bool) -> Optional[str]:
        """The checkpoint to resume from, or None to start afresh; a fresh start replaces the run folder's files
        only with `force` (`preflight.check_run_folder`)."""
        if resume == 'auto':
            resume = str(self.last_path) if self.last_path.exists() else None
        elif resume is None and self.last_path.exists() and not force:
            raise ConfigError(f'{self.run_dir} already holds a run; resume it (--resume), start it afresh replacing '
                              f'its files (--force) or choose another --run-name')
        check_run_folder(self.run_dir, resume, force)
        return resume

    def build_data(self) -> None:
        config = self.config
        self.train_set, self.val_set = training_sets(config)
        self.num_classes = config['num_classes'] or self.train_set.num_classes
        if self.train_set.num_classes > self.num_classes:
            raise ConfigError(f"the data set has {self.train_set.num_classes} classes but num_classes is "
                              f"{self.num_classes}")
        if len(self.train_set) < self.micro_global:
            raise ConfigError(f'the training set has {len(self.train_set)} samples, fewer than one micro-batch '
                              f'({self.micro_global}); lower --batch-size')
        self.streaming = getattr(self.train_set, 'streaming', False)
        if self.streaming:
            self.train_set.check_workers(self.world, config['workers'])

    def build_model(self) -> None:
        config, device = self.config, self.device
        seed_everything(config['seed'])
        self.model = model = build_model(config, self.num_classes)
        if config['pretrained'] and not self.resume:
            reset = load_pretrained_weights(model, config['pretrained'])
            if self.info.is_main:
                print(f"started from {config['pretrained']}" + (f' (new classifier: {", ".join(reset)})'
                                                                 if reset else ''))
        if config['freeze_backbone']:
            for name, p in model.named_parameters():
                p.requires_grad = name.startswith('head.')
        for_device(model.to(device), device)  # CPU kernels on CPU
        self.train_transform = train_transform_for(config, model)
        self.eval_transform = eval_transform_for(config, model)

    def build_optimization(self) -> None:
        """Optimizer, steps per epoch, scheduler, gradient scaler and EMA."""
        config = self.config
        self.lr = config['lr'] * config['batch_size'] / config['lr_base_size']
        self.optimizer = timm.optim.create_optimizer_v2(
            self.model, opt=config['opt'], lr=self.lr, weight_decay=config['weight_decay'],
            momentum=config['momentum'], layer_decay=config['layer_decay'],
            foreach=optimizer_foreach(config['opt'], self.device))
        if self.streaming:  # every process reads the same number of whole micro-batches per epoch (see WdsDataset)
            probe = self.train_set.stream(None, training=True, batch_size=self.micro_local, workers=config['workers'])
            self.steps_per_epoch = len(probe) // self.micro_local // config['accum_steps']
        else:
            self.steps_per_epoch = len(self.train_set) // self.micro_global // config['accum_steps']
        if self.steps_per_epoch < 1:
            raise ConfigError(f'the training set has {len(self.train_set)} samples, fewer than one batch '
                              f'({config["batch_size"]}); lower --batch-size')
        # the schedule's length in epochs; a step budget (sched_steps) may end it mid-epoch
        sched_epochs = config['sched_steps'] / self.steps_per_epoch if config['sched_steps'] else config['epochs']
        self.scheduler, _ = timm.scheduler.create_scheduler_v2(
            self.optimizer, sched=config['sched'], num_epochs=sched_epochs,
            warmup_epochs=config['warmup_epochs'], warmup_lr=config['warmup_lr'], min_lr=config['min_lr'],
            step_on_epochs=False, updates_per_epoch=self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler('cuda') if config['amp'] == 'fp16' else None
        self.ema = timm.utils.ModelEmaV3(self.model, decay=config['model_ema_decay']) if config['model_ema'] else None

    def build_loss(self) -> None:
        """Mixup/CutMix (soft targets) or label smoothing or plain cross-entropy."""
        config = self.config
        self.mixup = None
        if config['mixup'] > 0 or config['cutmix'] > 0:
            self.mixup = timm.data.Mixup(
                mixup_alpha=config['mixup'], cutmix_alpha=config['cutmix'], prob=config['mixup_prob'],
                switch_prob=config['mixup_switch_prob'], mode=config['mixup_mode'],
                label_smoothing=config['smoothing'], num_classes=self.num_classes)
            self.criterion: nn.Module = timm.loss.SoftTargetCrossEntropy()
        elif config['smoothing'] > 0:
            self.criterion = timm.loss.LabelSmoothingCrossEntropy(smoothing=config['smoothing'])
        else:
            self.criterion = nn.CrossEntropyLoss()

    def restore(self) -> None:
        """Where training starts: from the beginning, or where the checkpoint to resume from stopped."""
        self.start_epoch, self.start_step, self.global_step, self.best_top1, self.best_epoch = 0, 0, 0, None, None
        self.eval_weights: Optional[str] = None  # the weight set (raw or EMA) the last evaluation scored
        if not self.resume:
            return
        config, world = self.config, self.world
        state = load_training_state(Path(self.resume))
        self.check_same_architecture(state)
        self.model.load_state_dict(state['state_dict'])
        self.optimizer.load_state_dict(state['optimizer'])
        self.scheduler.load_state_dict(state['scheduler'])
        if self.scaler is not None and state.get('scaler'):
            self.scaler.load_state_dict(state['scaler'])
        if self.ema is not None and state.get('state_dict_ema') is not None:
            self.ema.module.load_state_dict(state['state_dict_ema'])
        self.start_epoch, self.start_step = state['epoch'], state['step_in_epoch']
        self.global_step = state['global_step']
        saved_streams = state.get('streams')
        if (self.streaming and self.start_step and saved_streams and saved_streams != [world, config['workers']]
                and self.info.is_main):
            print(f'warning: {self.run_dir} was saved reading the stream with {saved_streams[0]} process(es) x '
                  f'{saved_streams[1]} worker(s), now {world} x {config["workers"]}: the rest of epoch '
                  f'{self.start_epoch + 1} reads other samples than the interrupted run would have', file=sys.stderr)
        self.best_top1, self.best_epoch = state.get('best_top1'), state.get('best_epoch')
        self.eval_weights = state.get(EVAL_STATE_DICT_KEY)
        if self.info.is_main:
            print(f'resuming {self.run_dir} at epoch {self.start_epoch + 1}, step {self.start_step} (global step '
                  f'{self.global_step})')

    def check_same_architecture(self, state: Dict[str, Any]) -> None:
        """Refuse, before loading anything, to resume a checkpoint of another model: another name, or settings that
        give weights of other shapes."""
        config, own = self.config, self.model.state_dict()
        saved, saved_config = state['state_dict'], state.get('config') or {}
        saved_name = state.get('arch') or saved_config.get('model') or 'an unnamed model'
        differs = sorted(set(saved) ^ set(own)) or [
            k for k in own if tuple(getattr(saved[k], 'shape', ())) != tuple(own[k].shape)]
        if saved_name.partition('.')[0] == config['model'].partition('.')[0] and not differs:
            return
        saved_kwargs = saved_config.get('model_kwargs') or {}
        saved_flags = f'--model {saved_name}' + (f" --model-kwargs '{json.dumps(saved_kwargs)}'" if saved_kwargs
                                                  else '')
        if differs and differs[0] in own and differs[0] in saved:
            detail = (f'{differs[0]} is {list(saved[differs[0]].shape)} there, {list(own[differs[0]].shape)} with '
                      f'these settings')
        elif differs:
            detail = f"{differs[0]} is in {'these settings' if differs[0] in own else 'the checkpoint'} only"
        else:
            detail = f"the checkpoint's model is {saved_name}"
        where = (f'{self.run_dir} holds a run of {saved_name}' if Path(self.resume) == self.last_path
                 else f'{self.resume} is a checkpoint of {saved_name}')
        raise ConfigError(
            f"{where}, which {config['model']} with model_kwargs {config['model_kwargs']} cannot resume ({detail}). "
            f'Resume it with its own settings ({saved_flags}), or train afresh: another --run-name, or '
            f'--no-resume --force to replace this run')

    def open_logs(self) -> None:
        """metrics.jsonl (cut back to the resumed step), config.yaml and, when asked, TensorBoard."""
        config = self.config
        self.metrics = MetricsLog(self.run_dir / 'metrics.jsonl', enabled=self.info.is_main)
        if self.info.is_main:
            if self.resume:
                self.metrics.truncate_after(self.global_step)
            save_config(dict(config, num_classes=self.num_classes, world_size=self.world, lr_scaled=self.lr),
                        self.run_dir / 'config.yaml')
        self.tb = _tensorboard(self.run_dir, config, self.info)

    # --- the run --------------------------------------------------------------------------------------------------

    def run(self) -> RunResult:
        config = self.config
        if self.info.is_main:
            val_name = 'held out of train for validation' if config['val_holdout'] else 'val'
            print(f"training {config['model']} on {config['dataset']} ({len(self.train_set)} train / "
                  f"{len(self.val_set)} {val_name}, {self.num_classes} classes) for {config['epochs']} epochs of "
                  f"{self.steps_per_epoch} steps, global batch {config['batch_size']}, lr {self.lr:.3g}, "
                  f"{self.world} process(es) on {self.device.type}; run folder {self.run_dir}")
        with StopRequest() as stop:
            for epoch in range(self.start_epoch, config['epochs']):
                if self.budget_spent():
                    self.status = 'budget'  # resumed with its budget already spent: take no further step
                    break
                self.train_epoch(epoch, self.start_step if epoch == self.start_epoch else 0, stop)
                self.report_skipped()
                if self.status != 'finished':
                    break
                self.end_epoch(epoch)
                if self.budget_spent():
                    self.status = 'budget' if self.completed_epochs < config['epochs'] else 'finished'
                    break
        self.finish()
        return RunResult(run_dir=self.run_dir, status=self.status, epoch=self.completed_epochs,
                         global_step=self.global_step, best_top1=self.best_top1, final_eval=self.final_eval,
                         seconds=time.time() - self.start_time)

    def budget_spent(self) -> bool:
        return self.config['max_steps'] is not None and self.global_step >= self.config['max_steps']

    def epoch_loader(self, epoch: int, first_step: int):
        """The epoch's micro-batches for this process, from step `first_step` on."""
        config, info, micro_local = self.config, self.info, self.micro_local
        if self.streaming:
            # the epoch's stream from its start (fixed by seed and epoch); a resumed run drops its first batches
            skip = first_step * config['accum_steps']
            stream = self.train_set.stream(
                StreamTransform(self.train_transform, config['seed'], epoch, info.rank, config['workers'],
                                micro_local, skip),
                training=True, batch_size=micro_local, workers=config['workers'],
                seed=derived_seed(config['seed'], epoch, 0x5D5) % 2 ** 31, epoch=epoch)
            return first_batches(DataLoader(
                stream, batch_size=micro_local, num_workers=config['workers'], drop_last=True,
                pin_memory=self.device.type == 'cuda',
                generator=torch.Generator().manual_seed(derived_seed(config['seed'], epoch, info.rank, 0x10AD))),
                skip, self.steps_per_epoch * config['accum_steps'])
        batches = epoch_micro_batches(len(self.train_set), self.micro_global, config['seed'], epoch)
        batches = batches[first_step * config['accum_steps']:self.steps_per_epoch * config['accum_steps']]
        return DataLoader(
            SeededTransform(self.train_set, self.train_transform, config['seed'], epoch),
            batch_sampler=RankBatches(batches, info.rank, self.world), num_workers=config['workers'],
            pin_memory=self.device.type == 'cuda')

    def train_epoch(self, epoch: int, first_step: int, stop: 'StopRequest') -> None:
        """Steps `first_step`.. of `epoch`; sets `status` when a signal or the step budget ends the run early."""
        config = self.config
        loader = self.epoch_loader(epoch, first_step)
        self.train_model.train()
        bar = _progress(config['progress'], self.info, total=self.steps_per_epoch, initial=first_step,
                        desc=f"epoch {epoch + 1}/{config['epochs']}", unit='img',
                        unit_scale=config['batch_size'])  # shows images/s and the epoch's ETA
        self.window = LogWindow()
        step, micro = first_step, 0
        for images, targets in loader:
            loss_value = self.forward_backward(images, targets, epoch, step, micro)
            micro += 1
            if micro < config['accum_steps']:
                continue
            micro = 0
            self.optimizer_step()
            step += 1
            self.log_step(epoch, step, loss_value, bar)
            if self.save_or_stop(epoch, step, stop):
                break
        bar.close()

    def forward_backward(self, images, targets, epoch: int, step: int, micro: int) -> float:
        """One micro-batch's loss and gradients; stops the run when the loss is not finite in any process."""
        config, info = self.config, self.info
        if self.streaming:
            check_bad_samples(self.train_set, config['on_bad_image'])
        images, targets = images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
        seed_everything(derived_seed(config['seed'], epoch, step, micro, info.rank))  # dropout, drop-path, Mixup
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        last_micro = micro == config['accum_steps'] - 1
        sync = contextlib.nullcontext() if (last_micro or not info.distributed) else self.train_model.no_sync()
        with sync, collectives(info, "DDP's forward and backward (buffer and gradient exchange)"):
            with autocast_for(config['amp'], self.device):
                loss = self.criterion(self.train_model(images), targets)
            scaled = loss / config['accum_steps']
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        loss_value = loss.item()  # a host sync, needed to stop on a bad loss before it reaches the weights
        if broadcast_flag(not math.isfinite(loss_value), info):
            last_good = f'{self.last_path} (global step {_saved_step(self.last_path)})' if self.last_path.exists() \
                else 'none was written yet'
            raise TrainingDiverged(
                f'loss became {loss_value} at epoch {epoch + 1}, step {step + 1} (global step '
                f'{self.global_step + 1}); nothing from this step was saved. Last good checkpoint: {last_good}. '
                f'Lower --lr, set --clip-grad, or use --amp bf16 instead of fp16')
        self.window.loss += loss_value
        self.window.micro += 1
        self.window.images += images.shape[0] * self.world
        return loss_value

    def optimizer_step(self) -> None:
        """Clip, step, then move the EMA and the learning rate on by one global step."""
        config, optimizer, scaler = self.config, self.optimizer, self.scaler
        if config['clip_grad']:
            if scaler is not None:
                scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), config['clip_grad'])
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)
        self.scheduler.step_update(num_updates=self.global_step)

    def log_step(self, epoch: int, step: int, loss_value: float, bar) -> None:
        """A `train` record every `log_interval` steps and at the epoch's last; the progress bar every step."""
        config, optimizer, window, global_step = self.config, self.optimizer, self.window, self.global_step
        lr_now = optimizer.param_groups[-1]['lr']
        if global_step % config['log_interval'] == 0 or step == self.steps_per_epoch:
            elapsed = time.time() - window.start
            record = {'type': 'train', 'epoch': epoch + 1, 'step': step, 'global_step': global_step,
                      'loss': window.loss / max(1, window.micro),
                      'lr': max(g['lr'] for g in optimizer.param_groups),
                      'img_per_s': window.images / max(elapsed, 1e-9), 'time': time.time()}
            self.metrics.write(record)
            if self.tb is not None:
                self.tb.add_scalar('train/loss', record['loss'], global_step)
                self.tb.add_scalar('train/lr', record['lr'], global_step)
            self.window = LogWindow()
        bar.set_postfix(loss=f'{loss_value:.3f}', lr=f'{lr_now:.2e}')
        bar.update(1)

    def save_or_stop(self, epoch: int, step: int, stop: 'StopRequest') -> bool:
        """Save mid-epoch every `ckpt_interval` steps, on a signal or when the budget is spent; True: stop now."""
        budget_spent = self.budget_spent()
        stop_now = broadcast_flag(stop.signal is not None, self.info)
        mid_epoch = step < self.steps_per_epoch
        # a stop in the epoch's last step saves it too: the run ends before end_epoch would; the rerun resumes
        # after the epoch's last step and evaluates and saves the epoch as usual
        if stop_now or (mid_epoch and (budget_spent or self.global_step % self.config['ckpt_interval'] == 0)):
            self.save(epoch, step)
        if stop_now or (budget_spent and mid_epoch):
            self.status = 'interrupted' if stop_now else 'budget'
            return True
        return False

    def report_skipped(self) -> None:
        """How many unreadable images the epoch skipped (with --on-bad-image skip)."""
        train_set = self.train_set
        skipped = getattr(train_set, 'bad_files', None)
        if skipped and self.info.is_main:
            print(f'skipped {len(skipped)} unreadable image(s) so far, e.g. {skipped[0]}', file=sys.stderr)
        if self.streaming:
            check_bad_samples(train_set, self.config['on_bad_image'])
            if train_set.bad_samples.count:
                print(f'skipped {train_set.bad_samples.count} unreadable sample(s) of {train_set.root} so far '
                      f'(this process; see the warnings)', file=sys.stderr)

    def end_epoch(self, epoch: int) -> None:
        """Evaluate when due, then save: a run resumed from here starts the next epoch."""
        config = self.config
        if (epoch + 1) % config['eval_interval'] == 0 or epoch + 1 == config['epochs'] or self.budget_spent():
            improved = self.evaluate_epoch(epoch)
            self.save(epoch + 1, 0, also_best=improved)
        else:
            self.save(epoch + 1, 0)
        self.completed_epochs = epoch + 1
        barrier(self.info)

    def evaluate_epoch(self, epoch: int) -> bool:
        """Evaluate the model (and its EMA, keeping the better of the two); True when it is the best so far."""
        config, model, loader = self.config, self.model, self.eval_loader
        result = evaluate(model, loader, self.device, self.num_classes, config['amp'], self.info)
        check_bad_samples(self.val_set, config['on_bad_image'])
        record = {'type': 'eval', 'epoch': epoch + 1, 'global_step': self.global_step, 'split': self.eval_split,
                  **{k: result[k] for k in ('top1', 'top5', 'loss', 'samples')}}
        score, self.eval_weights = result['top1'], 'state_dict'
        if self.ema is not None:
            ema_result = evaluate(self.ema.module, loader, self.device, self.num_classes, config['amp'], self.info)
            record.update(ema_top1=ema_result['top1'], ema_top5=ema_result['top5'])
            if ema_result['top1'] >= result['top1']:
                result, score, self.eval_weights = ema_result, ema_result['top1'], 'state_dict_ema'
        self.metrics.write(record)
        if self.tb is not None:
            self.tb.add_scalar('eval/top1', record['top1'], self.global_step)
            self.tb.add_scalar('eval/loss', record['loss'], self.global_step)
        if self.info.is_main:
            print(f"epoch {epoch + 1}: {self.eval_split} top-1 {record['top1']:.2f}%, top-5 {record['top5']:.2f}%, "
                  f"loss {record['loss']:.4f}" + (f", EMA top-1 {record['ema_top1']:.2f}%"
                                                   if 'ema_top1' in record else ''), flush=True)
        self.final_eval = result
        improved = self.best_top1 is None or score > self.best_top1
        if improved:
            self.best_top1, self.best_epoch = score, epoch + 1
        return improved

    def save(self, epoch: int, step_in_epoch: int, also_best: bool = False) -> None:
        """last.pth (and best.pth) with everything a resumed run needs: it restarts at (epoch, step_in_epoch)."""
        if not self.info.is_main:
            return
        config, num_classes = self.config, self.num_classes
        state = {
            'arch': config['model'],
            'state_dict': self.model.state_dict(),
            'state_dict_ema': self.ema.module.state_dict() if self.ema is not None else None,
            'optimizer': self.optimizer.state_dict(),
            'scheduler': self.scheduler.state_dict(),
            'scaler': self.scaler.state_dict() if self.scaler is not None else None,
            'epoch': epoch, 'step_in_epoch': step_in_epoch, 'global_step': self.global_step,
            'best_top1': self.best_top1, 'best_epoch': self.best_epoch,
            # which weights the last evaluation scored (best.pth: those of its best_top1); loaders read that set
            EVAL_STATE_DICT_KEY: self.eval_weights,
            'classes': list(self.train_set.classes), 'num_classes': num_classes,
            'config': dict(config, num_classes=num_classes),
            'streams': [self.world, config['workers']],  # a stream's sample order depends on them
        }
        atomic_torch_save(state, self.last_path)
        if also_best:
            atomic_torch_save(state, self.best_path)

    def finish(self) -> None:
        """Curves, the confusion matrix and eval.json of the last evaluation."""
        config, run_dir = self.config, self.run_dir
        if self.tb is not None:
            self.tb.close()
        if self.info.is_main:
            plot_curves(run_dir / 'metrics.jsonl', run_dir / 'curves.png',
                        title=f"{config['model']} on {config['dataset']}")
            if self.final_eval:
                final = self.final_eval
                plot_confusion(final['confusion'], self.train_set.classes, run_dir / 'confusion_matrix.png',
                               title=f"{config['model']}: top-1 {final['top1']:.2f}% on {final['samples']} "
                                     f"{'held-out ' if config['val_holdout'] else ''}images")
                write_eval_json(run_dir / 'eval.json', final, self.train_set.classes)
        barrier(self.info)


def _saved_step(path: Path) -> Any:
    try:
        return read_checkpoint(path).get('global_step')
    except Exception:  # the message is about the loss; an unreadable file only loses the step number
        return '?'


def _tensorboard(run_dir: Path, config: Dict[str, Any], info: DistInfo):
    if not (config['tensorboard'] and info.is_main):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print('tensorboard is not installed (pip install tensorboard); metrics go to metrics.jsonl only',
              file=sys.stderr)
        return None
    return SummaryWriter(log_dir=str(run_dir / 'tensorboard'))
