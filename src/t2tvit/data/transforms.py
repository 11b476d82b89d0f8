"""Train and eval transforms: timm's `create_transform`, made to work for greyscale as well as RGB images."""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, auto_augment, create_transform
from timm.data.transforms import MaybeToTensor
from torchvision import transforms

from .readers import DataError

__all__ = ['build_transform', 'INTERPOLATIONS', 'ConvertImageMode', 'ToNormalizedTensor',
           'posterize_allowing_zero_bits']

INTERPOLATIONS = ('bilinear', 'bicubic', 'nearest', 'box', 'hamming', 'lanczos', 'random')


class ConvertImageMode:
    """Give the pipeline the image mode it was built for ('L' or 'RGB'), whatever the dataset handed over."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, image):
        if isinstance(image, Image.Image) and image.mode != self.mode:
            image = image.convert(self.mode)
        return image

    def __repr__(self) -> str:
        return f'{type(self).__name__}(mode={self.mode!r})'


class ToNormalizedTensor(transforms.Normalize):
    """timm's `MaybeToTensor` then `Normalize` as one step, with the same float32 numbers.

    An 8-bit 'L' or 'RGB' PIL image becomes a float tensor in one copy and is scaled and normalised in place: the
    same element-wise operations as `to_tensor` then `normalize`, without their per-call checks and temporaries: a
    28 px image took 40 us instead of 68, a 224 px one 212 instead of 349
    (benchmarks/demo-fashion_mnist-loader-ab-2026-12-06.json). Anything else (a tensor, an array, another image
    mode) takes timm's and torchvision's own path.
    """

    def forward(self, pic) -> torch.Tensor:
        if isinstance(pic, Image.Image) and pic.mode in ('L', 'RGB'):
            pixels = torch.from_numpy(np.array(pic))  # a writable copy of the pixels
            if pixels.ndim == 2:
                pixels = pixels.unsqueeze(-1)
            x = pixels.permute(2, 0, 1).to(torch.get_default_dtype(), memory_format=torch.contiguous_format)
            return x.div_(255).sub_(self._stat(self.mean, x)).div_(self._stat(self.std, x))
        return super().forward(MaybeToTensor()(pic))

    @staticmethod
    def _stat(values, x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(values, dtype=x.dtype).view(-1, 1, 1)

    def __repr__(self) -> str:
        return f'{type(self).__name__}(mean={self.mean}, std={self.std})'


def _fuse_to_tensor_normalize(steps: list) -> list:
    """timm's `MaybeToTensor`, `Normalize` pair replaced by `ToNormalizedTensor` (the same numbers, less time)."""
    for i in range(len(steps) - 1):
        first, second = steps[i], steps[i + 1]
        if type(first) is MaybeToTensor and type(second) is transforms.Normalize and not second.inplace:
            return [*steps[:i], ToNormalizedTensor(second.mean, second.std), *steps[i + 2:]]
    return steps


