"""Backbone blocks for the paper's CNN-inspired design study (Section 4.2, Table 6): SE, Ghost and dense blocks.

Each one slots into timm's ViT `Block` (as its attention or MLP layer) or subclasses it, and its module names
reproduce the official state-dict keys (`attn.se_layer.fc.0`, `attn.cheap_operation_q`, `mlp.cheap_operation2`,
`dense_linear`, `linear`), so official checkpoints load strictly.
"""

from typing import Final, Optional, Tuple, Type

import torch
import torch.nn as nn
from timm.layers import use_fused_attn
from timm.models.vision_transformer import Block

from .layers import attention

__all__ = ['TokenSE', 'SEAttention', 'GhostAttention', 'GhostMlp', 'DenseBlock', 'DenseTransition']


class _HeadsAttention(nn.Module):
    """What the SE and Ghost attention layers share: `qkv_heads` -> softmax(q k^T * scale) v -> `merge_heads`."""

    fused_attn: Final[bool]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, head_dim) each -> the same shape: SDPA, or the same math as explicit products."""
        return attention(q, k, v, self.scale, self.attn_drop.p if self.training else 0., self.fused_attn)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        q, k, v = self.qkv_heads(x)
        return self.proj_drop(self.merge_heads(self.attend(q, k, v)))


class TokenSE(nn.Module):
    """Squeeze-and-excitation over tokens: the mean token gates each channel through a bottleneck MLP."""

    def __init__(self, dim: int, reduction: int = 16):
        super().__init__()
        if dim // reduction < 1:
            raise ValueError(f'SE needs dim >= reduction; got dim {dim}, reduction {reduction}')
        # official: bias-free Linear-ReLU-Linear-Sigmoid under the key `fc` (fc.0, fc.2 hold the weights)
        self.fc = nn.Sequential(
            nn.Linear(dim, dim // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(dim // reduction, dim, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # official: the squeeze averages every token, the class token included
        gate = self.fc(x.mean(dim=1, keepdim=True))  # (B, 1, C)
        return x * gate


class SEAttention(_HeadsAttention):
    """Multi-head self-attention followed by channel attention (T2T-ViT-SE).

    Takes the keyword arguments timm's `Block` gives every attention layer; the options T2T-ViT never turns on
    (qk_norm, scale_norm, norm_layer) are accepted and unused.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, proj_bias: bool = True,
                 attn_drop: float = 0., proj_drop: float = 0., se_reduction: int = 16, **_unused):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = use_fused_attn()  # timm's switch (TIMM_FUSED_ATTN)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.se_layer = TokenSE(dim, se_reduction)
        self.proj_drop = nn.Dropout(proj_drop)

    def qkv_heads(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as (B, heads, N, head_dim): the attention's inputs, also for pictures of its weights."""
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, head_dim) attention output -> the layer output before its dropout."""
        B, _, N, _ = x.shape
        # official: SE between the projection and its dropout
        return self.se_layer(self.proj(x.transpose(1, 2).reshape(B, N, -1)))


def _cheap_operation(channels: int) -> nn.Conv1d:
    # official: a depthwise 1x1 Conv1d without bias, i.e. one learned scale per channel; kept as a Conv1d so the
    # weight has the official shape (C, 1, 1) and PyTorch's default init
    return nn.Conv1d(channels, channels, kernel_size=1, groups=channels, bias=False)


class GhostAttention(_HeadsAttention):
    """Attention whose q, k, v are half computed by a Linear and half by a cheap per-channel op on that half.

    Takes the keyword arguments timm's `Block` gives every attention layer (unused ones are ignored).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, proj_bias: bool = True,
                 attn_drop: float = 0., proj_drop: float = 0., **_unused):
        super().__init__()
        if dim % 2 or dim % num_heads:
            raise ValueError(f'Ghost attention needs an even dim divisible by num_heads; got dim {dim}, '
                             f'num_heads {num_heads}')
        half = dim // 2
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = use_fused_attn()  # timm's switch (TIMM_FUSED_ATTN)
        self.q = nn.Linear(dim, half, bias=qkv_bias)
        self.k = nn.Linear(dim, half, bias=qkv_bias)
        self.v = nn.Linear(dim, half, bias=qkv_bias)
        self.cheap_operation_q = _cheap_operation(half)
        self.cheap_operation_k = _cheap_operation(half)
        self.cheap_operation_v = _cheap_operation(half)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, primary: torch.Tensor, cheap_weight: torch.Tensor) -> torch.Tensor:
        """(B, N, C/2) primary features and a cheap op's weight -> (B, heads, N, head_dim)."""
        B, N, _ = primary.shape
        # official: [primary, cheap(primary)] along channels, then split into heads, so a head can mix both halves
        y = torch.cat((primary, primary * cheap_weight.view(-1)), dim=-1)  # (B, N, C)
        return y.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, N, head_dim)

    def qkv_heads(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as (B, heads, N, head_dim): the attention's inputs, also for pictures of its weights."""
        return (self._heads(self.q(x), self.cheap_operation_q.weight),
                self._heads(self.k(x), self.cheap_operation_k.weight),
                self._heads(self.v(x), self.cheap_operation_v.weight))

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, head_dim) attention output -> the layer output before its dropout."""
        B, _, N, _ = x.shape
        return self.proj(x.transpose(1, 2).reshape(B, N, -1))


class GhostMlp(nn.Module):
    """MLP whose hidden layer is one C-wide Linear plus (ratio - 1) cheap per-channel copies of it.

    The hidden width (C * mlp_ratio) must be C, 2C, 3C or 4C; the official model uses mlp_ratio 3, which gives the
    keys `cheap_operation2` and `cheap_operation3`.
    """

    max_ratio = 4  # cheap copies are named attributes (official keys), so their number has a bound

    def __init__(self, in_features: int, hidden_features: int, out_features: Optional[int] = None,
                 act_layer: Type[nn.Module] = nn.GELU, bias: bool = True, drop: float = 0., **_unused):
        super().__init__()
        out_features = out_features or in_features
        ratio = hidden_features // in_features
        if ratio < 1 or ratio > self.max_ratio or ratio * in_features != hidden_features:
            raise ValueError(f'Ghost MLP needs mlp_ratio 1, 2, 3 or 4 (hidden width {hidden_features} is not one of '
                             f'1-4 x {in_features}); use e.g. mlp_ratio=3')
        # official: fc1 maps C -> C (not to the hidden width); the cheap copies fill the rest of the hidden layer
        self.fc1 = nn.Linear(in_features, in_features, bias=bias)
        self.act = act_layer()
        self.cheap_operation2 = _cheap_operation(in_features) if ratio >= 2 else None
        self.cheap_operation3 = _cheap_operation(in_features) if ratio >= 3 else None
        self.cheap_operation4 = _cheap_operation(in_features) if ratio >= 4 else None
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        primary = self.act(self.fc1(x))  # (B, N, C)
        # official: each cheap copy (one scale per channel) gets its own activation, on top of the primary's
        parts = [primary]
        if self.cheap_operation2 is not None:
            parts.append(self.act(primary * self.cheap_operation2.weight.view(-1)))
        if self.cheap_operation3 is not None:
            parts.append(self.act(primary * self.cheap_operation3.weight.view(-1)))
        if self.cheap_operation4 is not None:
            parts.append(self.act(primary * self.cheap_operation4.weight.view(-1)))
        x = self.drop(torch.cat(parts, dim=-1))  # (B, N, C * ratio)
        return self.drop(self.fc2(x))


class DenseBlock(Block):
    """A ViT block whose output is projected to `growth_rate` channels and appended to its input (DenseNet)."""

    def __init__(self, dim: int, growth_rate: int, **block_kwargs):
        super().__init__(dim, **block_kwargs)
        self.dense_linear = nn.Linear(dim, growth_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # official: the block keeps its residuals; only the new features (not the input) pass through dense_linear
        y = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))  # timm's Block forward
        y = y + self.drop_path2(self.ls2(self.mlp(self.norm2(y))))
        return torch.cat((x, self.dense_linear(y)), dim=-1)  # (B, N, dim + growth_rate)


class DenseTransition(nn.Module):
    """Between dense stages: Linear then GELU, halving the width (official: no norm)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.linear(x))
