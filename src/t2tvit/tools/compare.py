"""`t2tvit visualize IMAGE --compare NAME[=CHECKPOINT],...`: the paper's Figure 2 for any timm models.

Each model sees the same image (resized to its own input size, normalised its own way); forward hooks take its
feature maps at every layer of its main path: the blocks of a transformer (patch tokens laid out on their grid,
class and other prefix tokens dropped, after its tokenizer: the T2T module's two token layers or the patch
embedding) or the `feature_info` stages of a CNN. The figure shows, per model, the
layers at the same relative depths (first, middle, last by default) side by side as channel grids.

For every layer it also counts the "invalid" channels the paper points at in ViT's maps, by this definition
(thresholds stored in the JSON):
- zero: max |activation| over the image below `ZERO_ABS` (1e-6);
- near-constant: not zero, and the spatial standard deviation below `CONSTANT_REL` (1%) of the median spatial
  standard deviation of that layer's channels that are not zero.
"""
from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..data import DataError
from ..data.images import UNREADABLE_IMAGE_ERRORS, load_image
from ..engine.config import ConfigError

__all__ = ['CompareModel', 'parse_compare', 'load_compare_model', 'feature_maps', 'invalid_channels', 'compare',
           'invalid_table',
           'ZERO_ABS', 'CONSTANT_REL', 'DEFAULT_DEPTHS']

ZERO_ABS = 1e-6
CONSTANT_REL = 0.01
DEFAULT_DEPTHS = (0.0, 0.5, 1.0)
DEFINITION = (f'a channel is invalid when it is zero (max |activation| over the image < {ZERO_ABS:g}) or '
              f'near-constant (spatial std < {CONSTANT_REL:.0%} of the median spatial std of the layer\'s non-zero '
              f'channels)')


@dataclass
class CompareModel:
    label: str  # as given: NAME or NAME=CHECKPOINT
    model: nn.Module
    name: str
    checkpoint: Optional[str]
    img_size: int
    in_chans: int
    mean: Sequence[float]
    std: Sequence[float]
    weights: str  # 'checkpoint', 'pretrained' or 'random'


def parse_compare(text: str) -> List[Tuple[str, Optional[str]]]:
    """'resnet18,t2t_vit_14=runs/x/last.pth' -> [('resnet18', None), ('t2t_vit_14', 'runs/x/last.pth')]."""
    items = []
    for item in (part.strip() for part in text.split(',')):
        if not item:
            continue
        name, sep, checkpoint = item.partition('=')
        if not name.strip() or (sep and not checkpoint.strip()):
            raise ConfigError(f'--compare {item!r}: give NAME or NAME=CHECKPOINT (a file or a run folder with '
                              f'last.pth), comma-separated')
        items.append((name.strip(), checkpoint.strip() or None))
    if len(items) < 2:
        raise ConfigError(f'--compare {text!r}: give two or more models to compare, e.g. resnet18,t2t_vit_14')
    return items


def _checkpoint_file(path: str) -> Path:
    file = Path(path)
    if file.is_dir():  # a run folder of `t2tvit train` or `t2tvit ablate`
        file = file / 'last.pth'
    if not file.is_file():
        raise ConfigError(f'--compare: {path} is neither a checkpoint file nor a run folder holding last.pth')
    return file


def load_compare_model(name: str, checkpoint: Optional[str]) -> CompareModel:
    """A t2tvit checkpoint (its config rebuilds the model), a pretrained tag, or a timm name at random init."""
    import timm

    import t2tvit  # noqa: F401  (registers the T2T-ViT models)
    from ..engine.build import build_model
    from ..models import read_checkpoint
    label = name if checkpoint is None else f'{name}={checkpoint}'
    if checkpoint is not None:
        state = read_checkpoint(_checkpoint_file(checkpoint))
        if not isinstance(state, dict) or 'config' not in state or 'state_dict' not in state:
            raise ConfigError(f'--compare: {checkpoint} is not a t2tvit training checkpoint (no config inside)')
        config = state['config']
        if name.split('.')[0] != config['model'].split('.')[0]:
            raise ConfigError(f"--compare {label}: the checkpoint holds {config['model']}, not {name}; give "
                              f"{config['model']}={checkpoint}")
        model = build_model(config, state['num_classes'])
        model.load_state_dict(state['state_dict'])
        return CompareModel(label, model.eval(), name, checkpoint, config['img_size'], config['in_chans'],
                            config['mean'] or [0.5] * config['in_chans'], config['std'] or [0.5] * config['in_chans'],
                            'checkpoint')
    if not timm.is_model(name.split('.')[0]):
        raise ConfigError(f'--compare: unknown model {name!r}; give a timm model name or pretrained tag '
                          f'(timm.list_models() lists them), or NAME=CHECKPOINT')
    pretrained = '.' in name
    try:
        model = timm.create_model(name, pretrained=pretrained)
    except (RuntimeError, OSError, ValueError) as e:
        raise ConfigError(f'--compare: cannot load {name}: {e}') from e
    cfg = model.pretrained_cfg or {}
    size = cfg.get('input_size', (3, 224, 224))
    return CompareModel(label, model.eval(), name, None, size[-1], size[0], cfg.get('mean', (0.5,) * size[0]),
                        cfg.get('std', (0.5,) * size[0]), 'pretrained' if pretrained else 'random')


