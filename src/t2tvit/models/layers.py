"""Parts of the Tokens-to-Token module: soft-split geometry, the two token re-structurizers, sinusoid table.

Module and attribute names reproduce the official state-dict keys, so official checkpoints load strictly. Each
forward is the paper's computation written once: the same operations run eager, traced, scripted, compiled and
exported. CPU-specific kernels that compute the same numbers faster live in `t2tvit.cpu_kernels`, applied to a
built model on purpose.
"""

import math
from typing import Final, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, use_fused_attn
from timm.models import register_notrace_function

__all__ = [
    'SOFT_SPLITS', 'SoftSplits', 'soft_split_size', 'token_grid_size', 'sinusoid_table', 'attention_weights',
    'attention', 'performer_features', 'performer_attention', 'TokenAttention', 'TokenTransformer', 'TokenPerformer',
]

# (kernel, stride, padding) of soft_split0, soft_split1, soft_split2, as in the paper.
SOFT_SPLITS: Tuple[Tuple[int, int, int], ...] = ((7, 4, 2), (3, 2, 1), (3, 2, 1))

SoftSplits = Tuple[Tuple[int, int, int], ...]


def soft_split_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Length of one side of the grid an unfold leaves: the usual convolution arithmetic."""
    return (size + 2 * padding - kernel) // stride + 1


def token_grid_size(
        img_size: Tuple[int, int], splits: int = 3, soft_splits: SoftSplits = SOFT_SPLITS) -> Tuple[int, int]:
    """Token grid after the first `splits` soft splits of an `img_size` input (not used inside forward).

    With the paper's splits any size of at least 3 pixels per side leaves a grid of at least 1x1: the official code
    assumed multiples of 16.
    """
    h, w = img_size
    kernel, _, padding = soft_splits[0]
    minimum = kernel - 2 * padding
    if h < minimum or w < minimum:
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


def attention_weights(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) over the keys: (..., N, d) queries and keys -> (..., N, N) weights.

    The one place the model, `t2tvit.cpu_kernels` and `t2tvit visualize` form attention weights explicitly.
    """
    return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float = 0.,
              fused: bool = True) -> torch.Tensor:
    """dropout(softmax(q k^T * scale)) v: (..., N, d) each -> (..., N, d).

    `fused`: one SDPA call (timm's `fused_attn`); otherwise explicit products through `attention_weights`. Give
    `dropout_p` 0 outside training, as timm's layers do.
    """
    if fused:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    return F.dropout(attention_weights(q, k, scale), dropout_p, training=dropout_p > 0.) @ v


