"""How fast one data-loader worker feeds training, per storage format, beside the models' training images/s.

`t2tvit benchmark --data-loading` writes synthetic JPEG photos (ImageNet-like sizes) as an image folder, converts
them to WebDataset shards and a Hugging Face dataset (the same bytes, not re-encoded), then times one process with
one thread (what each DataLoader worker is) reading, decoding and augmenting them with the ImageNet recipe's
training transform at 224 px. Divide a GPU's training images/s by a worker's images/s for the workers it needs.
"""
from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
from PIL import Image

__all__ = ['loading_benchmark', 'format_loading_table', 'LoadingResult', 'LOADING_FORMATS']

LOADING_FORMATS = ('imagefolder', 'wds', 'hfds')


@dataclass
class LoadingResult:
    images: int
    jpeg_kib: float  # mean file size
    source_size: tuple
    transform: str
    per_worker: Dict[str, float]  # format -> images/s of one worker
    train_rates: Dict[str, float] = field(default_factory=dict)  # model -> training images/s
    train_device: str = ''
    train_measured: bool = False

    def workers_needed(self, model: str, fmt: str) -> int:
        return max(1, math.ceil(self.train_rates[model] / self.per_worker[fmt]))


def _write_photos(folder: Path, count: int, size: tuple, classes: int = 4, seed: int = 0) -> float:
    """Smooth random pictures saved as quality-90 JPEGs (compressed about as well as photos); mean KiB."""
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(count):
        low = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        image = Image.fromarray(low).resize(size, Image.BICUBIC)
        grain = rng.normal(0, 6, (size[1], size[0], 3))
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) + grain, 0, 255).astype(np.uint8))
        path = folder / 'train' / f'class_{i % classes}' / f'{i:05d}.jpg'
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=90)
        total += path.stat().st_size
    for c in range(classes):  # convert-data also writes the val split
        (folder / 'val' / f'class_{c}').mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / 'val' / f'class_{c}' / 'v.jpg')
    return total / count / 1024


def _imagenet_train_transform(img_size: int):
    from ..data import build_transform
    from ..engine.config import resolve_config
    c = resolve_config('imagenet')
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the models' pretrained_cfg
    transform = build_transform(
        True, img_size, in_chans=3, mean=mean, std=std, interpolation=c['interpolation'], crop_pct=c['crop_pct'],
        scale=tuple(c['scale']), ratio=tuple(c['ratio']), hflip=c['hflip'], color_jitter=c['color_jitter'],
        auto_augment=c['aa'], re_prob=c['reprob'], re_mode=c['remode'], re_count=c['recount'])
    described = (f"ImageNet recipe train transform at {img_size} px: random resized crop, flip, {c['aa']}, "
                 f"random erasing {c['reprob']}")
    return transform, described


def _rate(samples: Callable[[], object], count: int) -> float:
    iterator = iter(samples())
    for _ in range(min(8, count)):  # warm up: open files, fill buffers
        next(iterator)
    start = time.perf_counter()
    n = 0
    for _ in iterator:
        n += 1
    return n / (time.perf_counter() - start)


def _train_rate(model_name: str, device: torch.device, batch_size: int, steps: int, img_size: int) -> float:
    import timm
    model = timm.create_model(model_name, num_classes=1000, img_size=img_size).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch_size, 3, img_size, img_size, device=device)
    targets = torch.randint(0, 1000, (batch_size,), device=device)
    dtype = torch.bfloat16 if device.type == 'cuda' else None

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(images), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return batch_size * steps / (time.perf_counter() - start)