def _layers(model: nn.Module) -> List[Tuple[str, nn.Module, int]]:
    """The main path's layers as (name, module, prefix tokens to drop): a transformer's tokenizer (the T2T module's
    two token layers, or a patch embedding) and its blocks, else a CNN's feature_info stages."""
    blocks = getattr(model, 'blocks', None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks):
        prefix = getattr(model, 'num_prefix_tokens', 1 if hasattr(model, 'cls_token') else 0)
        t2t = getattr(model, 'tokens_to_token', None)
        early = [(f'tokens_to_token.{n}', getattr(t2t, n), 0) for n in ('attention1', 'attention2')
                 if t2t is not None and hasattr(t2t, n)]
        for name in ('tokens_to_token', 'patch_embed'):  # else the tokenizer itself: patches or convolutions
            if not early and isinstance(getattr(model, name, None), nn.Module):
                early = [(name, getattr(model, name), 0)]
        return early + [(f'blocks.{i}', b, prefix) for i, b in enumerate(blocks)]
    info = getattr(model, 'feature_info', None)
    if info:
        names = [f['module'] for f in info if f.get('module')]
        return [(n, model.get_submodule(n), 0) for n in names]
    raise ConfigError(f'--compare: {type(model).__name__} has neither transformer blocks nor timm feature_info '
                      f'stages to take feature maps from; choose a timm ViT or CNN')


def _as_map(output: Any, prefix: int) -> Optional[torch.Tensor]:
    """(C, h, w) of one image from a layer output: a conv map, or patch tokens on their square grid."""
    x = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(x, torch.Tensor):
        return None
    if x.dim() == 4:
        return x[0].detach().float()
    if x.dim() == 3:
        tokens = x[0, prefix:]
        side = int(round(tokens.shape[0] ** 0.5))
        if side * side != tokens.shape[0]:
            return None
        return tokens.detach().float().T.reshape(-1, side, side)
    return None


def feature_maps(m: CompareModel, image) -> List[Tuple[str, torch.Tensor]]:
    """Every layer's (C, h, w) map of `image` (a PIL image) through model `m`."""
    from torchvision.transforms import functional as TF
    picture = image.convert('L' if m.in_chans == 1 else 'RGB').resize((m.img_size, m.img_size), 3)
    x = TF.normalize(TF.to_tensor(picture), list(m.mean), list(m.std)).unsqueeze(0)
    captured: Dict[str, torch.Tensor] = {}
    layers = _layers(m.model)
    handles = [module.register_forward_hook(
        lambda _m, _i, out, n=name, p=prefix: captured.__setitem__(n, _as_map(out, p)))
        for name, module, prefix in layers]
    try:
        with torch.no_grad():
            m.model(x)
    finally:
        for handle in handles:
            handle.remove()
    return [(name, captured[name]) for name, _, _ in layers if captured.get(name) is not None]


def invalid_channels(fmap: torch.Tensor) -> Dict[str, Any]:
    """Counts of zero and near-constant channels of a (C, h, w) map (see the module's definition)."""
    flat = fmap.flatten(1)
    zero = flat.abs().amax(dim=1) < ZERO_ABS
    spread = flat.std(dim=1, unbiased=False) if flat.shape[1] > 1 else torch.zeros(flat.shape[0])
    live = spread[~zero]
    median = float(live.median()) if live.numel() else 0.0  # of the channels that are not zero
    constant = (~zero) & (spread < CONSTANT_REL * median)
    channels = int(flat.shape[0])
    return dict(channels=channels, zero=int(zero.sum()), near_constant=int(constant.sum()),
                invalid_share=float((zero | constant).sum()) / channels, median_spatial_std=median)


