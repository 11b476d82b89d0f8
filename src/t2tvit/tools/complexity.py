"""Parameters and multiply-accumulates (MACs) of every variant, counted from the code under two stated conventions.

Counting is done by `torch.utils.flop_counter` formulas on the operators a forward pass really dispatches (on the
`meta` device: no memory, no arithmetic), not by hand:

- `layers` (a): matrix products and convolutions with a trainable weight as an operand, i.e. the Linear and
  convolution layers. This is what fvcore-style counters and mmpretrain report (about 4.3 G for T2T-ViT-14).
- `all` (b): every matrix product, so also the attention products (`q @ k^T`, `attn @ v`, inside
  `scaled_dot_product_attention` or not) and the Performer's products with its frozen random features. This is the
  paper's convention (4.8 G for T2T-ViT-14), and the one model FLOPs utilisation uses: FLOPs = 2 x MACs.

Element-wise work (norms, activations, softmax, exp) is counted by neither. A training step is counted as
3 x the forward pass (forward, gradient of the input, gradient of the weights).
"""
from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

import timm
import torch
import torch.nn as nn
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..models import count_parameters, list_variants
from .info import PAPER_PARAMS_M
from .paper import PAPER_MACS_G, or_dash

CONVENTIONS = ('layers', 'all')

TRAIN_STEP_FACTOR = 3  # forward + input gradient + weight gradient

aten = torch.ops.aten


