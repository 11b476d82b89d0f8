"""Training, evaluation and fine-tuning: one loop from a 2-core laptop to a multi-node cluster.

One process:       t2tvit train --config fashion_mnist
One node, 8 GPUs:  torchrun --nproc-per-node 8 -m t2tvit train --config imagenet --data /data/imagenet
Several nodes:     torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
                       -m t2tvit train --config imagenet --data /data/imagenet

Every random choice (data order, augmentation, Mixup, dropout) is derived from (seed, epoch, step, index), not from
a running generator, so a run resumed from any checkpoint takes exactly the steps the uninterrupted run took.
"""
from __future__ import annotations

import contextlib
import math
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import timm
import timm.data
import timm.loss
import timm.optim
import timm.scheduler
import timm.utils
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from ..cpu_kernels import for_device
from ..data import DataError, build_dataset, build_transform, holdout_split
from ..models import CheckpointError, checkpoint_filter_fn, mismatch_report, read_checkpoint, read_weights
from .checkpointing import atomic_torch_save, check_writable, load_training_state
from .config import ConfigError, save_config
from ..errors import TrainingDiverged
from .precision import resolve_amp
from .preflight import NonFiniteOutputError, check_memory, check_model_kwargs, check_optimizer
from .distributed import DistInfo, all_reduce_max, all_reduce_sum, barrier, broadcast_flag, cleanup, init_distributed
from .metrics import MetricsLog, plot_confusion, plot_curves, write_eval_json

__all__ = ['train', 'evaluate', 'TrainingDiverged', 'RunResult', 'build_model', 'eval_transform_for', 'preflight',
           'NonFiniteOutputError']


@dataclass
class RunResult:
    run_dir: Path
    status: str  # 'finished', 'interrupted', 'budget' (max_steps reached)
    epoch: int
    global_step: int
    best_top1: Optional[float] = None
    final_eval: Dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


# --- randomness ------------------------------------------------------------------------------------------------

def derived_seed(*parts: int) -> int:
    """A 32-bit seed that depends on every part (seed, epoch, step, ...), the same in every process and run."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and, when present, GPU) generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_host(seed: int) -> None:
    """Seed the generators that CPU-side data transforms draw from; per sample, so it must be cheap
    (torch.manual_seed also visits every GPU and costs ~0.25 ms)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.random.default_generator.manual_seed(seed)


class SeededTransform(Dataset):
    """Applies `transform` under a random state fixed by (seed, epoch, index): the same augmentation whichever
    worker, process or resumed run loads the sample."""

    def __init__(self, base: Dataset, transform, seed: int, epoch: int = 0):
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        seed_host(derived_seed(self.seed, self.epoch, index))
        return self.transform(image), label


class RankBatches(Sampler[List[int]]):
    """This process's share of each global micro-batch: every `world_size`-th index."""

    def __init__(self, batches: Sequence[Sequence[int]], rank: int, world_size: int):
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __iter__(self) -> Iterator[List[int]]:
        for batch in self.batches:
            yield list(batch[self.rank::self.world_size])

    def __len__(self) -> int:
        return len(self.batches)


class StreamTransform:
    """`transform` for a stream's samples (WebDataset), under a random state fixed by (seed, epoch, rank, loader
    worker, the worker's sample count).

    A stream has no sample index, but each loader worker reads the same samples in the same order whenever the
    epoch is read again (the shard order is fixed by seed and epoch, the worker's sample shuffle by its seed), so
    its own count names a sample as well. A resumed run reads the epoch from its start: the samples of the first
    `skip_batches` batches are passed over untransformed (a placeholder), and the loop drops those batches.
    """

    def __init__(self, transform, seed: int, epoch: int, rank: int, workers: int, batch_size: int,
                 skip_batches: int = 0):
        self.transform, self.seed, self.epoch, self.rank = transform, seed, epoch, rank
        self.workers, self.batch_size, self.skip_batches = max(1, workers), batch_size, skip_batches
        self._count = 0
        self._worker: Optional[int] = None
        self._skip = 0

    def __call__(self, image):
        if self._worker is None:
            worker = get_worker_info()
            self._worker = worker.id if worker is not None else 0
            # the DataLoader takes batches from its workers round robin: worker w made batches w, w + W, ...
            self._skip = max(0, math.ceil((self.skip_batches - self._worker) / self.workers)) * self.batch_size
        index = self._count
        self._count += 1
        if index < self._skip:
            return 0
        seed_host(derived_seed(self.seed, self.epoch, self.rank, self._worker, index))
        return self.transform(image)


