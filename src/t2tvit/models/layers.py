"""Parts of the Tokens-to-Token module: soft-split geometry, the two token re-structurizers, sinusoid table.

Module and attribute names reproduce the official state-dict keys, so official checkpoints load strictly.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, use_fused_attn

__all__ = [
    'SOFT_SPLITS', 'SoftSplits', 'soft_split_size', 'token_grid_size', 'sinusoid_table',
    'TokenAttention', 'TokenTransformer', 'TokenPerformer',
]

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
        self.fused_attn = use_fused_attn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, 1, self.out_dim).permute(2, 0, 3, 1, 4)  # (3, B, 1, N, out_dim)
        q, k, v = qkv.unbind(0)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0., scale=self.scale)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, 1, N, N)
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        x = self.proj_drop(self.proj(x.squeeze(1)))  # (B, 1, N, out_dim) -> (B, N, out_dim)
        # official: the residual is v, because input and output widths differ
        return v.squeeze(1) + x


class TokenTransformer(nn.Module):
    """Re-structurization by a one-head transformer layer (the T2T-ViT_t models)."""

    def __init__(self, dim: int, out_dim: int, mlp_ratio: float = 1., qkv_bias: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)  # official: LayerNorm eps 1e-5 everywhere
        self.attn = TokenAttention(dim, out_dim, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = Mlp(in_features=out_dim, hidden_features=int(out_dim * mlp_ratio), out_features=out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.norm1(x))  # no residual around attention: widths differ, TokenAttention adds v instead
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

    def random_features(self, x: torch.Tensor) -> torch.Tensor:
        """phi(x) = exp(w x - |x|^2 / 2) / sqrt(m), so that E[phi(q) phi(k)] = exp(q.k)."""
        half_sq_norm = (x * x).sum(dim=-1, keepdim=True) / 2  # (B, T, 1), broadcast instead of repeated
        wtx = x @ self.w.float().t()  # (B, T, d) @ (d, m) -> (B, T, m)
        return torch.exp(wtx - half_sq_norm) / math.sqrt(self.num_features)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        k, q, v = self.kqv(x).split(self.out_dim, dim=-1)  # official order: k, q, v
        with torch.autocast(device_type=x.device.type, enabled=False):
            kp = self.random_features(k.float())  # (B, T, m)
            qp = self.random_features(q.float())  # (B, T, m)
            normaliser = qp @ kp.sum(dim=1).unsqueeze(-1)  # (B, T, m) @ (B, m, 1) -> (B, T, 1)
            kptv = v.float().transpose(1, 2) @ kp  # (B, d, T) @ (B, T, m) -> (B, d, m)
            y = (qp @ kptv.transpose(1, 2)) / (normaliser + self.eps)  # (B, T, m) @ (B, m, d) -> (B, T, d)
        # official: the residual is v, as in the token transformer
        return v + self.dp(self.proj(y.to(v.dtype)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))