def _sdpa_cpu(query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _sdpa_cpu_backward(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


# torch's own formulas, plus the CPU flash-attention kernels that torch's table does not list
_FORMULAS = dict(flop_registry)
_FORMULAS[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu
_FORMULAS[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_cpu_backward


class MacCounter(TorchDispatchMode):
    """Counts MACs of the matrix products and convolutions run under it, per convention (see the module doc).

    An operation belongs to `layers` when one of its tensors is a weight: one of `weights`, or a tensor computed
    from weights alone (the transposed weight a Linear passes to `addmm`, a permuted or cast copy); everything
    counted belongs to `all`.
    """

    def __init__(self, weights: Iterable[torch.Tensor] = ()):
        super().__init__()
        self._weights = {id(w): w for w in weights}
        self._derived: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id -> live weight-made tensor
        self.macs = {name: 0 for name in CONVENTIONS}

    def _is_weight(self, t: torch.Tensor) -> bool:
        return self._weights.get(id(t)) is t or self._derived.get(id(t)) is t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        formula = _FORMULAS.get(func._overloadpacket)
        if formula is not None:
            macs = formula(*args, **kwargs, out_val=out) // 2  # torch's formulas count 2 FLOPs per MAC
            self.macs['all'] += macs
            if any(self._is_weight(t) for t in tensors):
                self.macs['layers'] += macs
        elif tensors and all(self._is_weight(t) or t.dim() == 0 or t.dtype in (torch.int64, torch.int32)
                             for t in tensors) and any(self._is_weight(t) for t in tensors):
            for t in tree_flatten(out)[0]:  # made from weights (and indices) alone: a weight too
                if isinstance(t, torch.Tensor):
                    self._derived[id(t)] = t
        return out


def count_macs(model: nn.Module, input_size: Tuple[int, int, int], device: str = 'meta') -> Dict[str, int]:
    """MACs of one forward pass of one image, per convention: {'layers': ..., 'all': ...}.

    `model` must live on `device`; `meta` costs nothing and gives the same count (shapes are all that matter).
    """
    x = torch.zeros((1, *input_size), device=device)
    was_training = model.training
    model.eval()
    try:
        with MacCounter(model.parameters()) as counter, torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
    return dict(counter.macs)


@dataclass
class ComplexityRow:
    name: str
    img_size: int
    params_total: int  # parameters + frozen buffers (pos_embed, Performer w), as the paper counts
    params_trainable: int  # what an optimizer updates
    params_no_frozen: int  # parameters only: without the frozen position table and random features
    macs_layers: int  # convention (a)
    macs_all: int  # convention (b), the paper's
    paper_params_m: Optional[float] = None
    paper_macs_g: Optional[float] = None

    @property
    def params_diff(self) -> Optional[float]:
        return None if self.paper_params_m is None else self.params_total / 1e6 / self.paper_params_m - 1

    @property
    def macs_diff(self) -> Optional[float]:
        return None if self.paper_macs_g is None else self.macs_all / 1e9 / self.paper_macs_g - 1

    def to_dict(self) -> Dict[str, Any]:
        return dict(asdict(self), params_diff=self.params_diff, macs_diff=self.macs_diff)


def create_at_size(name: str, img_size: Optional[int] = None, **kwargs: Any) -> nn.Module:
    """A randomly initialised timm model built for `img_size`; CNNs take any size and have no img_size argument."""
    if img_size is None:
        return timm.create_model(name, pretrained=False, **kwargs)
    try:
        return timm.create_model(name, pretrained=False, img_size=img_size, **kwargs)
    except TypeError as e:
        if 'img_size' not in str(e):
            raise
        return timm.create_model(name, pretrained=False, **kwargs)


def model_complexity(name: str, img_size: Optional[int] = None, **kwargs: Any) -> ComplexityRow:
    """Build `name` (any timm model) on the meta device and count its parameters and MACs at `img_size`."""
    with torch.device('meta'):
        model = create_at_size(name, img_size, **kwargs)
    input_size = tuple(model.pretrained_cfg['input_size'])
    if img_size is not None:
        input_size = (input_size[0], img_size, img_size)
    total, trainable = count_parameters(model)
    macs = count_macs(model, input_size)
    base = name.partition('.')[0]
    at_paper_size = input_size[1] == 224
    return ComplexityRow(
        name=name, img_size=input_size[1], params_total=total, params_trainable=trainable,
        params_no_frozen=sum(p.numel() for p in model.parameters()), macs_layers=macs['layers'], macs_all=macs['all'],
        paper_params_m=PAPER_PARAMS_M.get(base) if at_paper_size else None,
        paper_macs_g=PAPER_MACS_G.get(base) if at_paper_size else None,
    )


def complexity_rows(names: Optional[List[str]] = None, img_sizes: Tuple[int, ...] = (224, 384)) -> List[ComplexityRow]:
    """Every registered variant (or `names`) at each of `img_sizes`."""
    names = names or list_variants()
    return [model_complexity(name, size) for size in img_sizes for name in names]


def format_complexity_table(rows: List[ComplexityRow]) -> str:
    header = (f"{'model':<20}{'img':>5}{'params':>13}{'trainable':>13}{'no frozen':>13}{'paper M':>9}{'diff':>7}"
              f"{'MACs (a)':>11}{'MACs (b)':>11}{'paper G':>9}{'diff':>7}")
    lines = [header, '-' * len(header)]
    for r in rows:
        lines.append(f'{r.name:<20}{r.img_size:>5}{r.params_total:>13,}{r.params_trainable:>13,}'
                     f'{r.params_no_frozen:>13,}{or_dash(r.paper_params_m, ".1f"):>9}'
                     f'{or_dash(r.params_diff, "+.1%"):>7}{r.macs_layers / 1e9:>10.2f}G'
                     f'{r.macs_all / 1e9:>10.2f}G{or_dash(r.paper_macs_g, ".1f"):>9}{or_dash(r.macs_diff, "+.1%"):>7}')
    lines.append('params = parameters + frozen buffers (pos_embed, Performer w), as the paper counts; no frozen = '
                 'parameters only')
    lines.append('MACs per image, one forward pass: (a) Linear/conv layers only (fvcore, mmpretrain); (b) also '
                 'attention and Performer products (the paper); diff = (b) vs paper')
    return '\n'.join(lines)
