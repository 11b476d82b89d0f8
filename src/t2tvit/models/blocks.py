"""Backbone blocks for the paper's CNN-inspired design study (Section 4.2, Table 6): SE, Ghost and dense blocks.

Each one slots into timm's ViT `Block` (as its attention or MLP layer) or subclasses it, and its module names
reproduce the official state-dict keys (`attn.se_layer.fc.0`, `attn.cheap_operation_q`, `mlp.cheap_operation2`,
`dense_linear`, `linear`), so official checkpoints load strictly.
"""
from __future__ import annotations

from typing import Optional, Tuple, Type

import torch
import torch.nn as nn
from timm.layers import use_fused_attn
from timm.models.vision_transformer import Attention, Block

from .layers import (attention, cpu_bf16_autocast, fast_path_default, fused_linear, fused_mlp_residual, mlp_fusable,
                     onednn_inference)

__all__ = ['ViTBlock', 'ViTAttention', 'TokenSE', 'SEAttention', 'GhostAttention', 'GhostMlp', 'DenseBlock', 'DenseTransition']


def _heads_attention(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer.qkv_heads(x)` through attention, (B, heads, N, head_dim): fused unless CPU bf16 autocast makes
    explicit products faster."""
    q, k, v = layer.qkv_heads(x)
    fused = layer.fused_attn and not (layer.bf16_cpu_attn and cpu_bf16_autocast(x))
    return attention(q, k, v, layer.scale, layer.attn_drop, fused, layer.training)


def _attend(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The forward of an attention layer with `qkv_heads` / `merge_heads`: heads, attention, merged output,
    dropout."""
    return layer.proj_drop(layer.merge_heads(_heads_attention(layer, x)))


class ViTAttention(Attention):
    """timm's ViT attention (same parameters, same keys) that also exposes `qkv_heads` / `merge_heads`, and takes
    explicit products under CPU bf16 autocast (fast path `bf16_cpu_attn`)."""

    def __init__(self, dim: int, **kwargs):
        super().__init__(dim, **kwargs)
        self.bf16_cpu_attn = fast_path_default('bf16_cpu_attn')

    def qkv_heads(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as (B, heads, N, head_dim): the attention's inputs, also for pictures of its weights."""
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def _merged(self, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, head_dim) -> (B, N, dim), normed: what `proj` takes."""
        B, _, N, _ = x.shape
        return self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, head_dim) attention output -> the layer output before its dropout."""
        return self.proj(self._merged(x))

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal or getattr(self, 'gate', None) is not None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)  # options T2T-ViT never uses
        return _attend(self, x)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """`residual + self(x)` in inference, the addition inside `proj`'s oneDNN product."""
        merged = self._merged(_heads_attention(self, x))
        return fused_linear(merged, self.proj.weight, self.proj.bias, add=residual)


class ViTBlock(Block):
    """timm's ViT block (same parameters, same keys) whose CPU inference takes fast path `onednn_linear`: its
    products by oneDNN, with the bias, the MLP's GELU and (in fp32) both residual additions done inside them."""

    def __init__(self, dim: int, **kwargs):
        super().__init__(dim, **kwargs)
        self.onednn_linear = fast_path_default('onednn_linear')

    def _fusable(self, x: torch.Tensor) -> bool:
        return (self.onednn_linear and not self.training and isinstance(self.ls1, nn.Identity)
                and isinstance(self.ls2, nn.Identity) and onednn_inference(x, self))

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal or not self._fusable(x):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if isinstance(self.attn, ViTAttention) and getattr(self.attn, 'gate', None) is None:
            x = self.attn.forward_add(self.norm1(x), x)
        else:  # SE and Ghost attention; drop paths are off in inference
            x = x + self.attn(self.norm1(x))
        if mlp_fusable(self.mlp):
            return fused_mlp_residual(self.mlp, self.norm2(x), x)
        return x + self.mlp(self.norm2(x))


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


class SEAttention(nn.Module):
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
        self.fused_attn = use_fused_attn()
        self.bf16_cpu_attn = fast_path_default('bf16_cpu_attn')
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.se_layer = TokenSE(dim, se_reduction)
        self.proj_drop = nn.Dropout(proj_drop)

    def qkv_heads(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as (B, heads, N, head_dim): the attention's inputs, also for pictures of its weights."""
        B, N, _ = x.shape
        return self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, head_dim) attention output -> the layer output before its dropout."""
        B, _, N, _ = x.shape
        # official: SE between the projection and its dropout
        return self.se_layer(self.proj(x.transpose(1, 2).reshape(B, N, -1)))

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        return _attend(self, x)


def _cheap_operation(channels: int) -> nn.Conv1d:
    # official: a depthwise 1x1 Conv1d without bias, i.e. one learned scale per channel; kept as a Conv1d so the
    # weight has the official shape (C, 1, 1) and PyTorch's default init
    return nn.Conv1d(channels, channels, kernel_size=1, groups=channels, bias=False)


def _apply_cheap(x: torch.Tensor, op: nn.Conv1d) -> torch.Tensor:
    """The depthwise 1x1 convolution on (B, N, C) tokens, as the per-channel product it is (no transposes)."""
    return x * op.weight.view(-1)


class GhostAttention(nn.Module):
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
        self.fused_attn = use_fused_attn()
        self.bf16_cpu_attn = fast_path_default('bf16_cpu_attn')
        self.q = nn.Linear(dim, half, bias=qkv_bias)
        self.k = nn.Linear(dim, half, bias=qkv_bias)
        self.v = nn.Linear(dim, half, bias=qkv_bias)
        self.cheap_operation_q = _cheap_operation(half)
        self.cheap_operation_k = _cheap_operation(half)
        self.cheap_operation_v = _cheap_operation(half)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, x: torch.Tensor, linear: nn.Linear, cheap: nn.Conv1d) -> torch.Tensor:
        B, N, _ = x.shape
        primary = linear(x)  # (B, N, C/2)
        # official: [primary, cheap(primary)] along channels, then split into heads, so a head can mix both halves
        y = torch.cat((primary, _apply_cheap(primary, cheap)), dim=-1)  # (B, N, C)
        return y.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, N, head_dim)

    def qkv_heads(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as (B, heads, N, head_dim): the attention's inputs, also for pictures of its weights."""
        return (self._heads(x, self.q, self.cheap_operation_q), self._heads(x, self.k, self.cheap_operation_k),
                self._heads(x, self.v, self.cheap_operation_v))

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, head_dim) attention output -> the layer output before its dropout."""
        B, _, N, _ = x.shape
        return self.proj(x.transpose(1, 2).reshape(B, N, -1))

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        return _attend(self, x)


class GhostMlp(nn.Module):
    """MLP whose hidden layer is one C-wide Linear plus (ratio - 1) cheap per-channel copies of it.

    The hidden width (C * mlp_ratio) must be a whole multiple of C; the official model uses mlp_ratio 3, which
    gives the keys `cheap_operation2` and `cheap_operation3`.
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: Optional[int] = None,
                 act_layer: Type[nn.Module] = nn.GELU, bias: bool = True, drop: float = 0., **_unused):
        super().__init__()
        out_features = out_features or in_features
        ratio = hidden_features // in_features
        if ratio < 1 or ratio * in_features != hidden_features:
            raise ValueError(f'Ghost MLP needs a whole-number mlp_ratio (hidden width {hidden_features} is not a '
                             f'multiple of {in_features}); use e.g. mlp_ratio=3')
        # official: fc1 maps C -> C (not to the hidden width); the cheap copies fill the rest of the hidden layer
        self.fc1 = nn.Linear(in_features, in_features, bias=bias)
        self.act = act_layer()
        self.cheap_names = tuple(f'cheap_operation{i}' for i in range(2, ratio + 1))
        for name in self.cheap_names:
            self.add_module(name, _cheap_operation(in_features))
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        primary = self.act(self.fc1(x))  # (B, N, C)
        # official: each cheap copy gets its own activation, on top of the primary's
        parts = [primary] + [self.act(_apply_cheap(primary, getattr(self, name))) for name in self.cheap_names]
        x = self.drop(torch.cat(parts, dim=-1))  # (B, N, C * ratio)
        return self.drop(self.fc2(x))


class DenseBlock(ViTBlock):
    """A ViT block whose output is projected to `growth_rate` channels and appended to its input (DenseNet)."""

    def __init__(self, dim: int, growth_rate: int, **block_kwargs):
        block_kwargs.setdefault('attn_layer', ViTAttention)
        super().__init__(dim, **block_kwargs)
        self.dense_linear = nn.Linear(dim, growth_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # official: the block keeps its residuals; only the new features (not the input) pass through dense_linear
        return torch.cat((x, self.dense_linear(super().forward(x))), dim=-1)  # (B, N, dim + growth_rate)


class DenseTransition(nn.Module):
    """Between dense stages: Linear then GELU, halving the width (official: no norm)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.linear(x))
