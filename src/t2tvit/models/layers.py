"""Parts of the Tokens-to-Token module: soft-split geometry, the two token re-structurizers, sinusoid table.

Module and attribute names reproduce the official state-dict keys, so official checkpoints load strictly.
"""
from __future__ import annotations

import math
import os
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, use_fused_attn
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

__all__ = [
    'SOFT_SPLITS', 'SoftSplits', 'soft_split_size', 'token_grid_size', 'soft_split', 'patch_major_order',
    'sinusoid_table',
    'FAST_PATHS', 'FastPathError', 'fast_path_default', 'set_fast_paths', 'attention', 'cpu_bf16_autocast',
    'onednn_available', 'onednn_inference',
    'fused_linear', 'mlp_fusable', 'fused_mlp_residual', 'OneDNNLinear', 'use_onednn_linears',
    'TokenAttention', 'TokenTransformer', 'TokenPerformer',
]

# --- fast paths ---------------------------------------------------------------------------------------------------
# Each one computes what the plain code computes (bit for bit, or within fp32 rounding) and is a boolean attribute of
# the modules that use it, so that it can be switched off for an A/B timing: per model with
# `set_fast_paths(model, name=False)`, or for every model built afterwards with the environment variable
# T2TVIT_SLOW_PATHS=name,name (or `all`).
FAST_PATHS: Dict[str, str] = {
    'strided_unfold': 'soft splits as a strided view of the padded map and one copy (not im2col + transpose copy)',
    'conv_project': 'last soft split and project as one stride-2 convolution of the token map',
    'fused_attn': 'scaled_dot_product_attention, in the token transformer and the blocks (not an N x N matrix)',
    'performer_fusion': 'Performer kernel math in fewer passes: row terms as the GEMM bias, exp in place',
    'patch_major': 'second soft split gathered (row, column, channel) from the channels-last map, the next layer\'s '
                   'first weights permuted to match (with strided_unfold)',
    'bf16_cpu_attn': 'under CPU bf16 autocast, the blocks\' attention as explicit bf16 products (q k^T, softmax, '
                     'then v), which beat the fused kernel on AVX-512 BF16 without AMX',
    'batch_chunks': 'T2T module on CPU in batch chunks of about 16k first-stage tokens, so that its 3136-token '
                    'intermediates stay in cache and on reused pages (eager only)',
    'onednn_linear': 'CPU Linear layers as oneDNN products rather than MKL\'s, which are slower on AMD: in '
                     'inference (fp32 or bf16 autocast) with the bias, the GELU or the fp32 residual add done '
                     'inside the product; in fp32 training the forward and input-gradient products',
}


class FastPathError(ValueError):
    """A fast-path name that does not exist (in `T2TVIT_SLOW_PATHS` or `set_fast_paths`)."""


def _slow_paths_from_env() -> Tuple[str, ...]:
    text = os.environ.get('T2TVIT_SLOW_PATHS', '').strip()
    if text == 'all':
        return tuple(FAST_PATHS)
    names = tuple(n.strip() for n in text.split(',') if n.strip())
    unknown = [n for n in names if n not in FAST_PATHS]
    if unknown:
        raise FastPathError(f'T2TVIT_SLOW_PATHS names {unknown}; known fast paths: {", ".join(FAST_PATHS)} (or all)')
    return names


def fast_path_default(name: str) -> bool:
    """Whether a newly built module takes fast path `name`: yes unless T2TVIT_SLOW_PATHS names it."""
    if name not in FAST_PATHS:
        raise FastPathError(f'unknown fast path {name!r}; known: {", ".join(FAST_PATHS)}')
    return name not in _slow_paths_from_env()