def posterize_allowing_zero_bits(image: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, but keeping 0 bits gives a black image as it used to: Pillow >= 13 raises instead.

    RandAugment 'inc1' asks for 0 bits whenever the sampled magnitude reaches 10 (mstd0.5 around m9 does, about
    once in 650 images), which would otherwise stop training with "bits must be between or equal to 1 and 8".
    """
    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size, 0)  # every bit masked off, as in TF's posterize
    return ImageOps.posterize(image, bits_to_keep)


def _patch_posterize(transform_list) -> None:
    """Point the Posterize ops of timm's auto-augment transforms (in this pipeline only) at the safe version."""
    for t in transform_list:
        ops = list(getattr(t, 'ops', None) or [])
        for sub_policy in getattr(t, 'policy', None) or []:  # AutoAugment: a list of sub-policies
            ops.extend(sub_policy)
        for op in ops:
            if getattr(op, 'aug_fn', None) is auto_augment.posterize:
                op.aug_fn = posterize_allowing_zero_bits


def _channel_stats(values: Sequence[float], in_chans: int, what: str) -> Tuple[float, ...]:
    """Fit a mean/std to the channel count: RGB statistics average to one grey value, a grey one repeats."""
    values = tuple(float(v) for v in values)
    if what == 'std' and not all(v > 0 for v in values):
        raise DataError(f'std={values}; every channel needs a positive std (images are divided by it)')
    if len(values) == in_chans:
        return values
    if in_chans == 1 and len(values) == 3:
        return (sum(values) / 3,)
    if in_chans == 3 and len(values) == 1:
        return values * 3
    raise DataError(f'{what}={values} has {len(values)} values for in_chans={in_chans}; give 1 or 3 values')


def _image_size(input_size: Union[int, Sequence[int]], in_chans: int) -> Union[int, Tuple[int, int]]:
    if isinstance(input_size, int):
        size: Union[int, Tuple[int, int]] = input_size
        sides: Tuple[int, ...] = (input_size,)
    else:
        input_size = tuple(int(v) for v in input_size)
        if len(input_size) == 3:
            if input_size[0] != in_chans:
                raise DataError(f'input_size={input_size} has {input_size[0]} channels but in_chans={in_chans}')
            input_size = input_size[1:]
        if len(input_size) != 2:
            raise DataError(f'input_size={input_size}; give a side, (height, width) or (channels, height, width)')
        size = input_size if input_size[0] != input_size[1] else input_size[0]
        sides = input_size
    if min(sides) < 1:
        raise DataError(f'input_size={input_size}; sides must be positive')
    return size


def build_transform(
        is_training: bool,
        input_size: Union[int, Tuple[int, ...]],
        *,
        in_chans: int = 3,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        interpolation: str = 'bicubic',
        crop_pct: float = 0.9,
        scale: Tuple[float, float] = (0.08, 1.0),
        ratio: Tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        color_jitter: Optional[float] = 0.4,
        auto_augment: Optional[str] = None,
        re_prob: float = 0.0,
        re_mode: str = 'pixel',
        re_count: int = 1,
) -> Callable:
    """PIL image -> normalised float tensor (in_chans, H, W), built by `timm.data.create_transform`.

    Training: random resized crop, flip, colour jitter or `auto_augment` (e.g. 'rand-m9-mstd0.5-inc1'), random
    erasing. Eval: resize the shorter side to int(size / crop_pct), centre-crop `size`. For in_chans == 1 the
    mean/std shrink to one value, which is also the fill colour RandAugment uses, so its geometric ops work on
    'L' images (timm would otherwise pass an RGB fill colour to PIL for a greyscale image, which PIL rejects).
    Posterize ops get `posterize_allowing_zero_bits`, so RandAugment survives Pillow >= 13.
    """
    if in_chans not in (1, 3):
        raise DataError(f'in_chans={in_chans}; images are read as greyscale (1) or RGB (3), so use 1 or 3')
    if interpolation not in INTERPOLATIONS:
        raise DataError(f'interpolation={interpolation!r}; choose one of {", ".join(INTERPOLATIONS)}')
    if not 0 < crop_pct <= 1:
        raise DataError(f'crop_pct={crop_pct}; it must be in (0, 1] (the crop is size, the resize size / crop_pct)')
    size = _image_size(input_size, in_chans)
    mean = _channel_stats(mean, in_chans, 'mean')
    std = _channel_stats(std, in_chans, 'std')
    if not is_training and interpolation == 'random':
        interpolation = 'bicubic'  # eval must be deterministic

    timm_transform = create_transform(
        input_size=size,
        is_training=is_training,
        scale=tuple(scale),
        ratio=tuple(ratio),
        hflip=hflip,
        color_jitter=color_jitter,
        auto_augment=auto_augment or None,
        interpolation=interpolation,
        mean=mean,
        std=std,
        re_prob=re_prob,
        re_mode=re_mode,
        re_count=re_count,
        crop_pct=crop_pct,
    )
    _patch_posterize(timm_transform.transforms)
    steps = _fuse_to_tensor_normalize(list(timm_transform.transforms))
    return transforms.Compose([ConvertImageMode('L' if in_chans == 1 else 'RGB'), *steps])
