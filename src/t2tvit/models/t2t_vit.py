"""Tokens-to-Token ViT (Yuan et al., ICCV 2021): the T2T module and the deep-narrow ViT backbone.

One class, `T2TViT`, carries every variant: a tokenizer (`tokens_type`: the T2T module with Performer or
transformer tokens, the paper's convolution stand-in, or a plain ViT patch embedding) and a stack of blocks
(`block_type`: ViT, SE, Ghost or dense). Each registered builder names its widths and depths. The state dict has
the official key names and shapes, so official checkpoints load strictly (see `checkpoint.py`).
"""

import math
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Mlp, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.layers.trace_utils import _assert
from timm.models import build_model_with_cfg, generate_default_cfgs, list_pretrained, register_model
from timm.models import resolve_pretrained_cfg
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint, checkpoint_seq
from timm.models.vision_transformer import Attention, Block

from ..errors import InputError
from .blocks import DenseBlock, DenseTransition, GhostAttention, GhostMlp, SEAttention
from .checkpoint import CheckpointError, checkpoint_filter_fn, download_checkpoint, extract_state_dict, read_checkpoint
from .layers import SOFT_SPLITS, SoftSplits, TokenPerformer, TokenTransformer, sinusoid_table, token_grid_size

__all__ = ['T2TModule', 'ConvTokenizer', 'PatchTokenizer', 'T2TViT', 'TOKENS_TYPES', 'BLOCK_TYPES',
           'OFFICIAL_CLASSES', 'RELEASES']

TOKENS_TYPES = ('performer', 'transformer', 'convolution', 'patch')
BLOCK_TYPES = ('vit', 'se', 'ghost', 'dense')


def _check_soft_splits(soft_splits: SoftSplits) -> SoftSplits:
    if len(soft_splits) != 3 or any(len(split) != 3 for split in soft_splits):
        raise ValueError(f'soft_splits {soft_splits!r} must be three (kernel, stride, padding) triples')
    return tuple(tuple(int(v) for v in split) for split in soft_splits)


