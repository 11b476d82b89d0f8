"""Evaluation: `evaluate` (a model on a loader, across processes) for the training loop, and `t2tvit eval`
(`evaluate_checkpoint`: a checkpoint on a data set, with the model's own evaluation transform)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..cpu_kernels import for_device
from ..data import build_dataset
from ..data.streaming import check_bad_samples
from ..options import check_agreement
from .build import autocast_for, fake_split_size
from .config import ConfigError
from .distributed import DistInfo, all_reduce_max, all_reduce_sum, cleanup, init_distributed
from .metrics import plot_confusion, write_eval_json
from .preflight import NonFiniteOutputError, check_memory
from .restore import restore_model
from .sampling import SeededTransform

__all__ = ['evaluate', 'eval_loader', 'evaluate_checkpoint']


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, num_classes: int, amp: str = 'none',
             info: Optional[DistInfo] = None, agreement: bool = False) -> Dict[str, Any]:
    """Top-1/top-5, mean loss, per-class accuracy and the confusion matrix; across processes each sample counts
    once (every process sees a disjoint share, with no padding).

    `agreement` (with `amp`): also run every batch in fp32 and report how often the two agree on the top-1 class,
    the fp32 top-1, and how far the logits move (`result['agreement']`).
    """
    check_agreement(agreement, amp)
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


def eval_loader(dataset: Dataset, transform, batch_size: int, workers: int, info: DistInfo):
    """This process's share of `dataset` in order, each sample once across processes, for `evaluate`."""
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


def evaluate_checkpoint(
        checkpoint: Optional[str],
        data: Optional[str],
        model: Optional[str] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        dataset: Optional[str] = None,
        split: str = 'val',
        img_size: Optional[int] = None,
        in_chans: Optional[int] = None,
        crop_pct: Optional[float] = None,
        interpolation: Optional[str] = None,
        batch_size: int = 64,
        workers: int = 4,
        amp: str = 'none',
        device: str = 'auto',
        output: Optional[str] = None,
        on_bad_image: str = 'fail',
        agreement: bool = False,
        pretrained: bool = False,
) -> Dict[str, Any]:
    """Top-1/top-5, loss, per-class accuracy; writes eval.json and confusion_matrix.png into `output`.

    `agreement` (with `amp`): also compare every batch with fp32 (see `evaluate`). `pretrained` (no checkpoint):
    the released weights of `model`, a pretrained tag such as 't2t_vit_14.in1k'.
    Options left as None come from the checkpoint (t2tvit checkpoints store their config, official and timm ones
    their `args`), then from the model's pretrained_cfg: for the ImageNet models that is resize to 248 bicubic,
    centre crop 224. `result['sources']` says which setting came from where.
    """
    info = init_distributed(device)
    try:
        restored = restore_model(checkpoint, model, model_kwargs, img_size, in_chans, crop_pct, interpolation,
                                 pretrained=pretrained)
        net, config, facts, model_name = restored.model, restored.preprocess, restored.facts, restored.name
        check_memory(config['img_size'], net.in_chans, batch_size, info.device.type)
        dataset_name = dataset or facts.get('dataset') or 'imagefolder'
        eval_set = build_dataset(
            dataset_name, data or facts.get('data'), split, transform=None, in_chans=net.in_chans,
            on_bad_image=on_bad_image, fake_num_samples=fake_split_size(facts.get('fake_num_samples', 256), split),
            fake_num_classes=net.num_classes, fake_image_size=config['img_size'], seed=facts.get('seed', 0))
        classes = facts.get('classes') or list(eval_set.classes)
        if len(classes) != net.num_classes:
            classes = [str(i) for i in range(net.num_classes)]
        if eval_set.num_classes > net.num_classes:
            raise ConfigError(f'{data} has {eval_set.num_classes} classes but the checkpoint predicts '
                              f'{net.num_classes}; evaluate it on the data set it was trained for')
        for_device(net.to(info.device), info.device)  # CPU kernels on CPU
        loader = eval_loader(eval_set, restored.transform(), batch_size, workers, info)
        result = evaluate(net, loader, info.device, net.num_classes, amp, info, agreement=agreement)
        check_bad_samples(eval_set, on_bad_image)
        result['model'] = model_name
        result['dataset'], result['data'] = dataset_name, data or facts.get('data')
        result['checkpoint'] = str(restored.checkpoint)
        result['sources'] = restored.describe_sources()
        result['classes'] = classes
        result['transform'] = {k: config[k] for k in ('img_size', 'crop_pct', 'interpolation')}
        if output and info.is_main:
            out = Path(output)
            out.mkdir(parents=True, exist_ok=True)
            write_eval_json(out / 'eval.json', result, classes)
            plot_confusion(result['confusion'], classes, out / 'confusion_matrix.png',
                           title=f"{model_name}: top-1 {result['top1']:.2f}% on {result['samples']} images")
            result['files'] = [str(out / 'eval.json'), str(out / 'confusion_matrix.png')]
        return result
    finally:
        cleanup(info)
