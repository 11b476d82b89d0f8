"""`t2tvit visualize`: what a T2T-ViT sees, as in the paper's Figure 2, and where it attends.

Feature maps: the T2T module's two re-structurized maps (strides 4 and 8) and chosen blocks' tokens (stride 16),
each shown as a grid of per-channel maps, the layout the paper uses to compare T2T-ViT with ViT and ResNet.

Attention: timm's `Attention` runs fused SDPA and never forms the attention matrix, so forward hooks on the blocks'
`attn` modules recompute softmax(q k^T * scale) from the module's own qkv on its (already normed) input; each hook
also rebuilds the module's output from that matrix and records how far it is from the real one, so a mismatch
(another timm version, an unexpected layer) shows instead of passing silently. Nothing in timm is patched. The
T2T layers get the same treatment: exact softmax attention for the token transformer, and for the Performer the
attention its random-feature kernel implies, phi(q_i).phi(k_j) / sum_j phi(q_i).phi(k_j).
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from ..data import DataError
from ..data.images import UNREADABLE_IMAGE_ERRORS, load_image
from ..engine.checkpointing import atomic_write
from ..outputs import unique_stems
from ..engine.restore import RestoredModel
from ..models import TokenPerformer, TokenTransformer, attention_weights, performer_features

__all__ = [
    'AttentionRecorder', 't2t_attention', 'attention_rollout', 'Explanation', 'explain', 'default_images',
    'visualize', 'DEFAULT_QUERIES', 'SKIMAGE_PHOTOS',
]

SKIMAGE_PHOTOS = ('astronaut', 'chelsea', 'coffee')
# query tokens for the T2T attention pictures, as (row, column) fractions of the token grid
DEFAULT_QUERIES = ((0.5, 0.5), (0.25, 0.25), (0.25, 0.75), (0.75, 0.5))


# --- attention from hooks -----------------------------------------------------------------------------------------

def _block_attention(attn: nn.Module, x: torch.Tensor, *_) -> Tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale) of a block's attention on its input, and the module output rebuilt from it.

    The SE and Ghost attention layers expose `qkv_heads` / `merge_heads`; timm's `Attention` is read through its
    `qkv`, `q_norm` / `k_norm`, `norm`, `gate` and `proj`.
    """
    B, N, _ = x.shape
    if hasattr(attn, 'qkv_heads'):
        q, k, v = attn.qkv_heads(x)
    else:
        qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, h, N, d)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
    weights = attention_weights(q, k, attn.scale)  # (B, h, N, N)
    if hasattr(attn, 'merge_heads'):
        return weights, attn.merge_heads(weights @ v)
    out = attn.norm((weights @ v).transpose(1, 2).reshape(B, N, -1))
    if getattr(attn, 'gate', None) is not None:
        out = out * attn.gate(x).sigmoid()
    return weights, attn.proj(out)