class T2TModule(nn.Module):
    """Soft split -> re-structurize -> soft split -> re-structurize -> soft split -> project (paper Eq. 1-3).

    Each soft split is an overlapping unfold (kernels 7/3/3, strides 4/2/2), so neighbouring pixels end up in the
    same token; each re-structurization is a token transformer or Performer of width `token_dim` whose output
    tokens are reshaped back into an image. The last soft split and the projection are both linear, so together
    they run as one convolution whose kernel is the projection's weight.
    """

    stage_modules = ('attention1', 'attention2')  # where the two intermediate maps come from

    def __init__(
            self,
            tokens_type: str = 'performer',
            in_chans: int = 3,
            embed_dim: int = 768,
            token_dim: int = 64,
            soft_splits: SoftSplits = SOFT_SPLITS,
            drop_rate: float = 0.1,
    ):
        super().__init__()
        if tokens_type not in ('performer', 'transformer'):
            raise ValueError(f"the T2T module's tokens_type is 'performer' or 'transformer', not {tokens_type!r}")
        self.tokens_type = tokens_type
        self.soft_splits = _check_soft_splits(soft_splits)
        (k0, s0, p0), (k1, s1, p1), (k2, s2, p2) = self.soft_splits
        self.soft_split0 = nn.Unfold(kernel_size=k0, stride=s0, padding=p0)
        self.soft_split1 = nn.Unfold(kernel_size=k1, stride=s1, padding=p1)
        # the last soft split (k2, s2, p2) runs inside the projection's convolution, so it has no module of its own
        if tokens_type == 'performer':
            # official: dropout 0.1 after the attention projection and at the end of the MLP
            performer = dict(kernel_ratio=0.5, proj_drop=drop_rate, mlp_drop=drop_rate)
            self.attention1 = TokenPerformer(in_chans * k0 * k0, token_dim, **performer)
            self.attention2 = TokenPerformer(token_dim * k1 * k1, token_dim, **performer)
        else:
            self.attention1 = TokenTransformer(dim=in_chans * k0 * k0, out_dim=token_dim, mlp_ratio=1.0)
            self.attention2 = TokenTransformer(dim=token_dim * k1 * k1, out_dim=token_dim, mlp_ratio=1.0)
        self.project = nn.Linear(token_dim * k2 * k2, embed_dim)
        self.token_dim = token_dim
        self.min_size = k0 - 2 * p0  # the smallest input side that leaves a token
        self.grad_checkpointing = False

    def forward_stages(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """(B, C, H, W) image -> (B, embed_dim, h3, w3) token map for the backbone, plus the two re-structurized
        maps (B, token_dim, h1, w1) and (B, token_dim, h2, w2) (strides 4 and 8 with the paper's splits)."""
        B, _, H, W = x.shape
        _assert(H >= self.min_size, f'input height {H} leaves no tokens; use at least {self.min_size} pixels')
        _assert(W >= self.min_size, f'input width {W} leaves no tokens; use at least {self.min_size} pixels')
        (k0, s0, p0), (k1, s1, p1) = self.soft_splits[0], self.soft_splits[1]
        h1, w1 = (H + 2 * p0 - k0) // s0 + 1, (W + 2 * p0 - k0) // s0 + 1
        h2, w2 = (h1 + 2 * p1 - k1) // s1 + 1, (w1 + 2 * p1 - k1) // s1 + 1

        x = self.soft_split0(x).transpose(1, 2)  # soft split: (B, C*k*k, L) -> (B, h1*w1, C*7*7) tokens
        x = self._restructure1(x)  # (B, h1*w1, token_dim)
        map1 = x.transpose(1, 2).reshape(B, -1, h1, w1)  # tokens -> image: (B, token_dim, h1, w1)
        x = self.soft_split1(map1).transpose(1, 2)  # (B, h2*w2, token_dim*3*3)
        x = self._restructure2(x)  # (B, h2*w2, token_dim)
        map2 = x.transpose(1, 2).reshape(B, -1, h2, w2)  # (B, token_dim, h2, w2)
        return self.split_and_project(map2), [map1, map2]  # (B, E, h3, w3)

    def split_and_project(self, map2: torch.Tensor) -> torch.Tensor:
        """Last soft split + project as one convolution: the (E, C*k*k) weight is an (E, C, k, k) kernel."""
        k2, s2, p2 = self.soft_splits[2]
        weight = self.project.weight.reshape(self.project.out_features, -1, k2, k2)
        return torch.nn.functional.conv2d(map2, weight, self.project.bias, stride=s2, padding=p2)

    def _restructure1(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(self.attention1, x)
        return self.attention1(x)

    def _restructure2(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(self.attention2, x)
        return self.attention2(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, embed_dim, h3, w3)."""
        return self.forward_stages(x)[0]


class ConvTokenizer(nn.Module):
    """The paper's T2T-ViT_c: the three soft splits become convolutions with the same kernel, stride and padding.

    The official code declares these layers (under these names) but its forward never runs them. A GELU follows
    each of the first two, as the re-structurizations they replace are non-linear; three bare convolutions would
    compose into a single linear map.
    """

    tokens_type = 'convolution'
    stage_modules = ('soft_split0', 'soft_split1')

    def __init__(self, in_chans: int = 3, embed_dim: int = 768, token_dim: int = 64,
                 soft_splits: SoftSplits = SOFT_SPLITS):
        super().__init__()
        self.soft_splits = _check_soft_splits(soft_splits)
        (k0, s0, p0), (k1, s1, p1), (k2, s2, p2) = self.soft_splits
        self.soft_split0 = nn.Conv2d(in_chans, token_dim, kernel_size=k0, stride=s0, padding=p0)
        self.soft_split1 = nn.Conv2d(token_dim, token_dim, kernel_size=k1, stride=s1, padding=p1)
        self.project = nn.Conv2d(token_dim, embed_dim, kernel_size=k2, stride=s2, padding=p2)
        self.act = nn.GELU()
        self.grad_checkpointing = False  # three convolutions: nothing worth recomputing

    def forward_stages(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Token map for the backbone plus the two intermediate maps, as `T2TModule.forward_stages`."""
        map1 = self.act(self.soft_split0(x))  # (B, token_dim, h1, w1)
        map2 = self.act(self.soft_split1(map1))  # (B, token_dim, h2, w2)
        return self.project(map2), [map1, map2]  # (B, embed_dim, h3, w3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x)[0]


class PatchTokenizer(nn.Module):
    """ViT's tokenizer: non-overlapping `patch_size` patches, each linearly embedded (a strided convolution).

    On the deep-narrow backbone this is the paper's "T2T-ViT-14 without T2T" (Table 7); it has no intermediate
    maps, so feature index 0 is the first block.
    """

    tokens_type = 'patch'
    stage_modules = ()

    def __init__(self, in_chans: int = 3, embed_dim: int = 768, patch_size: int = 16):
        super().__init__()
        self.soft_splits = ((int(patch_size), int(patch_size), 0),)  # the geometry, in soft-split terms
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.grad_checkpointing = False

    def forward_stages(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        return self.proj(x), []  # (B, embed_dim, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _vit_blocks(block_type: str, dim: int, depth: int, dpr: Sequence[float], **block_kwargs) -> List[nn.Module]:
    attn_layer, mlp_layer = {
        'vit': (Attention, Mlp),
        'se': (SEAttention, Mlp),
        'ghost': (GhostAttention, GhostMlp),
    }[block_type]
    return [Block(dim=dim, drop_path=dpr[i], attn_layer=attn_layer, mlp_layer=mlp_layer, **block_kwargs)
            for i in range(depth)]


def _dense_blocks(embed_dim: int, growth_rate: int, block_config: Sequence[int], num_heads: int,
                  drop_path_rate: float, **block_kwargs) -> Tuple[List[nn.Module], List[int]]:
    """Dense stages (each block appends `growth_rate` channels) with halving transitions between them.

    Returns the modules, in the official order (transitions are entries of `blocks`), and each one's output width.
    """
    if not block_config or any(int(n) < 1 for n in block_config):
        raise ValueError(f'block_config {tuple(block_config)!r} must list at least one block per stage')
    # official: stage i used the drop-path rate of block i of a 12-block schedule; here it rises over all blocks
    num_blocks = sum(int(n) for n in block_config)
    dpr = [x.item() for x in torch.linspace(0, drop_path_rate, num_blocks, device='cpu')]
    modules: List[nn.Module] = []
    widths: List[int] = []
    dim, index = embed_dim, 0
    for stage, num_layers in enumerate(block_config):
        for _ in range(int(num_layers)):
            if dim % num_heads:
                raise ValueError(
                    f'dense block {len(modules)} is {dim} wide, not divisible by num_heads {num_heads}; choose '
                    f'embed_dim and growth_rate so that every width (embed_dim + k * growth_rate, halved at each '
                    f'transition) divides by num_heads')
            modules.append(DenseBlock(dim, growth_rate, num_heads=num_heads, drop_path=dpr[index], **block_kwargs))
            dim += growth_rate
            widths.append(dim)
            index += 1
        if stage != len(block_config) - 1:
            modules.append(DenseTransition(dim, dim // 2))
            dim //= 2
            widths.append(dim)
    return modules, widths


def _check_args(global_pool: str, tokens_type: str, block_type: str, depth: Optional[int], embed_dim: int,
                num_heads: int) -> None:
    """The `T2TViT` arguments that no layer checks for itself."""
    if global_pool not in ('token', 'avg', ''):
        raise ValueError(f"global_pool {global_pool!r} is not one of 'token', 'avg', ''")
    if tokens_type not in TOKENS_TYPES:
        raise ValueError(f'tokens_type {tokens_type!r} is not one of {TOKENS_TYPES}')
    if block_type not in BLOCK_TYPES:
        raise ValueError(f'block_type {block_type!r} is not one of {BLOCK_TYPES}')
    if block_type == 'dense' and depth is not None:
        raise ValueError('a dense model takes its depth from block_config (blocks per stage); drop depth')
    if block_type != 'dense' and embed_dim % num_heads:
        raise ValueError(f'embed_dim {embed_dim} is not divisible by num_heads {num_heads}')


def _tokenizer(tokens_type: str, in_chans: int, embed_dim: int, token_dim: int, soft_splits: SoftSplits,
               t2t_drop_rate: float, patch_size: int) -> nn.Module:
    """The tokenizer `tokens_type` names: a T2T module, the convolution stand-in or a patch embedding."""
    if tokens_type == 'patch':
        return PatchTokenizer(in_chans, embed_dim, patch_size)
    if tokens_type == 'convolution':
        return ConvTokenizer(in_chans, embed_dim, token_dim, soft_splits)
    return T2TModule(tokens_type, in_chans=in_chans, embed_dim=embed_dim, token_dim=token_dim,
                     soft_splits=soft_splits, drop_rate=t2t_drop_rate)


def _feature_info(stages: Sequence[str], strides: Sequence[int], token_dim: int,
                  widths: Sequence[int]) -> List[Dict[str, Any]]:
    """timm's `feature_info`: the tokenizer's stage maps, then every entry of `blocks` at the backbone stride."""
    return [
        dict(module=f'tokens_to_token.{name}', num_chs=token_dim, reduction=math.prod(strides[:i + 1]))
        for i, name in enumerate(stages)
    ] + [dict(module=f'blocks.{i}', num_chs=width, reduction=math.prod(strides)) for i, width in enumerate(widths)]


class T2TViT(nn.Module):
    """Tokenizer (T2T module by default) + class token + frozen sinusoid position table + deep-narrow blocks.

    Args:
        img_size: Input size the position table is built for (int or (H, W)); any size >= 3 px per side works.
        in_chans: Input channels.
        num_classes: Classifier outputs; 0 gives no head.
        global_pool: 'token' (class token, official), 'avg' (mean of the patch tokens) or '' (no pooling).
        tokens_type: 'performer' (T2T-ViT-N), 'transformer' (T2T-ViT_t-N), 'convolution' (T2T-ViT_c-N: three
            convolutions in place of the soft splits) or 'patch' (a ViT patch embedding, no T2T).
        token_dim: Width of the tokens inside the T2T module (64 in the paper); unused by 'patch'.
        soft_splits: (kernel, stride, padding) of the three soft splits; the paper's are (7,4,2), (3,2,1), (3,2,1).
            Unused by 'patch'.
        t2t_drop_rate: Dropout inside the Performer token layers (official: 0.1, not configurable there).
        embed_dim: Width of the tokens entering the backbone (and of the whole backbone, except 'dense').
        depth: Number of blocks (default 12); 'dense' takes its depth from `block_config` instead.
        num_heads, mlp_ratio, qkv_bias: The blocks' attention and MLP.
        drop_rate: Dropout after the position table and inside the blocks (official meaning).
        attn_drop_rate: Attention dropout in the blocks.
        drop_path_rate: Stochastic depth, rising linearly to this value over the blocks.
        dynamic_img_size: Resize the position table to each input's token grid at every call.
        patch_size: Patch side for tokens_type 'patch' (16 as in ViT-S/16).
        block_type: 'vit' (plain), 'se' (squeeze-and-excitation after attention), 'ghost' (half of q/k/v and
            two thirds of the MLP hidden layer from cheap per-channel ops) or 'dense' (DenseNet-style).
        growth_rate, block_config: 'dense' only: channels each block appends, and blocks per stage; a transition
            halves the width between stages, so the final width is not embed_dim.

    Notes:
        The position table is a persistent buffer under the official key `pos_embed`, frozen as in the paper;
        it is resized by 2-D interpolation of its grid part when the input grid differs.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            tokens_type: str = 'performer',
            token_dim: int = 64,
            soft_splits: SoftSplits = SOFT_SPLITS,
            t2t_drop_rate: float = 0.1,
            embed_dim: int = 768,
            depth: Optional[int] = None,
            num_heads: int = 12,
            mlp_ratio: float = 4.,
            qkv_bias: bool = False,
            drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            dynamic_img_size: bool = False,
            patch_size: int = 16,
            block_type: str = 'vit',
            growth_rate: int = 32,
            block_config: Sequence[int] = (3, 4, 6, 3),
    ):
        super().__init__()
        _check_args(global_pool, tokens_type, block_type, depth, embed_dim, num_heads)
        depth = 12 if depth is None else depth
        self.img_size = to_2tuple(img_size)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False

        self.tokens_to_token = _tokenizer(
            tokens_type, in_chans, embed_dim, token_dim, soft_splits, t2t_drop_rate, patch_size)
        self.soft_splits = self.tokens_to_token.soft_splits  # the tokenizer's geometry: (kernel, stride, padding)s
        self.grid_size = token_grid_size(self.img_size, len(self.soft_splits), self.soft_splits)
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # official: a frozen sinusoid table, kept in the state dict under `pos_embed`
        self.register_buffer('pos_embed', sinusoid_table(num_patches + 1, embed_dim), persistent=True)
        self.pos_drop = nn.Dropout(p=drop_rate)
        block_kwargs = dict(
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            proj_drop=drop_rate,
            attn_drop=attn_drop_rate,
            norm_layer=nn.LayerNorm,  # official: eps 1e-5
            act_layer=nn.GELU,
        )
        if block_type == 'dense':
            blocks, widths = _dense_blocks(
                embed_dim, growth_rate, block_config, num_heads, drop_path_rate, **block_kwargs)
        else:
            dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device='cpu')]
            blocks = _vit_blocks(block_type, embed_dim, depth, dpr, num_heads=num_heads, **block_kwargs)
            widths = [embed_dim] * depth
        self.block_type = block_type
        self.blocks = nn.Sequential(*blocks)
        self.num_features = self.head_hidden_size = widths[-1] if widths else embed_dim
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

        strides = [split[1] for split in self.soft_splits]
        self.patch_size = math.prod(strides)  # stride of the backbone grid: 16 with the paper's splits
        self.num_stem_features = len(self.tokens_to_token.stage_modules)  # feature indices before the first block
        self.feature_info = _feature_info(self.tokens_to_token.stage_modules, strides, token_dim, widths)

        trunc_normal_(self.cls_token, std=.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # --- timm model interface -------------------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {'cls_token', 'pos_embed'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for layer-wise LR decay: stem (T2T module, class token), one group per block, norm."""
        return dict(
            stem=r'^cls_token|^pos_embed|^tokens_to_token',
            blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        self.tokens_to_token.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ('token', 'avg', ''):
                raise ValueError(f"global_pool {global_pool!r} is not one of 'token', 'avg', ''")
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    # --- forward ----------------------------------------------------------------------------------------------

    def _check_input(self, x: torch.Tensor) -> None:
        _assert(x.ndim == 4, f'expected a (B, C, H, W) image batch, got {x.ndim} dimensions')
        _assert(x.shape[1] == self.in_chans,
                f'expected {self.in_chans} input channels, got {x.shape[1]}; build the model with in_chans='
                f'{x.shape[1]} to take this input')

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) token map -> (B, 1 + h*w, C): class token prepended, position table added.

        With `dynamic_img_size` the table is resized to each input's grid; otherwise the grid must be the one the
        table was built for (`img_size`).
        """
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C)
        if self.dynamic_img_size:
            pos_embed = resample_abs_pos_embed(
                self.pos_embed, new_size=(H, W), old_size=self.grid_size, num_prefix_tokens=self.num_prefix_tokens)
        else:
            message = (f'input gives a {H}x{W} token grid but the position table is for '
                       f'{self.grid_size[0]}x{self.grid_size[1]} (img_size {self.img_size[0]}x{self.img_size[1]}); '
                       f'build the model with dynamic_img_size=True to resize it per call, or with the new img_size '
                       f'to resize it once when loading weights')
            _assert(H == self.grid_size[0], message)
            _assert(W == self.grid_size[1], message)
            pos_embed = self.pos_embed
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)  # (B, 1 + N, C)
        return self.pos_drop(x + pos_embed.to(x.dtype))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm, (B, 1 + N, embed_dim); the class token comes first."""
        self._check_input(x)
        x = self._pos_embed(self.tokens_to_token(x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool == 'avg':
            return x[:, self.num_prefix_tokens:].mean(dim=1)
        if self.global_pool == 'token':
            return x[:, 0]
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # --- features for dense tasks -----------------------------------------------------------------------------

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Features from the tokenizer's stages, then from every entry of `blocks`; `feature_info` lists them.

        With the T2T module (or the convolution tokenizer) indices 0 and 1 are its two maps (strides 4 and 8 with
        the paper's splits) and 2... the blocks (stride 16); the patch tokenizer has no maps, so 0 is the first
        block. In the dense variant the transitions are entries of `blocks` and widths change along the way.

        Args:
            indices: Take the last n features if int, these features if a sequence, all if None.
            return_prefix_tokens: Return (map, class token) pairs for block features.
            norm: Apply the final norm to block features of the final width (in the dense variant only the last
                block's output has it; the others come out as they are).
            stop_early: Stop after the last block needed.
            output_fmt: 'NCHW' maps or 'NLC' token sequences.
            intermediates_only: Return only the features, not the final tokens.
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt {output_fmt!r} is not one of 'NCHW', 'NLC'")
        self._check_input(x)
        num_stem = self.num_stem_features
        take_indices, max_index = feature_take_indices(num_stem + len(self.blocks), indices)
        B = x.shape[0]

        intermediates: List[Any] = []
        x, maps = self.tokens_to_token.forward_stages(x)
        grid = x.shape[-2:]
        for i, fmap in enumerate(maps):
            if i in take_indices:
                feat = fmap if output_fmt == 'NCHW' else fmap.flatten(2).transpose(1, 2)
                intermediates.append((feat, fmap.new_zeros(B, 0, fmap.shape[1])) if return_prefix_tokens else feat)

        x = self._pos_embed(x)
        blocks = self.blocks if not stop_early else self.blocks[:max(0, max_index - num_stem + 1)]
        for i, blk in enumerate(blocks):
            x = checkpoint(blk, x) if self.grad_checkpointing and not torch.jit.is_scripting() else blk(x)
            if i + num_stem in take_indices:
                y = self.norm(x) if norm and x.shape[-1] == self.num_features else x
                prefix, tokens = y[:, :self.num_prefix_tokens], y[:, self.num_prefix_tokens:]
                if output_fmt == 'NCHW':
                    tokens = tokens.reshape(B, grid[0], grid[1], -1).permute(0, 3, 1, 2)  # (B, C, h, w)
                intermediates.append((tokens, prefix) if return_prefix_tokens else tokens)

        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks (and optionally norm and head) that the requested features do not need.

        When the blocks left end at another width (dense variant) the final norm cannot apply and is dropped too.
        """
        num_stem = self.num_stem_features
        take_indices, max_index = feature_take_indices(num_stem + len(self.blocks), indices)
        kept = max(0, max_index - num_stem + 1)
        self.blocks = self.blocks[:kept]
        width = self.feature_info[num_stem + kept - 1]['num_chs'] if kept else self.embed_dim
        if width != self.num_features and not prune_head:
            raise ValueError(f'the features asked for end at width {width}, where the head takes '
                             f'{self.num_features}; prune with prune_head=True')
        if prune_norm or width != self.num_features:
            self.norm = nn.Identity()
        self.num_features = self.head_hidden_size = width
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices


# --- registry ----------------------------------------------------------------------------------------------------

def _create_t2t_vit(variant: str, pretrained: bool = False, **kwargs) -> T2TViT:
    # features_only default: the tokenizer's two maps and the last block (strides 4, 8, 16 with the paper's splits)
    out_indices = kwargs.pop('out_indices', (0, 1, -1))
    if pretrained:
        kwargs = _read_pretrained(variant, kwargs)
    model = build_model_with_cfg(
        T2TViT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )
    for m in (model, getattr(model, 'model', None)):  # the weights are loaded: keep the cfg small (features_only)
        cfg = getattr(m, 'pretrained_cfg', None)
        if isinstance(cfg, dict):
            cfg.pop('state_dict', None)
    return model


class NoReleasedWeights(InputError, RuntimeError):
    """`pretrained=True` for a tag with no weight source; a RuntimeError too, as timm's own refusal is."""


def _read_pretrained(variant: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Fetch a url or file weight source ourselves: download into timm's cache, read weights-only.

    timm's own url path reads with torch.hub's weights-only loader, which refuses the `argparse.Namespace` that
    every official release carries in `args`; its file path gives no message of ours. The weights go on to timm's
    loader as a state dict, so the filter, the classifier swap and the strict load stay timm's. Hub and local-dir
    sources (safetensors) are left to timm.
    """
    cfg = resolve_pretrained_cfg(
        variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
        pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
    if cfg.source in ('hf-hub', 'local-dir') or cfg.state_dict is not None or cfg.hf_hub_id:
        return kwargs
    if cfg.file:
        where, raw = cfg.file, read_checkpoint(cfg.file)
    elif cfg.url:
        where, raw = download_checkpoint(cfg.url, cache_dir=kwargs.get('cache_dir'))
    else:
        tags = list_pretrained(f'{variant}.*')
        released = f"released weights: {', '.join(tags)}" if tags else f'no weights of {variant} were released'
        raise NoReleasedWeights(
            f'{variant}.{cfg.tag} has no weights to download ({released}). Or pass a local file: '
            f"create_model('{variant}', pretrained=True, pretrained_cfg_overlay=dict(file='PATH.pth.tar'))")
    try:
        state_dict = extract_state_dict(raw)
    except CheckpointError as e:
        raise CheckpointError(f'{where}: {e}') from e
    overlay = dict(kwargs.get('pretrained_cfg_overlay') or {}, state_dict=state_dict)
    return dict(kwargs, pretrained_cfg_overlay=overlay)


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '',
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': None,
        'crop_pct': 0.9,
        'interpolation': 'bicubic',
        'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'tokens_to_token.attention1.kqv',
        'classifier': 'head',
        'license': 'other',
        'paper_ids': 'arXiv:2101.11986',
        'paper_name': 'Tokens-to-Token ViT: Training Vision Transformers from Scratch on ImageNet',
        'origin_url': 'https://github.com/yitu-opensource/T2T-ViT',
        **kwargs,
    }


def _cfg_t(**kwargs) -> Dict[str, Any]:
    """Transformer-token models: their first Linear is the token attention's qkv."""
    return _cfg(first_conv='tokens_to_token.attention1.attn.qkv', **kwargs)


def _cfg_untrained(first_conv: str, **kwargs) -> Dict[str, Any]:
    """Paper ablations the official code never released (nor, for the convolution tokenizer, could run)."""
    return _cfg(first_conv=first_conv, license='mit', **kwargs)


OFFICIAL_RELEASES = 'https://github.com/yitu-opensource/T2T-ViT/releases/download/main/'
MMPRETRAIN_RELEASES = 'https://download.openmmlab.com/mmclassification/v0/t2t-vit/'
_OFFICIAL = dict(license='bsd-3-clause-clear', origin_url='https://github.com/yitu-opensource/T2T-ViT')  # Clear BSD
_MMPRETRAIN = dict(
    license='apache-2.0', origin_url='https://github.com/open-mmlab/mmpretrain/tree/main/configs/t2t_vit')
# official transfer_learning.py: Resize(224) of the 32-px image (bilinear, no crop) and these statistics
_CIFAR = dict(crop_pct=1.0, interpolation='bilinear', mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010))

# Model card data of every released weight file, by tag: what it is, where it came from, what its publisher measured.
RELEASES: Dict[str, Dict[str, Any]] = {}


def _release(tag: str, cfg: Dict[str, Any], file: str, top1: float, dataset: str = 'ImageNet-1k',
             trained: str = 'trained from scratch on ImageNet-1k by the paper\'s authors (official main.py)',
             measured: str = 'official README and paper') -> Dict[str, Any]:
    RELEASES[tag] = dict(url=cfg['url'], file=file, top1=top1, dataset=dataset, trained=trained, measured=measured,
                         license=cfg['license'], origin_url=cfg['origin_url'])
    return dict(cfg, notes=(f'{dataset} top-1 {top1}% ({measured})', trained))


def _official(tag: str, file: str, top1: float, cfg=_cfg, **kwargs) -> Dict[str, Any]:
    return _release(tag, cfg(url=OFFICIAL_RELEASES + file, **dict(_OFFICIAL, **kwargs.pop('cfg_kwargs', {}))),
                    file, top1, **kwargs)


def _cifar(tag: str, file: str, top1: float, num_classes: int) -> Dict[str, Any]:
    base = tag.split('.')[0].replace('t2t_vit_', 'T2T-ViT-')
    return _official(
        tag, file, top1, cfg_kwargs=dict(num_classes=num_classes, **_CIFAR), dataset=f'CIFAR-{num_classes}',
        trained=f'{base} ImageNet-1k weights fine-tuned on CIFAR-{num_classes} resized to 224 px by the paper\'s '
                f'authors (official transfer_learning.py)')


def _mmpretrain(tag: str, file: str, top1: float) -> Dict[str, Any]:
    return _release(tag, _cfg_t(url=MMPRETRAIN_RELEASES + file, **_MMPRETRAIN), file, top1,
                    trained='retrained from scratch on ImageNet-1k by OpenMMLab (mmcls, 8 GPUs x 64, 310 epochs, '
                            'EMA), one to one key mapping to this model',
                    measured='mmpretrain metafile')


_384 = dict(input_size=(3, 384, 384), crop_pct=1.0)
_RELEASED = {
    't2t_vit_7.in1k': ('71.7_T2T_ViT_7.pth.tar', 71.7),
    't2t_vit_10.in1k': ('75.2_T2T_ViT_10.pth.tar', 75.2),
    't2t_vit_12.in1k': ('76.5_T2T_ViT_12.pth.tar', 76.5),
    't2t_vit_14.in1k': ('81.5_T2T_ViT_14.pth.tar', 81.5),
    't2t_vit_19.in1k': ('81.9_T2T_ViT_19.pth.tar', 81.9),
    't2t_vit_24.in1k': ('82.3_T2T_ViT_24.pth.tar', 82.3),
}

default_cfgs = generate_default_cfgs({
    **{tag: _official(tag, file, top1) for tag, (file, top1) in _RELEASED.items()},
    # official eval of this file: main.py --img-size 384 keeps the model cfg's crop_pct 0.9 (resize 426, crop 384)
    't2t_vit_14.in1k_384': _official('t2t_vit_14.in1k_384', '83.3_T2T_ViT_14.pth.tar', 83.3,
                                     cfg_kwargs=dict(input_size=(3, 384, 384)),
                                     trained='trained from scratch on ImageNet-1k at 384 px by the paper\'s authors'),
    't2t_vit_14.in1k_ft_cifar10': _cifar('t2t_vit_14.in1k_ft_cifar10', 'cifar10_t2t-vit_14_98.3.pth', 98.3, 10),
    't2t_vit_14.in1k_ft_cifar100': _cifar('t2t_vit_14.in1k_ft_cifar100', 'cirfar100_t2t-vit-14_88.4.pth', 88.4, 100),
    't2t_vit_19.in1k_384': _cfg(**_384),
    't2t_vit_19.in1k_ft_cifar10': _cifar('t2t_vit_19.in1k_ft_cifar10', 'cifar10_t2t-vit_19_98.4.pth', 98.4, 10),
    't2t_vit_19.in1k_ft_cifar100': _cifar('t2t_vit_19.in1k_ft_cifar100', 'cifar100_t2t-vit-19_89.0.pth', 89.0, 100),
    't2t_vit_24.tl_in1k': _official(
        't2t_vit_24.tl_in1k', '84.2_T2T_ViT_24.pth.tar', 84.2,
        trained='trained on ImageNet-1k with Token Labeling (github.com/zihangJiang/TokenLabeling) by the paper\'s '
                'authors; its auxiliary per-token head (aux_head) is dropped on load'),
    't2t_vit_24.in1k_384': _cfg(**_384),
    't2t_vit_t_14.in1k': _official('t2t_vit_t_14.in1k', '81.7_T2T_ViTt_14.pth.tar', 81.7, cfg=_cfg_t),
    't2t_vit_t_14.mmpretrain_in1k': _mmpretrain(
        't2t_vit_t_14.mmpretrain_in1k', 't2t-vit-t-14_8xb64_in1k_20211220-f7378dd5.pth', 81.83),
    't2t_vit_t_14.in1k_384': _cfg_t(**_384),
    't2t_vit_t_19.in1k': _official('t2t_vit_t_19.in1k', '82.4_T2T_ViTt_19.pth.tar', 82.4, cfg=_cfg_t),
    't2t_vit_t_19.mmpretrain_in1k': _mmpretrain(
        't2t_vit_t_19.mmpretrain_in1k', 't2t-vit-t-19_8xb64_in1k_20211214-7f5e3aaf.pth', 82.63),
    't2t_vit_t_24.in1k': _official('t2t_vit_t_24.in1k', '82.6_T2T_ViTt_24.pth.tar', 82.6, cfg=_cfg_t),
    't2t_vit_t_24.mmpretrain_in1k': _mmpretrain(
        't2t_vit_t_24.mmpretrain_in1k', 't2t-vit-t-24_8xb64_in1k_20211214-b2a68ae3.pth', 82.71),
    't2t_vit_t_24.in1k_384': _cfg_t(**_384),
    # the design study: no weights were released
    't2t_vit_14_resnext.in1k': _cfg(),
    't2t_vit_14_wide.in1k': _cfg(),
    't2t_vit_14_se.in1k': _cfg(),
    't2t_vit_16_ghost.in1k': _cfg(),
    't2t_vit_dense.in1k': _cfg(),
    't2t_vit_c_14': _cfg_untrained('tokens_to_token.soft_split0'),
    't2t_vit_p_14': _cfg_untrained('tokens_to_token.proj'),
    # small images: Fashion-MNIST (1x28x28) and CIFAR (3x32x32)
    't2t_vit_mini.fmnist': _cfg(
        input_size=(1, 28, 28), num_classes=10, crop_pct=1.0, mean=(0.2860,), std=(0.3530,), license='mit'),
    't2t_vit_mini.cifar': _cfg(
        input_size=(3, 32, 32), num_classes=10, crop_pct=1.0, mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616), license='mit'),
})


@register_model
def t2t_vit_7(pretrained: bool = False, **kwargs) -> T2TViT:
    """T2T-ViT-7: Performer tokens, 256 wide, 7 blocks, 4.3M params."""
    model_args = dict(tokens_type='performer', embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.)
    return _create_t2t_vit('t2t_vit_7', pretrained, **dict(model_args, **kwargs))


@register_model
def t2t_vit_10(pretrained: bool = False, **kwargs) -> T2TViT:
    """T2T-ViT-10: Performer tokens, 256 wide, 10 blocks, 5.9M params."""
    model_args = dict(tokens_type='performer', embed_dim=256, depth=10, num_heads=4, mlp_ratio=2.)
    return _create_t2t_vit('t2t_vit_10', pretrained, **dict(model_args, **kwargs))


@register_model
def t2t_vit_12(pretrained: bool = False, **kwargs) -> T2TViT:
    """T2T-ViT-12: Performer tokens, 256 wide, 12 blocks, 6.9M params."""
    model_args = dict(tokens_type='performer', embed_dim=256, depth=12, num_heads=4, mlp_ratio=2.)
    return _create_t2t_vit('t2t_vit_12', pretrained, **dict(model_args, **kwargs))


@register_model
def t2t_vit_14(pretrained: bool = False, **kwargs) -> T2TViT:
    """T2T-ViT-14: Performer tokens, 384 wide, 14 blocks, 21.5M params, 81.5% ImageNet top-1."""
    model_args = dict(tokens_type='performer', embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.)
    return _create_t2t_vit('t2t_vit_14', pretrained, **dict(model_args, **kwargs))


@register_model
def t2t_vit_19(pretrained: bool = False, **kwargs) -> T2TViT:
    """T2T-ViT-19: Performer tokens, 448 wide, 19 blocks, 39.2M params."""
    model_args = dict(tokens_type='performer', embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.)
    return _create_t2t_vit('t2t_vit_19', pretrained, **dict(model_args, **kwargs))


@register_model
def t2t_vit_24(pretrained: bool = False, **kwargs) -> T2TViT:
    """T2T-ViT-24: Performer tokens, 512 wide, 24 blocks, 64.1M params."""
    model_args = dict(tokens_type='performer', embed_dim=512, depth=24, num_heads=8, mlp_ratio=3.)
    return _create_t2t_vit('t2t_vit_24', pretrained, **dict(model_args, **kwargs))


@register_model
def t2t_vit_t_14(pretrained: bool = False, **kwargs) -> T2TViT:
    """T2T-ViT_t-14: transformer tokens, 384 wide, 14 blocks, 21.5M params."""
    model_args = dict(tokens_type='transformer', embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.)
    return _create_t2t_vit('t2t_vit_t_14', pretrained, **dict(model_args, **kwargs))


@register_model
def t2t_vit_t_19(pretrained: bool = False, **kwargs) -> T2TViT:
    """T2T-ViT_t-19: transformer tokens, 448 wide, 19 blocks, 39.2M params."""
    model_args = dict(tokens_type='transformer', embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.)
    return _create_t2t_vit('t2t_vit_t_19', pretrained, **dict(model_args, **kwargs))


@register_model
def t2t_vit_t_24(pretrained: bool = False, **kwargs) -> T2TViT:
    """T2T-ViT_t-24: transformer tokens, 512 wide, 24 blocks, 64.1M params."""
    model_args = dict(tokens_type='transformer', embed_dim=512, depth=24, num_heads=8, mlp_ratio=3.)
    return _create_t2t_vit('t2t_vit_t_24', pretrained, **dict(model_args, **kwargs))


@register_model
def t2t_vit_14_resnext(pretrained: bool = False, **kwargs) -> T2TViT:
    """T2T-ViT-14 with 32 heads of width 12: the paper's ResNeXt-style "more, thinner heads" ablation."""
    model_args = dict(tokens_type='performer', embed_dim=384, depth=14, num_heads=32, mlp_ratio=3.)
    return _create_t2t_vit('t2t_vit_14_resnext', pretrained, **dict(model_args, **kwargs))


@register_model
def t2t_vit_14_wide(pretrained: bool = False, **kwargs) -> T2TViT:
    """Shallow-wide counterpart of T2T-ViT-14 (768 wide, 4 blocks): the paper's wide-vs-deep ablation."""
    model_args = dict(tokens_type='performer', embed_dim=768, depth=4, num_heads=12, mlp_ratio=3.)
    return _create_t2t_vit('t2t_vit_14_wide', pretrained, **dict(model_args, **kwargs))


@register_model
def t2t_vit_14_se(pretrained: bool = False, **kwargs) -> T2TViT:
    """T2T-ViT-14 with squeeze-and-excitation after each block's attention (paper Table 6: SE)."""
    model_args = dict(tokens_type='performer', embed_dim=384, depth=14, num_heads=6, mlp_ratio=3., block_type='se')
    return _create_t2t_vit('t2t_vit_14_se', pretrained, **dict(model_args, **kwargs))


@register_model
def t2t_vit_16_ghost(pretrained: bool = False, **kwargs) -> T2TViT:
    """T2T-ViT with Ghost operations in attention and MLP, 16 blocks as the official builder (paper Table 6)."""
    model_args = dict(
        tokens_type='performer', embed_dim=384, depth=16, num_heads=6, mlp_ratio=3., block_type='ghost')
    return _create_t2t_vit('t2t_vit_16_ghost', pretrained, **dict(model_args, **kwargs))


@register_model
def t2t_vit_dense(pretrained: bool = False, **kwargs) -> T2TViT:
    """T2T-ViT-Dense: 19 dense blocks in stages of 3/6/6/4, growth 64, width 128 -> 584 (paper Table 6)."""
    model_args = dict(
        tokens_type='performer', embed_dim=128, num_heads=8, mlp_ratio=2., block_type='dense', growth_rate=64,
        block_config=(3, 6, 6, 4))
    return _create_t2t_vit('t2t_vit_dense', pretrained, **dict(model_args, **kwargs))


@register_model
def t2t_vit_c_14(pretrained: bool = False, **kwargs) -> T2TViT:
    """T2T-ViT_c-14: three convolutions (kernels 7/3/3, strides 4/2/2) instead of the T2T module (paper Table 7)."""
    model_args = dict(tokens_type='convolution', embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.)
    return _create_t2t_vit('t2t_vit_c_14', pretrained, **dict(model_args, **kwargs))


@register_model
def t2t_vit_p_14(pretrained: bool = False, **kwargs) -> T2TViT:
    """T2T-ViT-14 without T2T: ViT-S/16's patch embedding on the deep-narrow backbone (paper Table 7)."""
    model_args = dict(tokens_type='patch', patch_size=16, embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.)
    return _create_t2t_vit('t2t_vit_p_14', pretrained, **dict(model_args, **kwargs))


# The official classes behind each official builder, as callables taking the official constructor's kwargs.
OFFICIAL_CLASSES = {
    'T2T_ViT': T2TViT,
    'T2T_ViT_SE': partial(T2TViT, block_type='se'),
    'T2T_ViT_Ghost': partial(T2TViT, block_type='ghost'),
    'T2T_ViT_Dense': partial(T2TViT, block_type='dense'),
}


# Soft splits 7/3/3 with strides 2/2/2 (padding 3/1/1): 28 px -> 14x14 -> 7x7 -> a 4x4 grid (32 px: 16, 8, 4)
# where the paper's stride-4 first split would leave a 1x1 grid. Each split still overlaps its neighbours, the
# first keeps the paper's 7x7 kernel, and the last stride of 2 keeps the backbone at 16 tokens, so it stays cheap.
SMALL_IMAGE_SOFT_SPLITS = ((7, 2, 3), (3, 2, 1), (3, 2, 1))


@register_model
def t2t_vit_mini(pretrained: bool = False, **kwargs) -> T2TViT:
    """T2T-ViT for 28-32 px images (Fashion-MNIST, CIFAR): soft splits 7/3/3 with strides 2/2/2, 128 wide, 4 deep."""
    model_args = dict(
        tokens_type='performer', soft_splits=SMALL_IMAGE_SOFT_SPLITS, token_dim=32, embed_dim=128, depth=4,
        num_heads=4, mlp_ratio=2.)
    return _create_t2t_vit('t2t_vit_mini', pretrained, **dict(model_args, **kwargs))