def loading_benchmark(images: int = 256, img_size: int = 224, source_size: tuple = (500, 375),
                      models: Sequence[str] = ('t2t_vit_7', 't2t_vit_14'),
                      train_rates: Optional[Dict[str, float]] = None, device: str = 'cpu',
                      train_batch: Optional[int] = None, train_steps: int = 3,
                      log: Callable[[str], None] = print) -> LoadingResult:
    """Images/s of one worker per format, and the models' training images/s (given, or timed on `device`)."""
    from ..data import build_dataset
    from ..data.convert import convert_data
    from ..engine.sampling import SeededTransform, StreamTransform

    transform, described = _imagenet_train_transform(img_size)
    threads = torch.get_num_threads()
    per_worker: Dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix='t2tvit-loading-') as tmp:
        root = Path(tmp)
        jpeg_kib = _write_photos(root / 'folder', images, source_size)
        stores = {'imagefolder': root / 'folder'}
        for fmt in ('wds', 'hfds'):
            stores[fmt] = convert_data('imagefolder', root / 'folder', fmt, root / fmt, shard_size=max(1, images // 4),
                                       progress=False).output
        torch.set_num_threads(1)  # as in a DataLoader worker
        try:
            for fmt in LOADING_FORMATS:
                dataset = build_dataset(fmt, str(stores[fmt]), 'train')
                if fmt == 'wds':
                    stream = dataset.stream(StreamTransform(transform, 0, 0, 0, 0, 1), training=True, batch_size=1,
                                            workers=0)
                    per_worker[fmt] = _rate(lambda: stream, images)
                else:
                    seeded = SeededTransform(dataset, transform, 0)
                    per_worker[fmt] = _rate(lambda: (seeded[i] for i in range(len(seeded))), images)
                log(f'{fmt:<12} {per_worker[fmt]:8.1f} images/s per worker')
        finally:
            torch.set_num_threads(threads)

    result = LoadingResult(images=images, jpeg_kib=jpeg_kib, source_size=tuple(source_size), transform=described,
                           per_worker=per_worker, train_device=device)
    if train_rates:
        result.train_rates = dict(train_rates)
        result.train_device = 'given'
    else:
        result.train_measured = True
        dev = torch.device(device)
        for name in models:
            batch = train_batch or (128 if dev.type == 'cuda' else 8)
            result.train_rates[name] = _train_rate(name, dev, batch, train_steps, img_size)
            log(f'{name:<12} {result.train_rates[name]:8.1f} training images/s on {device}')
    return result


def format_loading_table(result: LoadingResult) -> str:
    lines = [f'Data loading: one worker (1 thread), {result.images} synthetic JPEGs of '
             f'{result.source_size[0]}x{result.source_size[1]} px ({result.jpeg_kib:.0f} KiB on average), '
             f'{result.transform}', '',
             '| format | images/s per worker |', '|---|---:|']
    lines += [f'| {fmt} | {rate:.1f} |' for fmt, rate in result.per_worker.items()]
    if result.train_rates:
        how = f'timed on {result.train_device}' + (' (bf16 autocast)' if result.train_device.startswith('cuda')
                                                   else ' (fp32)') if result.train_measured else 'as given'
        lines += ['', f'Workers one device needs (training images/s {how} / one worker\'s images/s, rounded up):', '',
                  '| model | training images/s | ' + ' | '.join(f'workers: {f}' for f in result.per_worker) + ' |',
                  '|---|---:|' + '---:|' * len(result.per_worker)]
        for name, rate in result.train_rates.items():
            lines.append(f'| {name} | {rate:.1f} | '
                         + ' | '.join(str(result.workers_needed(name, f)) for f in result.per_worker) + ' |')
    return '\n'.join(lines)


def parse_rates(text: str) -> Dict[str, float]:
    """'t2t_vit_7=3000,t2t_vit_14=1200' -> {'t2t_vit_7': 3000.0, 't2t_vit_14': 1200.0}."""
    rates: Dict[str, float] = {}
    for item in (t.strip() for t in text.split(',') if t.strip()):
        name, sep, value = item.partition('=')
        try:
            rates[name.strip()] = float(value)
        except ValueError:
            sep = ''
        if not sep or rates.get(name.strip(), 0) <= 0:
            raise ValueError(f'{item!r} is not MODEL=IMAGES_PER_S with a positive number, e.g. t2t_vit_14=1200')
    return rates
