"""`t2tvit eval`: a checkpoint on a data set, with the model's own evaluation transform."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from ..data import build_dataset
from .config import ConfigError
from .distributed import cleanup, init_distributed
from .metrics import plot_confusion, write_eval_json
from ..cpu_kernels import for_device
from .preflight import check_memory
from .restore import restore_model
from .train import _check_bad_samples, _eval_loader, evaluate, fake_split_size


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
        loader = _eval_loader(eval_set, restored.transform(), batch_size, workers, info)
        result = evaluate(net, loader, info.device, net.num_classes, amp, info, agreement=agreement)
        _check_bad_samples(eval_set, on_bad_image)
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