def t2t_attention(layer: nn.Module, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention of a T2T layer over its T tokens, (B, T, T), and the layer output rebuilt from it.

    Token transformer: the exact single-head softmax attention. Performer: the attention its kernel implies,
    A_ij = phi(q_i).phi(k_j) / (sum_j phi(q_i).phi(k_j) + eps), which is what FAVOR+ applies to v without ever
    forming it; rows sum to 1 up to eps.
    """
    x = layer.norm1(tokens)
    if isinstance(layer, TokenPerformer):
        k, q, v = layer.kqv(x).split(layer.out_dim, dim=-1)  # official order: k, q, v
        kp, qp = performer_features(k, layer.w), performer_features(q, layer.w)  # (B, T, m)
        kernel = qp @ kp.transpose(1, 2)  # (B, T, T)
        weights = kernel / (kernel.sum(dim=-1, keepdim=True) + layer.eps)
        att = v + layer.proj(weights @ v.float())
    elif isinstance(layer, TokenTransformer):
        attn = layer.attn
        B, T, _ = x.shape
        q, k, v = attn.qkv(x).reshape(B, T, 3, attn.out_dim).unbind(2)  # (B, T, out_dim) each
        weights = attention_weights(q, k, attn.scale)  # official: scale from the input width
        att = v + attn.proj(weights @ v)
    else:
        raise TypeError(f'{type(layer).__name__} is not a T2T token layer')
    return weights, att + layer.mlp(layer.norm2(att))


class AttentionRecorder:
    """Forward hooks that record every block's attention and both T2T layers' attention during one forward.

    `blocks[i]` is (B, heads, 1 + N, 1 + N) for the i-th block that has attention, which is `model.blocks`
    entry `block_indices[i]` (the dense variant's transitions have none); `t2t[j]` is (B, T_j, T_j), empty for the
    convolution and patch tokenizers; `max_error` is the largest difference between a hooked module's real output
    and the output rebuilt from the recorded attention.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.block_indices = [i for i, block in enumerate(model.blocks) if hasattr(block, 'attn')]
        self.blocks: List[torch.Tensor] = []
        self.t2t: List[torch.Tensor] = []
        self.errors: List[float] = []
        self._handles: List[torch.utils.hooks.RemovableHandle] = []

    @property
    def max_error(self) -> float:
        return max(self.errors, default=0.0)

    def _record(self, store: List[torch.Tensor], compute):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            with torch.no_grad():
                weights, rebuilt = compute(module, *args)
            store.append(weights.detach().float().cpu())
            self.errors.append((rebuilt.float() - output.float()).abs().max().item())
        return hook

    def __enter__(self) -> 'AttentionRecorder':
        for i in self.block_indices:
            attn = self.model.blocks[i].attn
            self._handles.append(attn.register_forward_hook(self._record(self.blocks, _block_attention)))
        t2t = self.model.tokens_to_token
        for layer in (getattr(t2t, 'attention1', None), getattr(t2t, 'attention2', None)):
            if layer is not None:  # the convolution and patch tokenizers have no T2T attention
                self._handles.append(layer.register_forward_hook(self._record(self.t2t, t2t_attention)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def attention_rollout(block_attention: Sequence[torch.Tensor], residual: float = 0.5) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): mean over heads, mixed with the identity for the residual
    path, multiplied through the blocks. (B, h, N, N) per block -> (B, N, N); each row still sums to 1."""
    rollout = None
    for weights in block_attention:
        a = weights.mean(dim=1)  # (B, N, N)
        a = residual * torch.eye(a.shape[-1], dtype=a.dtype) + (1 - residual) * a
        rollout = a if rollout is None else a @ rollout
    return rollout


# --- one image --------------------------------------------------------------------------------------------------

@dataclass
class Explanation:
    """Everything the pictures show for one image, as arrays (batch of one)."""
    name: str
    image: np.ndarray  # (H, W, C) in [0, 1]: the model input, un-normalised
    features: List[Tuple[str, torch.Tensor, int]]  # (title, (C, h, w) map, stride)
    block_attention: Dict[int, torch.Tensor]  # block index -> (heads, 1 + N, 1 + N), for blocks with attention
    grid: Tuple[int, int]  # backbone token grid
    rollout: torch.Tensor  # (1 + N, 1 + N)
    t2t_attention: List[torch.Tensor]  # stage 1, 2: (T, T); empty without T2T attention layers
    t2t_grids: List[Tuple[int, int]]
    blocks: List[int]
    top: List[Tuple[str, float]]
    max_error: float
    tokens_type: str = field(default='performer')


def _display_image(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    mean_t = torch.tensor(mean).view(-1, 1, 1)
    std_t = torch.tensor(std).view(-1, 1, 1)
    return (x * std_t + mean_t).clamp(0, 1).permute(1, 2, 0).numpy()


@torch.no_grad()
def explain(restored: RestoredModel, image: Image.Image, name: str = 'image',
            blocks: Optional[Sequence[int]] = None) -> Explanation:
    """Run the model once on `image` (through its eval transform) and collect maps, attention and prediction."""
    model = restored.model.eval()
    depth = len(model.blocks)
    with_attention = [i for i, block in enumerate(model.blocks) if hasattr(block, 'attn')]
    if blocks is None:  # first, middle and last of the blocks that attend
        blocks = [with_attention[0], with_attention[len(with_attention) // 2], with_attention[-1]]
    blocks = sorted(set(blocks))
    bad = [b for b in blocks if not 0 <= b < depth]
    if bad:
        raise DataError(f'blocks {bad} do not exist: {restored.name} has blocks 0..{depth - 1}')
    transform = restored.transform()
    x = transform(image.convert('L' if restored.preprocess['in_chans'] == 1 else 'RGB')).unsqueeze(0)
    device = next(model.parameters()).device
    num_stem = len(model.feature_info) - depth  # tokenizer stages with their own maps: 2, or 0 for patches
    with AttentionRecorder(model) as recorder:
        final, maps = model.forward_intermediates(
            x.to(device), indices=list(range(num_stem)) + [num_stem + b for b in blocks])
    probs = model.forward_head(final).softmax(-1)[0].float().cpu()
    values, indices = probs.topk(min(3, probs.numel()))
    pre = restored.preprocessing_facts()
    tokens_type = model.tokens_to_token.tokens_type
    stem = 'convolution' if tokens_type == 'convolution' else 'T2T'
    strides = [model.feature_info[i]['reduction'] for i in range(num_stem)] + [model.patch_size] * len(blocks)
    titles = [f'{stem} stage {i + 1} (stride {strides[i]})' for i in range(num_stem)] + \
             [f'block {b} (stride {model.patch_size})' for b in blocks]
    grid = tuple(maps[-1].shape[-2:])
    return Explanation(
        name=name, image=_display_image(x[0], pre['mean'], pre['std']),
        features=[(t, m[0].float().cpu(), s) for t, m, s in zip(titles, maps, strides)],
        block_attention={i: a[0] for i, a in zip(recorder.block_indices, recorder.blocks)}, grid=grid,
        rollout=attention_rollout(recorder.blocks)[0],
        t2t_attention=[a[0] for a in recorder.t2t], t2t_grids=[tuple(m.shape[-2:]) for m in maps[:num_stem]],
        blocks=list(blocks), top=[(restored.classes[i], v) for i, v in zip(indices.tolist(), values.tolist())],
        max_error=recorder.max_error, tokens_type=tokens_type)


# --- pictures -----------------------------------------------------------------------------------------------------

def _channel_grid(fmap: torch.Tensor, channels: int) -> np.ndarray:
    """The first `channels` channels of a (C, h, w) map tiled in a square-ish grid, each scaled to [0, 1]."""
    c = min(channels, fmap.shape[0])
    maps = fmap[:c]
    lo = maps.flatten(1).min(dim=1).values.view(-1, 1, 1)
    hi = maps.flatten(1).max(dim=1).values.view(-1, 1, 1)
    maps = ((maps - lo) / (hi - lo).clamp_min(1e-12)).numpy()
    cols = int(np.ceil(np.sqrt(c)))
    rows = int(np.ceil(c / cols))
    h, w = maps.shape[1:]
    mosaic = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1), np.nan)  # 1-pixel gaps, drawn blank
    for i in range(c):
        r, q = divmod(i, cols)
        mosaic[r * (h + 1):r * (h + 1) + h, q * (w + 1):q * (w + 1) + w] = maps[i]
    return mosaic


def _upsample(values: torch.Tensor, grid: Tuple[int, int], size: Tuple[int, int]) -> np.ndarray:
    """A map over a token grid, bilinearly resized to the image and scaled to [0, 1] for display."""
    m = values.reshape(1, 1, *grid).float()
    m = F.interpolate(m, size=size, mode='bilinear', align_corners=False)[0, 0]
    m = m - m.min()
    return (m / m.max().clamp_min(1e-12)).numpy()


def _show_image(ax, image: np.ndarray) -> None:
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap='gray', vmin=0, vmax=1)
    else:
        ax.imshow(image)
    ax.set_axis_off()


def _overlay(ax, image: np.ndarray, heat: np.ndarray, title: str) -> None:
    _show_image(ax, image)
    ax.imshow(heat, cmap='jet', alpha=0.5, vmin=0, vmax=1)
    ax.set_title(title, fontsize=8)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=100, bbox_inches='tight')
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buffer.getvalue()), what='picture')
    return path


def _figure(rows: int, cols: int, size: float = 2.0):
    import matplotlib
    matplotlib.use('Agg', force=False)
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    return fig, axes


def plot_feature_maps(e: Explanation, path: Path, channels: int = 16) -> Path:
    fig, axes = _figure(1, 1 + len(e.features), size=2.6)
    _show_image(axes[0, 0], e.image)
    axes[0, 0].set_title('input', fontsize=9)
    for ax, (title, fmap, _) in zip(axes[0, 1:], e.features):
        ax.imshow(_channel_grid(fmap, channels), cmap='viridis', interpolation='nearest')
        ax.set_title(f'{title}\n{fmap.shape[0]} ch, {fmap.shape[1]}x{fmap.shape[2]}', fontsize=9)
    fig.suptitle(f'{e.name}: first {channels} channels of each feature map (cf. paper Fig. 2)', fontsize=10)
    return _save(fig, path)


def plot_block_attention(e: Explanation, path: Path) -> Path:
    shown = [b for b in e.blocks if b in e.block_attention]  # a dense transition has no attention to show
    if not shown:
        raise DataError(f'blocks {e.blocks} have no attention (dense transitions); choose others with --blocks')
    heads = e.block_attention[shown[0]].shape[0]
    size = e.image.shape[:2]
    fig, axes = _figure(len(shown), heads + 1)
    for row, b in enumerate(shown):
        cls = e.block_attention[b][:, 0, 1:]  # (heads, N): class token -> patch tokens
        for h in range(heads):
            _overlay(axes[row, h], e.image, _upsample(cls[h], e.grid, size), f'block {b}, head {h}')
        _overlay(axes[row, heads], e.image, _upsample(cls.mean(0), e.grid, size), f'block {b}, mean')
    fig.suptitle(f'{e.name}: class-token attention per head', fontsize=10)
    return _save(fig, path)


def plot_rollout(e: Explanation, path: Path) -> Path:
    fig, axes = _figure(1, 3, size=2.8)
    heat = _upsample(e.rollout[0, 1:], e.grid, e.image.shape[:2])
    _show_image(axes[0, 0], e.image)
    axes[0, 0].set_title('; '.join(f'{n} {100 * p:.0f}%' for n, p in e.top[:2]), fontsize=8)
    axes[0, 1].imshow(heat, cmap='jet', vmin=0, vmax=1)
    axes[0, 1].set_title(f'rollout over {len(e.block_attention)} blocks', fontsize=9)
    _overlay(axes[0, 2], e.image, heat, 'overlay')
    fig.suptitle(f'{e.name}: attention rollout (class token)', fontsize=10)
    return _save(fig, path)


def plot_t2t_attention(e: Explanation, path: Path, queries: Sequence[Tuple[float, float]] = DEFAULT_QUERIES) -> Path:
    kind = 'implied by the Performer kernel' if e.tokens_type == 'performer' else 'softmax'
    size = e.image.shape[:2]
    fig, axes = _figure(2, len(queries))
    for row, (weights, grid) in enumerate(zip(e.t2t_attention, e.t2t_grids)):
        for col, (fy, fx) in enumerate(queries):
            r, c = min(int(fy * grid[0]), grid[0] - 1), min(int(fx * grid[1]), grid[1] - 1)
            _overlay(axes[row, col], e.image, _upsample(weights[r * grid[1] + c], grid, size),
                     f'stage {row + 1}, query ({r}, {c})')
            axes[row, col].plot([(c + 0.5) * size[1] / grid[1]], [(r + 0.5) * size[0] / grid[0]], 'w+',
                                markersize=10, markeredgewidth=2)
    fig.suptitle(f'{e.name}: T2T attention of a few query tokens ({kind})', fontsize=10)
    return _save(fig, path)


def default_images() -> List[Tuple[str, Image.Image]]:
    """The photos shipped with scikit-image: nothing to download."""
    try:
        import skimage.data
    except ImportError as e:
        raise DataError('no IMAGE given and scikit-image (for its sample photos) is not installed: '
                        'pip install "t2tvit[viz]", or name image files') from e
    return [(name, Image.fromarray(getattr(skimage.data, name)())) for name in SKIMAGE_PHOTOS]


def visualize(
        restored: RestoredModel,
        images: Sequence[Union[str, Path]] = (),
        output: Union[str, Path] = 'runs/visualize',
        blocks: Optional[Sequence[int]] = None,
        channels: int = 16,
) -> Tuple[List[Path], List[Explanation]]:
    """Write NAME_feature_maps.png, NAME_attention.png, NAME_rollout.png and, for models whose tokenizer attends,
    NAME_t2t_attention.png per image.

    `images` are files (default: scikit-image's astronaut, chelsea and coffee photos); `blocks` are the blocks
    shown (default: first, middle, last).
    """
    named: List[Tuple[str, Image.Image]] = []
    for item in images:
        path = Path(item)
        if not path.is_file():
            raise DataError(f'{path} does not exist or is not a file; give image files (or none for the sample '
                            f'photos)')
        try:
            named.append((path.stem, load_image(path)))
        except UNREADABLE_IMAGE_ERRORS as e:
            raise DataError(f'cannot read image {path} ({type(e).__name__}: {e}); give a JPEG, PNG, ... file') from e
    named = named or default_images()
    named = list(zip(unique_stems([n for n, _ in named]), [image for _, image in named]))  # a/x.png, b/x.png: x, x-1
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)  # only once every image has been read
    files: List[Path] = []
    explanations: List[Explanation] = []
    for name, image in named:
        e = explain(restored, image, name, blocks)
        explanations.append(e)
        files += [plot_feature_maps(e, out / f'{name}_feature_maps.png', channels),
                  plot_block_attention(e, out / f'{name}_attention.png'),
                  plot_rollout(e, out / f'{name}_rollout.png')]
        if e.t2t_attention:  # only the T2T module attends; the convolution and patch tokenizers do not
            files.append(plot_t2t_attention(e, out / f'{name}_t2t_attention.png'))
    return files, explanations