class TokenAttention(nn.Module):
    """Single-head attention that turns `dim`-wide soft-split tokens into `out_dim`-wide tokens."""

    fused_attn: Final[bool]

    def __init__(self, dim: int, out_dim: int, qkv_bias: bool = False, attn_drop: float = 0., proj_drop: float = 0.):
        super().__init__()
        self.out_dim = out_dim
        # official: scaled by the input width (dim), not the head width (out_dim); the released weights depend on it
        self.scale = dim ** -0.5
        self.qkv = nn.Linear(dim, out_dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(out_dim, out_dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.fused_attn = use_fused_attn()  # timm's switch (TIMM_FUSED_ATTN)

    def attend(self, qkv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, N, 3 * out_dim) output of `qkv` -> attention output and v, each (B, N, out_dim)."""
        B, N, _ = qkv.shape
        q, k, v = qkv.reshape(B, N, 3, 1, self.out_dim).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, 1, N, d)
        x = attention(q, k, v, self.scale, self.attn_drop.p if self.training else 0., self.fused_attn)
        return x.squeeze(1), v.squeeze(1)

    def project(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention output -> layer output, both (B, N, out_dim)."""
        # official: the residual is v, because input and output widths differ
        return v + self.proj_drop(self.proj(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, v = self.attend(self.qkv(x))
        return self.project(x, v)


class TokenTransformer(nn.Module):
    """Re-structurization by a one-head transformer layer (the T2T-ViT_t models): T' = MLP(MSA(T))."""

    def __init__(self, dim: int, out_dim: int, mlp_ratio: float = 1., qkv_bias: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)  # official: LayerNorm eps 1e-5 everywhere
        self.attn = TokenAttention(dim, out_dim, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = Mlp(in_features=out_dim, hidden_features=int(out_dim * mlp_ratio), out_features=out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.norm1(x))  # no residual around attention: TokenAttention adds v
        return x + self.mlp(self.norm2(x))


def performer_features(x: torch.Tensor, w: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """FAVOR+ positive random features phi(x) = exp(w x - |x|^2 / 2) / sqrt(m) of (B, T, d) `x`, (B, T, m), float32.

    `fused` (kernel `performer_fusion` of `t2tvit.cpu_kernels`) computes the same features in fewer passes:
    exp(w x + (-|x|^2 / 2 - log sqrt(m))) with the row term as the product's bias and exp in place, so the
    (B, T, m) features are written twice instead of five times. It equals the plain form within fp32 rounding.
    """
    x, w = x.float(), w.float()
    if fused:
        offset = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() * -0.5 \
            - 0.5 * math.log(w.shape[0])  # (B, T, 1)
        wtx = torch.addmm(offset.flatten(0, 1), x.flatten(0, 1), w.t())  # (B*T, m)
        return wtx.exp_().unflatten(0, x.shape[:2])  # (B, T, m)
    return torch.exp(x @ w.t() - (x * x).sum(dim=-1, keepdim=True) / 2) / w.shape[0] ** 0.5


@register_notrace_function  # FX keeps it one call, so the autocast region below stays part of the graph's meaning
def performer_attention(k: torch.Tensor, q: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
                        eps: float, fused: bool = False) -> torch.Tensor:
    """FAVOR+ attention with positive random features, in float32 even under autocast (exp overflows in half).

    With phi = `performer_features`, E[phi(q) phi(k)] = exp(q.k), and
    y = phi(q) (phi(k)^T v) / (phi(q) sum_t phi(k_t) + eps), linear in the number of tokens T. `fused` (kernel
    `performer_fusion`) takes the fused features and divides the m-wide features rather than the d-wide result.
    """
    with torch.autocast('cpu', enabled=False), torch.autocast('cuda', enabled=False):
        kp, qp = performer_features(k, w, fused), performer_features(q, w, fused)  # (B, T, m)
        normaliser = qp @ kp.sum(dim=1).unsqueeze(-1)  # (B, T, m) @ (B, m, 1) -> (B, T, 1)
        kptv = v.float().transpose(1, 2) @ kp  # (B, d, T) @ (B, T, m) -> (B, d, m)
        if fused:
            return (qp / (normaliser + eps)) @ kptv.transpose(1, 2)  # (B, T, d)
        return (qp @ kptv.transpose(1, 2)) / (normaliser + eps)  # (B, T, m) @ (B, m, d) -> (B, T, d)


class TokenPerformer(nn.Module):
    """Re-structurization by a one-head Performer (FAVOR+ with positive random features), linear in tokens."""

    def __init__(
            self,
            dim: int,
            out_dim: int,
            kernel_ratio: float = 0.5,
            proj_drop: float = 0.1,
            mlp_drop: float = 0.1,
    ):
        super().__init__()
        self.out_dim = out_dim
        self.kqv = nn.Linear(dim, 3 * out_dim)
        self.proj_drop = nn.Dropout(proj_drop)  # official: fixed dropout 0.1 after the projection (key-less `dp`)
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
        self.num_random_features = int(out_dim * kernel_ratio)
        # official: the frozen random features live in the state dict as `w`; a persistent buffer, not a Parameter
        w = nn.init.orthogonal_(torch.empty(self.num_random_features, out_dim)) * math.sqrt(self.num_random_features)
        self.register_buffer('w', w, persistent=True)

    def project(self, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention output (float32) -> the input of the MLP residual, both (B, T, out_dim)."""
        return v + self.proj_drop(self.proj(y.to(v.dtype)))  # official: the residual is v, as in TokenAttention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, q, v = self.kqv(self.norm1(x)).split(self.out_dim, dim=-1)  # official order: k, q, v
        x = self.project(performer_attention(k, q, v, self.w, self.eps), v)
        return x + self.mlp(self.norm2(x))