def _check_bad_samples(dataset, policy: str) -> None:
    """A stream skips unreadable samples as it goes (timm warns about each); 'fail' stops at the first."""
    counter = getattr(dataset, 'bad_samples', None)
    if counter is not None and policy == 'fail' and counter.count:
        raise DataError(f'{counter.count} unreadable sample(s) in split {dataset.split!r} of {dataset.root} (timm '
                        f'warns about each above); write the store again with t2tvit convert-data, or pass '
                        f'--on-bad-image skip to skip and count them')


def _first_batches(loader, skip: int, limit: int):
    """Batches skip..limit-1 of `loader`: a resumed stream drops what it already trained on."""
    for i, batch in enumerate(loader):
        if i >= limit:
            break
        if i >= skip:
            yield batch


def epoch_micro_batches(num_samples: int, micro_batch: int, seed: int, epoch: int) -> List[List[int]]:
    """The global micro-batches of one epoch: a permutation fixed by (seed, epoch), incomplete tail dropped."""
    generator = torch.Generator().manual_seed(derived_seed(seed, epoch, 0x5EED))
    order = torch.randperm(num_samples, generator=generator).tolist()
    return [order[i * micro_batch:(i + 1) * micro_batch] for i in range(num_samples // micro_batch)]


# --- building blocks -------------------------------------------------------------------------------------------

def build_model(config: Dict[str, Any], num_classes: int) -> nn.Module:
    kwargs = dict(config['model_kwargs'])
    kwargs.setdefault('drop_path_rate', config['drop_path'])
    try:
        return timm.create_model(config['model'], num_classes=num_classes, img_size=config['img_size'],
                                 in_chans=config['in_chans'], **kwargs)
    except RuntimeError as e:
        if 'Unknown model' in str(e):
            raise ConfigError(f"unknown model {config['model']!r}; `t2tvit info` lists the registered ones") from e
        raise
    except (TypeError, ValueError) as e:  # the builder refuses an argument: its message names it
        raise ConfigError(f"cannot build {config['model']} with model_kwargs {config['model_kwargs']}: {e}") from e


# what each data set's folder holds, for the message when it is missing
_DATA_LAYOUT = {
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
                              f"holding {_DATA_LAYOUT.get(config['dataset'], 'the data set')}")
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


def _dataset(config: Dict[str, Any], split: str) -> Dataset:
    return build_dataset(
        config['dataset'], config['data'], split, transform=None, in_chans=config['in_chans'],
        on_bad_image=config['on_bad_image'], fake_num_samples=fake_split_size(config['fake_num_samples'], split),
        fake_num_classes=config['num_classes'] or 10, fake_image_size=config['img_size'], seed=config['seed'])


def training_sets(config: Dict[str, Any]):
    """(train, validation) of a run. With `val_holdout` N > 0, validation is N training images held out by seed
    and the data set's own validation split (the test set of MNIST-style data) is not read at all."""
    train_set = _dataset(config, 'train')
    if config['val_holdout']:
        try:
            return holdout_split(train_set, config['val_holdout'], config['seed'])
        except ValueError as e:
            raise ConfigError(str(e)) from e
    return train_set, _dataset(config, 'val')


def autocast_for(amp: str, device: torch.device):
    if amp == 'none':
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == 'bf16' else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# --- evaluation -------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, num_classes: int, amp: str = 'none',
             info: Optional[DistInfo] = None, agreement: bool = False) -> Dict[str, Any]:
    """Top-1/top-5, mean loss, per-class accuracy and the confusion matrix; across processes each sample counts
    once (every process sees a disjoint share, with no padding).

    `agreement` (with `amp`): also run every batch in fp32 and report how often the two agree on the top-1 class,
    the fp32 top-1, and how far the logits move (`result['agreement']`).
    """
    if agreement and amp == 'none':
        raise ConfigError('agreement compares a reduced precision with fp32: give amp bf16 or fp16 as well')
    info = info or DistInfo(device=device)
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, top-5 hits, samples
    # top-1 agreements, fp32 top-1 hits, sum of |logit difference|, its max (a max: reduced separately)
    agree = torch.zeros(3, dtype=torch.float64, device=device)
    max_diff = torch.zeros(1, dtype=torch.float64, device=device)
    nonfinite = torch.zeros((), dtype=torch.int64, device=device)  # images whose logits hold NaN or infinity
    k = min(5, num_classes)
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast_for(amp, device):
            logits = model(images)
        logits = logits.float()
        nonfinite += (~torch.isfinite(logits)).any(dim=1).sum()
        top1 = logits.argmax(dim=1)
        if agreement:
            reference = model(images).float()
            reference_top1 = reference.argmax(dim=1)
            agree[0] += (reference_top1 == top1).sum()
            agree[1] += (reference_top1 == targets).sum()
            difference = (reference - logits).abs()
            agree[2] += difference.sum().double()
            max_diff = torch.maximum(max_diff, difference.max().double())
        sums[0] += F.cross_entropy(logits, targets, reduction='sum').double()
        sums[1] += (logits.topk(k, dim=1).indices == targets[:, None]).any(dim=1).sum()
        sums[2] += targets.numel()
        index = targets * num_classes + top1
        confusion += torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)
    all_reduce_sum(confusion, info)
    all_reduce_sum(sums, info)
    all_reduce_sum(nonfinite, info)
    if nonfinite.item():
        raise NonFiniteOutputError(
            f'the model gave NaN or infinite logits for {nonfinite.item()} of {int(sums[2].item())} images; its '
            f'weights are broken (a diverged run or EMA?), so no accuracy is reported. Use another checkpoint')
    n = max(sums[2].item(), 1)
    confusion = confusion.cpu()
    per_class = (confusion.diag().double() / confusion.sum(dim=1).clamp_min(1)).tolist()
    result = {
        'top1': 100.0 * confusion.diag().sum().item() / n,
        'top5': 100.0 * sums[1].item() / n,
        'loss': sums[0].item() / n,
        'samples': int(n),
        'per_class_top1': [100.0 * v for v in per_class],
        'confusion': confusion,
    }
    if agreement:
        all_reduce_sum(agree, info)
        all_reduce_max(max_diff, info)
        result['agreement'] = {
            'precision': amp,
            'top1_agreement': 100.0 * agree[0].item() / n,  # % of images whose top-1 class is fp32's
            'fp32_top1': 100.0 * agree[1].item() / n,
            'mean_abs_logit_diff': agree[2].item() / (n * num_classes),
            'max_abs_logit_diff': max_diff.item(),
        }
    return result