def set_fast_paths(model: nn.Module, **enabled: bool) -> nn.Module:
    """Switch fast paths on or off in every module of `model` that has them, e.g. `strided_unfold=False`.

    `fused_attn` also switches timm's attention in the blocks, which has an attribute of the same name.
    """
    unknown = [n for n in enabled if n not in FAST_PATHS]
    if unknown:
        raise FastPathError(f'unknown fast paths {unknown}; known: {", ".join(FAST_PATHS)}')
    for module in model.modules():
        for name, value in enabled.items():
            if hasattr(module, name):
                setattr(module, name, bool(value))
    return model


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, attn_drop: nn.Dropout,
              fused: bool, training: bool) -> torch.Tensor:
    """softmax(q k^T * scale) v over (B, heads, N, head_dim) tensors, by the fused kernel or explicit products."""
    if fused:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=attn_drop.p if training else 0., scale=scale)
    attn = (q * scale) @ k.transpose(-2, -1)
    return attn_drop(attn.softmax(dim=-1)) @ v


def _has_onednn_linear() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, '_linear_pointwise')
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


_ONEDNN_LINEAR = _has_onednn_linear()


def onednn_available() -> bool:
    """Whether this PyTorch has oneDNN's fused linear product (x86 and Arm wheels do)."""
    return _ONEDNN_LINEAR


def _onednn_eager(x: torch.Tensor) -> bool:
    """oneDNN can run `x`'s products here: on CPU, in eager mode (traces, compiled graphs, exports and dispatch modes
    such as the FLOP counter see plain `linear`), with this PyTorch's oneDNN on."""
    return (_ONEDNN_LINEAR and x.device.type == 'cpu' and not torch.jit.is_tracing() and not torch.jit.is_scripting()
            and not torch.compiler.is_compiling() and torch.backends.mkldnn.enabled and not is_in_torch_dispatch_mode())


def onednn_inference(x: torch.Tensor, module: Optional[nn.Module] = None) -> bool:
    """Whether `fused_linear` may stand in for `module`'s layers on `x`: float32 (or under CPU bf16 autocast), no
    autograd (the fused op has no backward), eager on CPU (`_onednn_eager`), and no hooks on the layers inside
    `module` (they would not be called)."""
    if torch.is_autocast_enabled('cpu'):
        dtypes = (torch.float32, torch.bfloat16) if torch.get_autocast_dtype('cpu') == torch.bfloat16 else ()
    else:
        dtypes = (torch.float32,)
    return (x.dtype in dtypes and not torch.is_grad_enabled() and _onednn_eager(x)
            and (module is None or not _has_hooks(module)))


def _has_hooks(module: nn.Module) -> bool:
    """Whether a layer inside `module` (not `module` itself, whose call still runs its hooks) has forward hooks."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules() if m is not module)


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, gelu: bool = False,
                 add: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, then exact GELU or `+ add`, as one oneDNN product (check `onednn_inference`).

    On AMD CPUs oneDNN's GEMM runs about 30% faster than MKL's, which `F.linear` calls; and a bias, GELU or
    residual applied by the product itself saves a pass over the output. Under CPU bf16 autocast the product runs
    in bf16, as autocast's `linear` would, and `add` is added outside it in its own precision (the float32
    residual stream stays float32, as under autocast).
    """
    op = torch.ops.mkldnn._linear_pointwise
    if torch.is_autocast_enabled('cpu'):
        dtype = torch.get_autocast_dtype('cpu')
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        if add is not None:
            return add + op(x, weight, bias, 'none', [], '')
    if add is not None:
        return op.binary(x, add, weight, bias, 'add')
    return op(x, weight, bias, 'gelu' if gelu else 'none', [], 'none' if gelu else '')


