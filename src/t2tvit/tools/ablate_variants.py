"""The variants `t2tvit ablate` compares and the data sets it knows, as plain data (no torch import), so that
`t2tvit ablate --help` can list them at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Tuple

from ..options import Option, OptionError, parse_yaml

__all__ = ['AblationVariant', 'ABLATION_VARIANTS', 'DEFAULT_VARIANTS', 'DEFAULT_STEPS', 'DEFAULT_SEEDS',
           'BASELINE', 'SIZE_SWEEP_VARIANTS', 'WARMUP_FRACTION', 'DATASET_DEFAULTS', 'SMALL_BASE',
           'SMALL_IMAGE_SOFT_SPLITS', 'NamedMappingOption']

# t2tvit.models.t2t_vit.SMALL_IMAGE_SOFT_SPLITS (a test keeps the two equal): (kernel, stride, padding) per split
SMALL_IMAGE_SOFT_SPLITS = ((7, 2, 3), (3, 2, 1), (3, 2, 1))

# The T2T-ViT-14 baseline at the common small scale: the shape of t2t_vit_mini (MLP ratio 2, as the paper's own
# small models T2T-ViT-7/10/12 use).
SMALL_BASE: Dict[str, Any] = dict(
    soft_splits=SMALL_IMAGE_SOFT_SPLITS, token_dim=32, embed_dim=128, depth=4, num_heads=4, mlp_ratio=2.)
_BACKBONE = {k: SMALL_BASE[k] for k in ('embed_dim', 'depth', 'num_heads', 'mlp_ratio')}


@dataclass(frozen=True)
class AblationVariant:
    idea: str
    small_kwargs: Dict[str, Any]  # builder kwargs at the common small scale
    note: str  # how the small build keeps the idea


ABLATION_VARIANTS: Dict[str, AblationVariant] = {
    't2t_vit_14': AblationVariant(
        'deep-narrow baseline (T2T, Performer tokens)', dict(SMALL_BASE), '128 wide, 4 blocks, 4 heads'),
    't2t_vit_14_wide': AblationVariant(
        'shallow-wide', dict(SMALL_BASE, embed_dim=256, depth=1, num_heads=8),
        'twice as wide, a quarter of the depth (paper: 768 x 4 vs 384 x 14), about the same block parameters'),
    't2t_vit_dense': AblationVariant(
        'dense connections',
        dict(soft_splits=SMALL_IMAGE_SOFT_SPLITS, token_dim=32, embed_dim=64, growth_rate=32, block_config=(3, 3),
             num_heads=4, mlp_ratio=2.),
        'two stages of 3 dense blocks (widths 64 -> 160, transition to 80, -> 176), about the baseline\'s '
        'parameters (paper: 19 blocks, 128 -> 584)'),
    't2t_vit_14_se': AblationVariant('SE channel attention', dict(SMALL_BASE), 'SE after each attention'),
    't2t_vit_14_resnext': AblationVariant(
        'more, thinner heads (ResNeXt)', dict(SMALL_BASE, num_heads=16),
        '16 heads of 8 channels instead of 4 of 32 (paper: 32 heads of 12)'),
    't2t_vit_16_ghost': AblationVariant(
        'Ghost cheap operations', dict(SMALL_BASE),
        'half of q/k/v and of the MLP hidden layer from cheap ops (paper: two thirds, at MLP ratio 3); same depth'),
    't2t_vit_p_14': AblationVariant(
        'patch tokenizer (no T2T)', dict(_BACKBONE, patch_size=7),
        '7x7 patches: the same 4x4 grid at 28 px as the soft splits'),
    't2t_vit_c_14': AblationVariant(
        'convolution tokenizer', dict(SMALL_BASE), 'three convolutions with the small soft splits'),
    't2t_vit_t_14': AblationVariant(
        'T2T with transformer tokens', dict(SMALL_BASE), 'token transformer instead of Performer'),
}

# Every idea the paper's design study compares (t2t_vit_t_14 is available but not run by default).
DEFAULT_VARIANTS: Tuple[str, ...] = (
    't2t_vit_14', 't2t_vit_14_wide', 't2t_vit_dense', 't2t_vit_14_se', 't2t_vit_14_resnext', 't2t_vit_16_ghost',
    't2t_vit_p_14', 't2t_vit_c_14')
# The budget of every run, in optimizer steps (64 images each with the fashion_mnist recipe): 8 variants x 3 seeds
# of it took 24.6 minutes on a 2-core Intel Xeon on 2026-12-06 (docs/ablation.md), with every run annealed.
DEFAULT_STEPS = 400
DEFAULT_SEEDS = (0, 1, 2)
BASELINE = 't2t_vit_14'
# The tokenizers at equal depth that the data-size sweep compares: T2T (Performer), plain patches, convolutions.
SIZE_SWEEP_VARIANTS = ('t2t_vit_14', 't2t_vit_p_14', 't2t_vit_c_14')
# Linear warm-up over this share of the budget, then cosine decay over the rest of the steps (not epochs): every
# training-set size gets the same schedule, annealed at its last step, so the final weights are not a noisy snapshot.
WARMUP_FRACTION = 0.1

_IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
# Per data set: image size, channels, normalisation, classes (None: the data set's count), default folder.
DATASET_DEFAULTS: Dict[str, Dict[str, Any]] = {
    'fashion_mnist': dict(img_size=28, in_chans=1, mean=(0.2860,), std=(0.3530,), num_classes=10,
                          data='data/fashion-mnist'),
    'mnist': dict(img_size=28, in_chans=1, mean=(0.1307,), std=(0.3081,), num_classes=10, data=None),
    'cifar10': dict(img_size=32, in_chans=3, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
                    num_classes=10, data=None),
    'cifar100': dict(img_size=32, in_chans=3, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
                     num_classes=100, data=None),
    'imagefolder': dict(img_size=32, in_chans=3, num_classes=None, data=None, **_IMAGENET),
    'fake': dict(img_size=28, in_chans=1, mean=(0.5,), std=(0.5,), num_classes=10, data=None),
}


@dataclass(frozen=True)
class NamedMappingOption(Option):
    """NAME=YAML mapping, repeatable: `--model-kwargs deit_tiny_patch16_224="{patch_size: 4}"` gives the builder
    arguments of one variant. Read as text (kind 'str') and checked here."""

    def check(self, value: Any) -> Any:
        if isinstance(value, tuple):  # already read
            return value
        name, sep, text = value.partition('=') if isinstance(value, str) else ('', '', '')
        why = 'give NAME="{key: value, ...}", e.g. deit_tiny_patch16_224="{patch_size: 4}"'
        if not sep or not name.strip() or not text.strip():
            raise self.fail(value, why)
        try:
            mapping = parse_yaml(text)
        except OptionError as e:
            raise self.fail(value, f'{e}; {why}') from None
        if not isinstance(mapping, dict) or not all(isinstance(k, str) for k in mapping):
            raise self.fail(value, why)
        return name.strip(), mapping

    def add_to(self, parser: Any, default: Any = None) -> None:
        parser.add_argument(self.flag, dest=self.name, type=self.argparse_type(), action='append',
                            default=self.default if default is None else default, help=self.help_text(),
                            metavar=self.metavar or 'NAME=YAML')
