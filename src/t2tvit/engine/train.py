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
        return Trainer(config, resume, info).run()
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

    def __init__(self, config: Dict[str, Any], resume: Optional[str], info: DistInfo):
        self.start_time = time.time()
        self.config, self.info, self.device, self.world = config, info, info.device, info.world_size
        self.check_batching()
        preflight(config, self.micro_local, self.device)
        self.run_dir = run_dir_for(config)
        self.last_path, self.best_path = self.run_dir / 'last.pth', self.run_dir / 'best.pth'
        self.resume = self.resume_from(resume)
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
        self.eval_loader = _eval_loader(self.val_set, self.eval_transform, self.micro_local, config['workers'], info)
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

    def resume_from(self, resume: Optional[str]) -> Optional[str]:
        """The checkpoint to resume from, or None to start afresh."""
        if resume == 'auto':
            return str(self.last_path) if self.last_path.exists() else None
        if resume is None and self.last_path.exists():
            raise ConfigError(f'{self.run_dir} already holds a run; resume it (--resume) or choose another --run-name')
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
            momentum=config['momentum'], layer_decay=config['layer_decay'])
        if self.streaming:  # every process reads the same number of whole micro-batches per epoch (see WdsDataset)
            probe = self.train_set.stream(None, training=True, batch_size=self.micro_local, workers=config['workers'])
            self.steps_per_epoch = len(probe) // self.micro_local // config['accum_steps']
        else:
            self.steps_per_epoch = len(self.train_set) // self.micro_global // config['accum_steps']
        if self.steps_per_epoch < 1:
            raise ConfigError(f'the training set has {len(self.train_set)} samples, fewer than one batch '
                              f'({config["batch_size"]}); lower --batch-size')
        self.scheduler, _ = timm.scheduler.create_scheduler_v2(
            self.optimizer, sched=config['sched'], num_epochs=config['epochs'],
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
        if not self.resume:
            return
        config, world = self.config, self.world
        state = load_training_state(Path(self.resume))
        self.model.load_state_dict(state['state_dict'])
        self.optimizer.load_state_dict(state['optimizer'])
        self.scheduler.load_state_dict(state['scheduler'])
        if self.scaler is not None and state.get('scaler'):
            self.scaler.load_state_dict(state['scaler'])
        if self.ema is not None and state.get('state_dict_ema') is not None:
            self.ema.module.load_state_dict(state['state_dict_ema'])
        self.start_epoch, self.start_step, self.global_step = state['epoch'], state['step_in_epoch'], state['global_step']
        saved_streams = state.get('streams')
        if (self.streaming and self.start_step and saved_streams and saved_streams != [world, config['workers']]
                and self.info.is_main):
            print(f'warning: {self.run_dir} was saved reading the stream with {saved_streams[0]} process(es) x '
                  f'{saved_streams[1]} worker(s), now {world} x {config["workers"]}: the rest of epoch '
                  f'{self.start_epoch + 1} reads other samples than the interrupted run would have', file=sys.stderr)
        self.best_top1, self.best_epoch = state.get('best_top1'), state.get('best_epoch')
        if self.info.is_main:
            print(f'resuming {self.run_dir} at epoch {self.start_epoch + 1}, step {self.start_step} (global step '
                  f'{self.global_step})')

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
            return _first_batches(DataLoader(
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
            _check_bad_samples(self.train_set, config['on_bad_image'])
        images, targets = images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
        seed_everything(derived_seed(config['seed'], epoch, step, micro, info.rank))  # dropout, drop-path, Mixup
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        last_micro = micro == config['accum_steps'] - 1
        sync = contextlib.nullcontext() if (last_micro or not info.distributed) else self.train_model.no_sync()
        with sync:
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
        if mid_epoch and (stop_now or budget_spent or self.global_step % self.config['ckpt_interval'] == 0):
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
            _check_bad_samples(train_set, self.config['on_bad_image'])
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
        _check_bad_samples(self.val_set, config['on_bad_image'])
        record = {'type': 'eval', 'epoch': epoch + 1, 'global_step': self.global_step, 'split': self.eval_split,
                  **{k: result[k] for k in ('top1', 'top5', 'loss', 'samples')}}
        score = result['top1']
        if self.ema is not None:
            ema_result = evaluate(self.ema.module, loader, self.device, self.num_classes, config['amp'], self.info)
            record.update(ema_top1=ema_result['top1'], ema_top5=ema_result['top5'])
            if ema_result['top1'] >= result['top1']:
                result, score = ema_result, ema_result['top1']
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