class _OneDNNLinearFunction(torch.autograd.Function):
    """`F.linear` with its forward and input-gradient products by oneDNN, both faster than MKL's on AMD CPUs; the
    weight gradient (a product over the tokens of two transposed operands) stays with MKL, which is faster there."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """x: (rows, in_features)."""
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, 'none', [], '')

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.mkldnn._linear_pointwise(grad, weight.t(), None, 'none', [], '')  # grad @ weight
        if ctx.needs_input_grad[1]:
            grad_weight = grad.t() @ x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        return grad_x, grad_weight, grad_bias


class OneDNNLinear(nn.Linear):
    """`nn.Linear` (same parameters, same keys) whose CPU products go through oneDNN (fast path `onednn_linear`):
    in inference as `fused_linear`, in float32 training forward and backward by `_OneDNNLinearFunction`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.onednn_linear = fast_path_default('onednn_linear')

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> 'OneDNNLinear':
        """The same layer (the very same parameters) as a `OneDNNLinear`."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device='meta')
        layer.weight, layer.bias = linear.weight, linear.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.product(x, self.weight)

    def product(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """`F.linear(x, weight, self.bias)`, by oneDNN where it can: `weight` is this layer's, maybe permuted."""
        if self.onednn_linear:
            if onednn_inference(x):
                return fused_linear(x, weight, self.bias)
            if (x.dtype == torch.float32 and weight.dtype == torch.float32 and torch.is_grad_enabled()
                    and not torch.is_autocast_enabled('cpu') and _onednn_eager(x)):
                # on rows: a 2-D product's output is its own tensor, so its 3-D view may be changed in place
                rows = _OneDNNLinearFunction.apply(x.reshape(-1, x.shape[-1]), weight, self.bias)
                return rows.view(*x.shape[:-1], rows.shape[-1])
        return F.linear(x, weight, self.bias)


def use_onednn_linears(module: nn.Module) -> nn.Module:
    """Replace every plain `nn.Linear` inside `module` by a `OneDNNLinear` holding the same parameters."""
    for name, child in module.named_children():
        if type(child) is nn.Linear:
            setattr(module, name, OneDNNLinear.from_linear(child))
        else:
            use_onednn_linears(child)
    return module


def cpu_bf16_autocast(x: torch.Tensor) -> bool:
    """Whether `x` is on CPU inside a bf16 autocast region (eager: a compiled graph picks its own kernels)."""
    return (x.device.type == 'cpu' and torch.is_autocast_enabled('cpu')
            and torch.get_autocast_dtype('cpu') == torch.bfloat16 and not torch.compiler.is_compiling())


# (kernel, stride, padding) of soft_split0, soft_split1, soft_split2, as in the paper.
SOFT_SPLITS: Tuple[Tuple[int, int, int], ...] = ((7, 4, 2), (3, 2, 1), (3, 2, 1))


def soft_split_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Length of one side of the grid an unfold leaves: the usual convolution arithmetic."""
    return (size + 2 * padding - kernel) // stride + 1


SoftSplits = Tuple[Tuple[int, int, int], ...]


def token_grid_size(
        img_size: Tuple[int, int], splits: int = 3, soft_splits: SoftSplits = SOFT_SPLITS) -> Tuple[int, int]:
    """Token grid after the first `splits` soft splits, computed from the real input size.

    With the paper's splits any size of at least 3 pixels per side leaves a grid of at least 1x1: the official code
    assumed multiples of 16.
    """
    h, w = img_size
    kernel, _, padding = soft_splits[0]
    minimum = kernel - 2 * padding
    if not torch.jit.is_tracing() and (h < minimum or w < minimum):
        raise ValueError(
            f'img_size {h}x{w} leaves no tokens after the {kernel}x{kernel} soft split; '
            f'use at least {minimum}x{minimum} pixels')
    for kernel, stride, padding in soft_splits[:splits]:
        h = soft_split_size(h, kernel, stride, padding)
        w = soft_split_size(w, kernel, stride, padding)
    return h, w


def _gather_patches(x: torch.Tensor, kernel: int, stride: int, padding: int, patch_major: bool) -> torch.Tensor:
    x = F.pad(x, (padding, padding, padding, padding))
    patches = x.unfold(2, kernel, stride).unfold(3, kernel, stride)  # (B, C, h, w, k, k), a view
    if patch_major:
        return patches.permute(0, 2, 3, 4, 5, 1).flatten(3).flatten(1, 2)  # (B, h*w, k*k*C)
    return patches.permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)  # (B, h, w, C*k*k) copy -> (B, h*w, C*k*k)


class _SoftSplitWithFoldBackward(torch.autograd.Function):
    """The strided gather forward; backward by col2im (`F.fold`), which sums the overlapping patches' gradients in
    one pass: on CPU several times faster than the backward of two nested `unfold` views."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel: int, stride: int, padding: int, patch_major: bool) -> torch.Tensor:
        ctx.geometry = (tuple(x.shape[-2:]), x.shape[1], kernel, stride, padding, patch_major)
        return _gather_patches(x, kernel, stride, padding, patch_major)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        size, channels, kernel, stride, padding, patch_major = ctx.geometry
        B, L, _ = grad.shape
        if patch_major:  # (row, column, channel) -> Unfold's (channel, row, column)
            cols = grad.view(B, L, kernel, kernel, channels).permute(0, 4, 2, 3, 1).reshape(B, -1, L)
        else:
            cols = grad.transpose(1, 2)
        return F.fold(cols, size, kernel, padding=padding, stride=stride), None, None, None, None