def invalid_table(record: Dict[str, Any]) -> str:
    """Markdown: per model and shown layer, its map shape and the zero / near-constant / invalid channels."""
    lines = ['| model | weights | layer | depth | channels x h x w | zero | near-constant | invalid |',
             '|---|---|---|---:|---|---:|---:|---:|']
    for m in record['models']:
        for layer in (x for x in m['layers'] if x['shown']):
            lines.append(f"| `{m['model']}` | {m['weights']} | {layer['layer']} | {layer['depth']:.0%} "
                         f"| {' x '.join(map(str, layer['shape']))} | {layer['zero']} | {layer['near_constant']} "
                         f"| {layer['invalid_share']:.1%} |")
    return '\n'.join(lines)


def _mosaic(fmap: torch.Tensor, channels: int) -> np.ndarray:
    c = min(channels, fmap.shape[0])
    maps = fmap[:c].flatten(1)
    low, high = maps.min(dim=1, keepdim=True).values, maps.max(dim=1, keepdim=True).values
    maps = ((maps - low) / (high - low).clamp_min(1e-12)).reshape(c, *fmap.shape[1:]).numpy()
    cols = int(np.ceil(np.sqrt(c)))
    rows = int(np.ceil(c / cols))
    h, w = maps.shape[1:]
    out = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1), np.nan)
    for i in range(c):
        r, q = divmod(i, cols)
        out[r * (h + 1):r * (h + 1) + h, q * (w + 1):q * (w + 1) + w] = maps[i]
    return out


def _pick(count: int, depths: Sequence[float]) -> List[int]:
    return list(dict.fromkeys(int(round(d * (count - 1))) for d in depths))


def _plot(rows: List[Dict[str, Any]], maps: List[List[Tuple[str, torch.Tensor]]], depths: Sequence[float],
          channels: int, path: Path) -> Path:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    cols = max(len(_pick(len(m), depths)) for m in maps)
    fig, axes = plt.subplots(len(rows), cols, figsize=(3.0 * cols, 3.2 * len(rows)), squeeze=False)
    for r, (row, layer_maps) in enumerate(zip(rows, maps)):
        shown = [layer for layer in row['layers'] if layer['shown']]
        for c in range(cols):
            ax = axes[r][c]
            ax.axis('off')
            if c < len(shown):
                layer = shown[c]
                ax.imshow(_mosaic(dict(layer_maps)[layer['layer']], channels), cmap='viridis')
                ax.set_title(f"{row['label'].split('=')[0]}\n{layer['layer']} ({layer['depth']:.0%} deep), "
                             f"{layer['invalid_share']:.0%} invalid", fontsize=8)
    fig.suptitle(f'Feature maps at comparable depths (first {channels} channels each); {DEFINITION}', fontsize=8,
                 wrap=True)
    fig.tight_layout()
    temporary = path.with_name(f'.{path.stem}.tmp.png')
    fig.savefig(temporary, dpi=100)
    plt.close(fig)
    temporary.replace(path)
    return path


def compare(image_path: str, items: Sequence[Tuple[str, Optional[str]]], output: str,
            depths: Sequence[float] = DEFAULT_DEPTHS, channels: int = 16,
            command: Optional[str] = None) -> Tuple[Dict[str, Any], List[Path]]:
    """Feature maps of every model at comparable depths: STEM_compare.png, and STEM_compare.json with the share
    of invalid channels of every layer (shown or not) and the thresholds."""
    try:
        image = load_image(image_path)
    except UNREADABLE_IMAGE_ERRORS as e:
        raise DataError(f'{image_path}: not a readable image ({e})') from e
    models = [load_compare_model(name, checkpoint) for name, checkpoint in items]
    rows, all_maps = [], []
    for m in models:
        maps = feature_maps(m, image)
        shown = set(_pick(len(maps), depths))
        layers = [dict(layer=name, depth=i / max(1, len(maps) - 1), shape=list(f.shape), shown=i in shown,
                       **invalid_channels(f)) for i, (name, f) in enumerate(maps)]
        rows.append(dict(label=m.label, model=m.name, checkpoint=m.checkpoint, weights=m.weights,
                         input=[m.in_chans, m.img_size, m.img_size], layers=layers))
        all_maps.append(maps)
    from .ablate_report import host_name
    record = dict(image=str(image_path), thresholds=dict(zero_abs=ZERO_ABS, constant_rel_std=CONSTANT_REL,
                                                         definition=DEFINITION),
                  depths=list(depths), channels_shown=channels, models=rows, host=host_name(), command=command,
                  date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d'))
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(image_path).stem
    json_path = out / f'{stem}_compare.json'
    temporary = json_path.with_name(f'.{json_path.name}.tmp')
    temporary.write_text(json.dumps(record, indent=1))
    temporary.replace(json_path)
    return record, [_plot(rows, all_maps, depths, channels, out / f'{stem}_compare.png'), json_path]