def _eval_loader(dataset: Dataset, transform, batch_size: int, workers: int, info: DistInfo):
    if getattr(dataset, 'streaming', False):  # each process reads its own shards in full
        stream = dataset.stream(transform, training=False, batch_size=batch_size, workers=workers, rank=info.rank,
                                world_size=info.world_size)
        if stream is None:
            return []
        return DataLoader(stream, batch_size=batch_size, num_workers=workers, pin_memory=info.device.type == 'cuda')
    indices = list(range(info.rank, len(dataset), info.world_size))
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    return DataLoader(SeededTransform(dataset, transform, 0), batch_sampler=batches, num_workers=workers,
                      pin_memory=info.device.type == 'cuda')


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


def train(config: Dict[str, Any], resume: Optional[str] = 'auto') -> RunResult:
    """Train (or fine-tune, when `config['pretrained']` is set) as `config` says; returns where and how it ended.

    `resume='auto'` continues from `RUN_DIR/last.pth` when it exists, a path resumes from that checkpoint, None
    starts afresh (refusing to overwrite an existing run).
    """
    info = init_distributed(config['device'])
    try:
        return _train(config, resume, info)
    finally:
        cleanup(info)


def _train(config: Dict[str, Any], resume: Optional[str], info: DistInfo) -> RunResult:
    start_time = time.time()
    device = info.device
    config = dict(config, amp=resolve_amp(config['amp'], device))  # 'auto': bf16 where native here, else none
    if config['amp'] == 'fp16' and device.type != 'cuda':
        raise ConfigError('amp fp16 needs a GPU (it relies on a gradient scaler); use --amp bf16 on CPU')
    world = info.world_size
    if config['batch_size'] % (config['accum_steps'] * world):
        raise ConfigError(f"batch_size {config['batch_size']} must divide evenly into accum_steps "
                          f"{config['accum_steps']} x {world} processes")
    micro_global = config['batch_size'] // config['accum_steps']
    micro_local = micro_global // world
    preflight(config, micro_local, device)

    run_dir = run_dir_for(config)
    last_path, best_path = run_dir / 'last.pth', run_dir / 'best.pth'
    if resume == 'auto':
        resume = str(last_path) if last_path.exists() else None
    elif resume is None and last_path.exists():
        raise ConfigError(f'{run_dir} already holds a run; resume it (--resume) or choose another --run-name')
    if info.is_main:
        check_writable(run_dir)
    barrier(info)

    # data
    train_set, val_set = training_sets(config)
    num_classes = config['num_classes'] or train_set.num_classes
    if train_set.num_classes > num_classes:
        raise ConfigError(f"the data set has {train_set.num_classes} classes but num_classes is {num_classes}")
    if len(train_set) < micro_global:
        raise ConfigError(f'the training set has {len(train_set)} samples, fewer than one micro-batch '
                          f'({micro_global}); lower --batch-size')
    streaming = getattr(train_set, 'streaming', False)
    if streaming:
        train_set.check_workers(world, config['workers'])

    # model
    seed_everything(config['seed'])
    model = build_model(config, num_classes)
    if config['pretrained'] and not resume:
        reset = load_pretrained_weights(model, config['pretrained'])
        if info.is_main:
            print(f"started from {config['pretrained']}" + (f' (new classifier: {", ".join(reset)})' if reset else ''))
    if config['freeze_backbone']:
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith('head.')
    for_device(model.to(device), device)  # CPU kernels on CPU
    train_transform, eval_transform = train_transform_for(config, model), eval_transform_for(config, model)

    lr = config['lr'] * config['batch_size'] / config['lr_base_size']
    optimizer = timm.optim.create_optimizer_v2(
        model, opt=config['opt'], lr=lr, weight_decay=config['weight_decay'], momentum=config['momentum'],
        layer_decay=config['layer_decay'])
    if streaming:  # every process reads the same number of whole micro-batches per epoch (see WdsDataset.stream)
        probe = train_set.stream(None, training=True, batch_size=micro_local, workers=config['workers'])
        steps_per_epoch = len(probe) // micro_local // config['accum_steps']
    else:
        steps_per_epoch = len(train_set) // micro_global // config['accum_steps']
    if steps_per_epoch < 1:
        raise ConfigError(f'the training set has {len(train_set)} samples, fewer than one batch '
                          f'({config["batch_size"]}); lower --batch-size')
    scheduler, _ = timm.scheduler.create_scheduler_v2(
        optimizer, sched=config['sched'], num_epochs=config['epochs'], warmup_epochs=config['warmup_epochs'],
        warmup_lr=config['warmup_lr'], min_lr=config['min_lr'], step_on_epochs=False,
        updates_per_epoch=steps_per_epoch)
    scaler = torch.amp.GradScaler('cuda') if config['amp'] == 'fp16' else None
    ema = timm.utils.ModelEmaV3(model, decay=config['model_ema_decay']) if config['model_ema'] else None

    mixup = None
    if config['mixup'] > 0 or config['cutmix'] > 0:
        mixup = timm.data.Mixup(
            mixup_alpha=config['mixup'], cutmix_alpha=config['cutmix'], prob=config['mixup_prob'],
            switch_prob=config['mixup_switch_prob'], mode=config['mixup_mode'],
            label_smoothing=config['smoothing'], num_classes=num_classes)
        criterion: nn.Module = timm.loss.SoftTargetCrossEntropy()
    elif config['smoothing'] > 0:
        criterion = timm.loss.LabelSmoothingCrossEntropy(smoothing=config['smoothing'])
    else:
        criterion = nn.CrossEntropyLoss()

    # state to resume
    start_epoch, start_step, global_step, best_top1, best_epoch = 0, 0, 0, None, None
    if resume:
        state = load_training_state(Path(resume))
        model.load_state_dict(state['state_dict'])
        optimizer.load_state_dict(state['optimizer'])
        scheduler.load_state_dict(state['scheduler'])
        if scaler is not None and state.get('scaler'):
            scaler.load_state_dict(state['scaler'])
        if ema is not None and state.get('state_dict_ema') is not None:
            ema.module.load_state_dict(state['state_dict_ema'])
        start_epoch, start_step, global_step = state['epoch'], state['step_in_epoch'], state['global_step']
        saved_streams = state.get('streams')
        if streaming and start_step and saved_streams and saved_streams != [world, config['workers']] and info.is_main:
            print(f'warning: {run_dir} was saved reading the stream with {saved_streams[0]} process(es) x '
                  f'{saved_streams[1]} worker(s), now {world} x {config["workers"]}: the rest of epoch '
                  f'{start_epoch + 1} reads other samples than the interrupted run would have', file=sys.stderr)
        best_top1, best_epoch = state.get('best_top1'), state.get('best_epoch')
        if info.is_main:
            print(f'resuming {run_dir} at epoch {start_epoch + 1}, step {start_step} (global step {global_step})')

    metrics = MetricsLog(run_dir / 'metrics.jsonl', enabled=info.is_main)
    if info.is_main:
        if resume:
            metrics.truncate_after(global_step)
        save_config(dict(config, num_classes=num_classes, world_size=world, lr_scaled=lr), run_dir / 'config.yaml')
    tb = _tensorboard(run_dir, config, info)

    train_model: nn.Module = model
    if config['compile']:
        train_model = torch.compile(model)
    if info.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == 'cuda' else None)

    def save(epoch: int, step_in_epoch: int, also_best: bool = False) -> None:
        """last.pth (and best.pth) with everything a resumed run needs: it restarts at (epoch, step_in_epoch)."""
        if not info.is_main:
            return
        state = {
            'arch': config['model'],
            'state_dict': model.state_dict(),
            'state_dict_ema': ema.module.state_dict() if ema is not None else None,
            'optimizer': optimizer.state_dict(),
            'scheduler': scheduler.state_dict(),
            'scaler': scaler.state_dict() if scaler is not None else None,
            'epoch': epoch, 'step_in_epoch': step_in_epoch, 'global_step': global_step,
            'best_top1': best_top1, 'best_epoch': best_epoch,
            'classes': list(train_set.classes), 'num_classes': num_classes,
            'config': dict(config, num_classes=num_classes),
            'streams': [world, config['workers']],  # a stream's sample order depends on them
            'rng': {'torch': torch.get_rng_state(), 'python': random.getstate()[1],
                    'numpy': torch.from_numpy(np.random.get_state()[1].astype(np.int64))},
        }
        atomic_torch_save(state, last_path)
        if also_best:
            atomic_torch_save(state, best_path)

    status = 'finished'
    final_eval: Dict[str, Any] = {}
    eval_loader = _eval_loader(val_set, eval_transform, micro_local, config['workers'], info)
    eval_split = 'held-out' if config['val_holdout'] else 'eval'  # what best.pth is chosen on
    completed_epochs = start_epoch
    if info.is_main:
        val_name = 'held out of train for validation' if config['val_holdout'] else 'val'
        print(f"training {config['model']} on {config['dataset']} ({len(train_set)} train / {len(val_set)} {val_name}, "
              f"{num_classes} classes) for {config['epochs']} epochs of {steps_per_epoch} steps, global batch "
              f"{config['batch_size']}, lr {lr:.3g}, {world} process(es) on {device.type}; run folder {run_dir}")

    with StopRequest() as stop:
        for epoch in range(start_epoch, config['epochs']):
            if config['max_steps'] is not None and global_step >= config['max_steps']:
                status = 'budget'  # resumed with its budget already spent: take no further step
                break
            first_step = start_step if epoch == start_epoch else 0
            if streaming:
                # the epoch's stream from its start (fixed by seed and epoch); a resumed run drops its first batches
                skip = first_step * config['accum_steps']
                stream = train_set.stream(
                    StreamTransform(train_transform, config['seed'], epoch, info.rank, config['workers'], micro_local,
                                    skip),
                    training=True, batch_size=micro_local, workers=config['workers'],
                    seed=derived_seed(config['seed'], epoch, 0x5D5) % 2 ** 31, epoch=epoch)
                loader = _first_batches(DataLoader(
                    stream, batch_size=micro_local, num_workers=config['workers'], drop_last=True,
                    pin_memory=device.type == 'cuda',
                    generator=torch.Generator().manual_seed(derived_seed(config['seed'], epoch, info.rank, 0x10AD))),
                    skip, steps_per_epoch * config['accum_steps'])
            else:
                batches = epoch_micro_batches(len(train_set), micro_global, config['seed'], epoch)
                batches = batches[first_step * config['accum_steps']:steps_per_epoch * config['accum_steps']]
                loader = DataLoader(
                    SeededTransform(train_set, train_transform, config['seed'], epoch),
                    batch_sampler=RankBatches(batches, info.rank, world), num_workers=config['workers'],
                    pin_memory=device.type == 'cuda')
            train_model.train()
            bar = _progress(config['progress'], info, total=steps_per_epoch, initial=first_step,
                            desc=f"epoch {epoch + 1}/{config['epochs']}", unit='img',
                            unit_scale=config['batch_size'])  # shows images/s and the epoch's ETA
            window_start, window_images, window_loss, window_micro = time.time(), 0, 0.0, 0
            step = first_step
            micro = 0
            for images, targets in loader:
                if streaming:
                    _check_bad_samples(train_set, config['on_bad_image'])
                images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
                seed = derived_seed(config['seed'], epoch, step, micro, info.rank)
                seed_everything(seed)  # dropout, drop-path and Mixup draws
                if mixup is not None:
                    images, targets = mixup(images, targets)
                last_micro = micro == config['accum_steps'] - 1
                sync = contextlib.nullcontext() if (last_micro or not info.distributed) else train_model.no_sync()
                with sync:
                    with autocast_for(config['amp'], device):
                        loss = criterion(train_model(images), targets)
                    scaled = loss / config['accum_steps']
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                loss_value = loss.item()  # a host sync, needed to stop on a bad loss before it reaches the weights
                if broadcast_flag(not math.isfinite(loss_value), info):
                    last_good = f'{last_path} (global step {_saved_step(last_path)})' if last_path.exists() else \
                        'none was written yet'
                    raise TrainingDiverged(
                        f'loss became {loss_value} at epoch {epoch + 1}, step {step + 1} (global step '
                        f'{global_step + 1}); nothing from this step was saved. Last good checkpoint: {last_good}. '
                        f'Lower --lr, set --clip-grad, or use --amp bf16 instead of fp16')
                window_loss += loss_value
                window_micro += 1
                window_images += images.shape[0] * world
                micro += 1
                if not last_micro:
                    continue
                micro = 0

                if config['clip_grad']:
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), config['clip_grad'])
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
                step += 1
                if ema is not None:
                    ema.update(model, step=global_step)
                scheduler.step_update(num_updates=global_step)

                lr_now = optimizer.param_groups[-1]['lr']
                if global_step % config['log_interval'] == 0 or step == steps_per_epoch:
                    elapsed = time.time() - window_start
                    record = {'type': 'train', 'epoch': epoch + 1, 'step': step, 'global_step': global_step,
                              'loss': window_loss / max(1, window_micro),
                              'lr': max(g['lr'] for g in optimizer.param_groups),
                              'img_per_s': window_images / max(elapsed, 1e-9), 'time': time.time()}
                    metrics.write(record)
                    if tb is not None:
                        tb.add_scalar('train/loss', record['loss'], global_step)
                        tb.add_scalar('train/lr', record['lr'], global_step)
                    window_start, window_images, window_loss, window_micro = time.time(), 0, 0.0, 0
                bar.set_postfix(loss=f'{loss_value:.3f}', lr=f'{lr_now:.2e}')
                bar.update(1)

                budget_spent = config['max_steps'] is not None and global_step >= config['max_steps']
                stop_now = broadcast_flag(stop.signal is not None, info)
                if step < steps_per_epoch and (stop_now or budget_spent or global_step % config['ckpt_interval'] == 0):
                    save(epoch, step)
                if stop_now or (budget_spent and step < steps_per_epoch):
                    status = 'interrupted' if stop_now else 'budget'
                    break
            bar.close()
            skipped = getattr(train_set, 'bad_files', None)
            if skipped and info.is_main:
                print(f'skipped {len(skipped)} unreadable image(s) so far, e.g. {skipped[0]}', file=sys.stderr)
            if streaming:
                _check_bad_samples(train_set, config['on_bad_image'])
                if train_set.bad_samples.count:
                    print(f'skipped {train_set.bad_samples.count} unreadable sample(s) of {train_set.root} so far '
                          f'(this process; see the warnings)', file=sys.stderr)
            if status != 'finished':
                break

            # end of epoch: evaluate, then save (a resumed run then starts the next epoch)
            last_epoch = epoch + 1 == config['epochs'] or (
                config['max_steps'] is not None and global_step >= config['max_steps'])
            if (epoch + 1) % config['eval_interval'] == 0 or last_epoch:
                result = evaluate(model, eval_loader, device, num_classes, config['amp'], info)
                _check_bad_samples(val_set, config['on_bad_image'])
                record = {'type': 'eval', 'epoch': epoch + 1, 'global_step': global_step, 'split': eval_split,
                          **{k: result[k] for k in ('top1', 'top5', 'loss', 'samples')}}
                score = result['top1']
                if ema is not None:
                    ema_result = evaluate(ema.module, eval_loader, device, num_classes, config['amp'], info)
                    record.update(ema_top1=ema_result['top1'], ema_top5=ema_result['top5'])
                    if ema_result['top1'] >= result['top1']:
                        result, score = ema_result, ema_result['top1']
                metrics.write(record)
                if tb is not None:
                    tb.add_scalar('eval/top1', record['top1'], global_step)
                    tb.add_scalar('eval/loss', record['loss'], global_step)
                if info.is_main:
                    print(f"epoch {epoch + 1}: {eval_split} top-1 {record['top1']:.2f}%, top-5 {record['top5']:.2f}%, "
                          f"loss {record['loss']:.4f}" + (f", EMA top-1 {record['ema_top1']:.2f}%"
                                                           if 'ema_top1' in record else ''), flush=True)
                final_eval = result
                improved = best_top1 is None or score > best_top1
                if improved:
                    best_top1, best_epoch = score, epoch + 1
                save(epoch + 1, 0, also_best=improved)
            else:
                save(epoch + 1, 0)
            completed_epochs = epoch + 1
            barrier(info)
            if config['max_steps'] is not None and global_step >= config['max_steps']:
                status = 'budget' if completed_epochs < config['epochs'] else 'finished'
                break

    if tb is not None:
        tb.close()
    if info.is_main:
        plot_curves(run_dir / 'metrics.jsonl', run_dir / 'curves.png', title=f"{config['model']} on {config['dataset']}")
        if final_eval:
            plot_confusion(final_eval['confusion'], train_set.classes, run_dir / 'confusion_matrix.png',
                           title=f"{config['model']}: top-1 {final_eval['top1']:.2f}% on {final_eval['samples']} "
                                 f"{'held-out ' if config['val_holdout'] else ''}images")
            write_eval_json(run_dir / 'eval.json', final_eval, train_set.classes)
    barrier(info)
    return RunResult(run_dir=run_dir, status=status, epoch=completed_epochs,
                     global_step=global_step, best_top1=best_top1, final_eval=final_eval,
                     seconds=time.time() - start_time)


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