def soft_split(x: torch.Tensor, kernel: int, stride: int, padding: int, patch_major: bool = False) -> torch.Tensor:
    """`nn.Unfold(kernel, stride=stride, padding=padding)(x).transpose(1, 2)`, bit for bit, in one copy.

    A strided view of the zero-padded map gathered once into token order: faster than im2col followed by the copy
    that a transposed result costs the next LayerNorm, and it takes channels-last maps as they are.
    (B, C, H, W) -> (B, h*w, C*k*k), features ordered (channel, row, column) as Unfold orders them, or with
    `patch_major` (row, column, channel): a copy of whole channel vectors, much faster from a channels-last map
    (features permuted by `patch_major_order`). In eager training the gradient goes back by `F.fold`.
    """
    if (torch.is_grad_enabled() and x.requires_grad and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()):
        return _SoftSplitWithFoldBackward.apply(x, kernel, stride, padding, patch_major)
    return _gather_patches(x, kernel, stride, padding, patch_major)


def patch_major_order(channels: int, kernel: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Feature j of a `patch_major` soft split is feature order[j] of the Unfold layout."""
    order = torch.arange(channels * kernel * kernel, device=device)
    return order.view(channels, kernel, kernel).permute(1, 2, 0).flatten()


def _norm(norm: nn.LayerNorm, x: torch.Tensor, order: Optional[torch.Tensor]) -> torch.Tensor:
    """LayerNorm of features permuted by `order`: the statistics do not depend on the order, the affine does."""
    if order is None:
        return norm(x)
    return F.layer_norm(x, norm.normalized_shape, norm.weight[order], norm.bias[order], norm.eps)


def _linear(linear: nn.Linear, x: torch.Tensor, order: Optional[torch.Tensor]) -> torch.Tensor:
    """`linear` of input features permuted by `order`: its weight columns permuted alike."""
    if order is None:
        return linear(x)
    if isinstance(linear, OneDNNLinear):
        return linear.product(x, linear.weight[:, order])
    return F.linear(x, linear.weight[:, order], linear.bias)


def mlp_fusable(mlp: nn.Module) -> bool:
    """Whether `mlp` is Linear, exact GELU, (dropout, identity norm,) Linear: what `fused_mlp_residual` computes."""
    if isinstance(mlp, Mlp):
        return (isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear) and isinstance(mlp.act, nn.GELU)
                and mlp.act.approximate == 'none' and isinstance(mlp.norm, nn.Identity))
    return (isinstance(mlp, nn.Sequential) and len(mlp) == 4 and isinstance(mlp[0], nn.Linear)
            and isinstance(mlp[1], nn.GELU) and mlp[1].approximate == 'none' and isinstance(mlp[2], nn.Linear)
            and isinstance(mlp[3], nn.Dropout))


def fused_mlp_residual(mlp: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """`residual + mlp(x)` in inference (dropout off) as two oneDNN products, for an `mlp_fusable` MLP."""
    fc1, fc2 = (mlp.fc1, mlp.fc2) if isinstance(mlp, Mlp) else (mlp[0], mlp[2])
    return fused_linear(fused_linear(x, fc1.weight, fc1.bias, gelu=True), fc2.weight, fc2.bias, add=residual)


def sinusoid_table(num_positions: int, dim: int) -> torch.Tensor:
    """The fixed 1-D sinusoid position table of "Attention is all you need", shape (1, num_positions, dim).

    Computed in float64 then rounded to float32, which is what the official table holds.
    """
    position = torch.arange(num_positions, dtype=torch.float64).unsqueeze(1)  # (P, 1)
    exponent = 2 * torch.div(torch.arange(dim), 2, rounding_mode='floor').to(torch.float64) / dim  # (D,)
    angle = position / torch.pow(torch.tensor(10000.0, dtype=torch.float64), exponent)  # (P, D)
    table = torch.empty_like(angle)
    table[:, 0::2] = torch.sin(angle[:, 0::2])
    table[:, 1::2] = torch.cos(angle[:, 1::2])
    return table.to(torch.float32).unsqueeze(0)


class TokenAttention(nn.Module):
    """Single-head attention that turns `dim`-wide soft-split tokens into `out_dim`-wide tokens."""

    def __init__(self, dim: int, out_dim: int, qkv_bias: bool = False, attn_drop: float = 0., proj_drop: float = 0.):
        super().__init__()
        self.out_dim = out_dim
        # official: scaled by the input width (dim), not the head width (out_dim); the released weights depend on it
        self.scale = dim ** -0.5
        self.qkv = nn.Linear(dim, out_dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(out_dim, out_dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.fused_attn = use_fused_attn() and fast_path_default('fused_attn')
        self.onednn_linear = fast_path_default('onednn_linear')

    def forward(self, x: torch.Tensor, order: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`order`: x's features are permuted by it (see `soft_split(..., patch_major=True)`)."""
        B, N, _ = x.shape
        onednn = self.onednn_linear and not self.training and onednn_inference(x, self)
        qkv = _linear(self.qkv, x, order)  # a OneDNNLinear in T2TViT: oneDNN's product where it can
        q, k, v = qkv.reshape(B, N, 3, 1, self.out_dim).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, 1, N, d)
        x = attention(q, k, v, self.scale, self.attn_drop, self.fused_attn, self.training)  # (B, 1, N, out_dim)
        # official: the residual is v, because input and output widths differ
        if onednn:  # (dropout is off)
            return fused_linear(x.squeeze(1), self.proj.weight, self.proj.bias, add=v.squeeze(1))
        return v.squeeze(1) + self.proj_drop(self.proj(x.squeeze(1)))  # (B, 1, N, out_dim) -> (B, N, out_dim)


class TokenTransformer(nn.Module):
    """Re-structurization by a one-head transformer layer (the T2T-ViT_t models)."""

    def __init__(self, dim: int, out_dim: int, mlp_ratio: float = 1., qkv_bias: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)  # official: LayerNorm eps 1e-5 everywhere
        self.attn = TokenAttention(dim, out_dim, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = Mlp(in_features=out_dim, hidden_features=int(out_dim * mlp_ratio), out_features=out_dim)

    def forward(self, x: torch.Tensor, order: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`order`: x's features are permuted by it (see `soft_split(..., patch_major=True)`)."""
        x = self.attn(_norm(self.norm1, x, order), order)  # no residual around attention: TokenAttention adds v
        if self.attn.onednn_linear and not self.training and onednn_inference(x, self) and mlp_fusable(self.mlp):
            return fused_mlp_residual(self.mlp, self.norm2(x), x)
        return x + self.mlp(self.norm2(x))


class TokenPerformer(nn.Module):
    """Re-structurization by a one-head Performer (FAVOR+ with positive random features), linear in tokens.

    The kernel math runs in float32 even under autocast: exp() of random projections overflows in half precision.
    """

    def __init__(
            self,
            dim: int,
            out_dim: int,
            kernel_ratio: float = 0.5,
            attn_drop: float = 0.1,
            mlp_drop: float = 0.1,
    ):
        super().__init__()
        self.out_dim = out_dim
        self.kqv = nn.Linear(dim, 3 * out_dim)
        self.dp = nn.Dropout(attn_drop)  # official: fixed dropout 0.1 after the projection
        self.proj = nn.Linear(out_dim, out_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(out_dim)
        self.eps = 1e-8  # official: added to the normaliser before dividing
        self.mlp = nn.Sequential(
            nn.Linear(out_dim, out_dim),
            nn.GELU(),
            nn.Linear(out_dim, out_dim),
            nn.Dropout(mlp_drop),
        )
        self.num_features = int(out_dim * kernel_ratio)
        # official: the frozen random features live in the state dict as `w`; a persistent buffer, not a Parameter
        w = nn.init.orthogonal_(torch.empty(self.num_features, out_dim)) * math.sqrt(self.num_features)
        self.register_buffer('w', w, persistent=True)
        self.performer_fusion = fast_path_default('performer_fusion')
        self.onednn_linear = fast_path_default('onednn_linear')

    def _onednn(self, x: torch.Tensor) -> bool:
        return self.onednn_linear and not self.training and onednn_inference(x, self)

    def random_features(self, x: torch.Tensor) -> torch.Tensor:
        """phi(x) = exp(w x - |x|^2 / 2) / sqrt(m), so that E[phi(q) phi(k)] = exp(q.k)."""
        if self.performer_fusion:
            # exp(w x - (|x|^2 / 2 + log sqrt(m))): the row term is the GEMM's bias, so the (B, T, m) features are
            # written once by the GEMM and once by the exp, instead of by a product, a sum, a difference, an exp and
            # a division
            offset = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() * -0.5 \
                - 0.5 * math.log(self.num_features)  # (B, T, 1)
            wtx = torch.addmm(offset.flatten(0, 1), x.flatten(0, 1), self.w.float().t())  # (B*T, m)
            return wtx.exp_().unflatten(0, x.shape[:2])  # (B, T, m)
        half_sq_norm = (x * x).sum(dim=-1, keepdim=True) / 2  # (B, T, 1), broadcast instead of repeated
        wtx = x @ self.w.float().t()  # (B, T, d) @ (d, m) -> (B, T, m)
        return torch.exp(wtx - half_sq_norm) / math.sqrt(self.num_features)

    def attention(self, x: torch.Tensor, order: Optional[torch.Tensor] = None) -> torch.Tensor:
        onednn = self._onednn(x)
        k, q, v = _linear(self.kqv, x, order).split(self.out_dim, dim=-1)  # official order: k, q, v
        device_type = 'cpu' if x.device.type == 'meta' else x.device.type  # meta (shapes only) has no autocast
        with torch.autocast(device_type=device_type, enabled=False):
            kp = self.random_features(k.float())  # (B, T, m)
            qp = self.random_features(q.float())  # (B, T, m)
            normaliser = qp @ kp.sum(dim=1).unsqueeze(-1)  # (B, T, m) @ (B, m, 1) -> (B, T, 1)
            kptv = v.float().transpose(1, 2) @ kp  # (B, d, T) @ (B, T, m) -> (B, d, m)
            if self.performer_fusion:  # divide the m-wide features, not the d-wide result
                y = (qp / (normaliser + self.eps)) @ kptv.transpose(1, 2)  # (B, T, d)
            else:
                y = (qp @ kptv.transpose(1, 2)) / (normaliser + self.eps)  # (B, T, m) @ (B, m, d) -> (B, T, d)
        # official: the residual is v, as in the token transformer
        if onednn:  # (dropout is off)
            return fused_linear(y, self.proj.weight, self.proj.bias, add=v)
        return v + self.dp(self.proj(y.to(v.dtype)))

    def forward(self, x: torch.Tensor, order: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`order`: x's features are permuted by it (see `soft_split(..., patch_major=True)`)."""
        x = self.attention(_norm(self.norm1, x, order), order)
        if self._onednn(x) and mlp_fusable(self.mlp):
            return fused_mlp_residual(self.mlp, self.norm2(x), x)
        return x + self.mlp(self.norm2(x))
