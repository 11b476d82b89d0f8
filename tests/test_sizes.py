"""What the official code got wrong: input sizes, resolutions, channel counts."""
from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed

import t2tvit
from t2tvit.models import T2TViT, TokenPerformer, layers, token_grid_size
from t2tvit.models.layers import performer_attention

TINY = dict(img_size=32, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2., token_dim=8, num_classes=4)


@pytest.mark.parametrize('tokens_type', ['performer', 'transformer'])
@pytest.mark.parametrize('size', [(3, 3), (17, 17), (50, 31), (64, 64), (100, 37), (225, 201)])
def test_any_input_size_and_aspect_ratio(tokens_type, size):
    model = T2TViT(tokens_type=tokens_type, **dict(TINY, img_size=size)).eval()
    h, w = token_grid_size(size)
    assert h >= 1 and w >= 1
    tokens = model.forward_features(torch.randn(1, 3, *size))
    assert tokens.shape == (1, 1 + h * w, 32)
    assert torch.isfinite(tokens).all()


def test_grid_follows_the_unfold_arithmetic():
    assert token_grid_size((224, 224)) == (14, 14)
    assert token_grid_size((384, 384)) == (24, 24)
    assert token_grid_size((230, 100)) == (15, 7)  # not multiples of 16: the official reshape crashed here
    x = torch.randn(1, 3, 230, 100)
    for splits, (k, s, p) in zip((1, 2, 3), ((7, 4, 2), (3, 2, 1), (3, 2, 1))):
        x = torch.nn.functional.unfold(x, k, stride=s, padding=p)  # (1, C*k*k, L)
        h, w = token_grid_size((230, 100), splits)
        assert x.shape[-1] == h * w
        x = torch.randn(1, 2, h, w)


def test_too_small_input_is_refused_with_the_minimum():
    with pytest.raises(ValueError, match='use at least 3x3'):
        T2TViT(**dict(TINY, img_size=2))
    model = T2TViT(**dict(TINY, dynamic_img_size=True))
    with pytest.raises(AssertionError, match='input height 2 leaves no tokens; use at least 3 pixels'):
        model(torch.randn(1, 3, 2, 8))


def test_wrong_channel_count_is_named():
    model = T2TViT(**TINY)
    with pytest.raises(AssertionError, match=r'expected 3 input channels, got 1; .*in_chans=1'):
        model(torch.randn(1, 1, 32, 32))


def test_fixed_size_model_names_the_fix_for_another_size():
    model = T2TViT(**TINY)
    with pytest.raises(AssertionError, match='4x4 token grid but the position table is for 2x2.*dynamic_img_size=True'):
        model(torch.randn(1, 3, 64, 64))


def test_dynamic_img_size_resizes_the_table_per_call():
    torch.manual_seed(0)
    model = T2TViT(**dict(TINY, dynamic_img_size=True)).eval()
    with torch.no_grad():
        same = model(torch.randn(2, 3, 32, 32))
        other = model(torch.randn(2, 3, 64, 48))
    assert same.shape == other.shape == (2, 4)
    # at its own size the table is used as is
    fixed = T2TViT(**TINY).eval()
    fixed.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fixed(x), model(x), rtol=0, atol=0)


def test_224_checkpoint_into_384_model_resizes_grid_part_and_keeps_cls():
    small = timm.create_model('t2t_vit_7').eval()
    large = t2tvit.create_model('t2t_vit_7', img_size=384).eval()
    t2tvit.load_checkpoint(large, small.state_dict())
    assert large.pos_embed.shape == (1, 1 + 24 * 24, 256)
    torch.testing.assert_close(large.pos_embed[:, :1], small.pos_embed[:, :1], rtol=0, atol=0)
    expected = resample_abs_pos_embed(small.pos_embed, new_size=[24, 24], old_size=[14, 14], num_prefix_tokens=1)
    torch.testing.assert_close(large.pos_embed, expected)
    # per call (dynamic) and once at load give the same model at 384
    dynamic = timm.create_model('t2t_vit_7', dynamic_img_size=True).eval()
    dynamic.load_state_dict(small.state_dict())
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        torch.testing.assert_close(large(x), dynamic(x), rtol=1e-5, atol=1e-5)


def test_grey_model_from_rgb_performer_weights_is_exact(fixtures_dir, tiny_configs):
    """A 1-channel model loaded from 3-channel weights equals the 3-channel model on the grey image repeated."""
    kwargs = tiny_configs['tiny_performer']['kwargs']
    rgb = T2TViT(**kwargs).eval()
    t2tvit.load_checkpoint(rgb, fixtures_dir / 'official' / 'tiny_performer.pth.tar')
    grey = T2TViT(**dict(kwargs, in_chans=1)).eval()
    t2tvit.load_checkpoint(grey, fixtures_dir / 'official' / 'tiny_performer.pth.tar')
    assert grey.tokens_to_token.attention1.kqv.weight.shape == (48, 49)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(grey(x), rgb(x.repeat(1, 3, 1, 1)), rtol=0, atol=1e-5)


def test_grey_model_from_rgb_transformer_weights_beats_plain_channel_sum(fixtures_dir, tiny_configs):
    """Token-transformer qkv has no bias, so the norm's per-channel shift is refitted by least squares."""
    kwargs = tiny_configs['tiny_transformer']['kwargs']
    path = fixtures_dir / 'official' / 'tiny_transformer.pth.tar'
    rgb = t2tvit.load_checkpoint(T2TViT(**kwargs).eval(), path)
    grey = t2tvit.load_checkpoint(T2TViT(**dict(kwargs, in_chans=1)).eval(), path)
    naive = T2TViT(**dict(kwargs, in_chans=1)).eval()
    sd = t2tvit.models.extract_state_dict(t2tvit.models.read_checkpoint(path))
    w = sd['tokens_to_token.attention1.attn.qkv.weight']
    sd['tokens_to_token.attention1.attn.qkv.weight'] = w.reshape(w.shape[0], 3, 49).sum(1)
    for name in ('weight', 'bias'):
        sd[f'tokens_to_token.attention1.norm1.{name}'] = sd[f'tokens_to_token.attention1.norm1.{name}'].reshape(
            3, 49).mean(0)
    naive.load_state_dict(sd)
    x = torch.randn(4, 1, 64, 64)
    with torch.no_grad():
        reference = rgb(x.repeat(1, 3, 1, 1))
        ours, plain = (grey(x) - reference).abs().mean(), (naive(x) - reference).abs().mean()
    assert ours < plain


@pytest.mark.parametrize('tokens_type', ['performer', 'transformer'])
def test_rgb_weights_into_four_channels(tokens_type):
    rgb = T2TViT(tokens_type=tokens_type, **TINY)
    four = t2tvit.load_checkpoint(T2TViT(tokens_type=tokens_type, in_chans=4, **TINY), rgb.state_dict())
    assert four.tokens_to_token.attention1.norm1.weight.shape == (4 * 49,)
    assert torch.isfinite(four(torch.randn(1, 4, 32, 32))).all()


@pytest.mark.parametrize('variant', [dict(tokens_type='performer'), dict(tokens_type='transformer'),
                                     dict(block_type='se'), dict(block_type='ghost')], ids=str)
def test_sdpa_and_explicit_attention_agree(variant):
    torch.manual_seed(0)
    model = T2TViT(**variant, **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = model(x)
        for module in model.modules():
            if hasattr(module, 'fused_attn'):
                module.fused_attn = False
        explicit = model(x)
    torch.testing.assert_close(fused, explicit, rtol=0, atol=1e-5)


def _official_performer_attention(layer: TokenPerformer, x: torch.Tensor) -> torch.Tensor:
    """The paper's FAVOR+ step written the official way (einsum and repeat), as the reference."""
    emb, m = layer.out_dim, layer.num_random_features

    def prm_exp(t):
        xd = ((t * t).sum(dim=-1, keepdim=True)).repeat(1, 1, m) / 2
        wtx = torch.einsum('bti,mi->btm', t.float(), layer.w)
        return torch.exp(wtx - xd) / math.sqrt(m)

    k, q, v = torch.split(layer.kqv(x), emb, dim=-1)
    kp, qp = prm_exp(k), prm_exp(q)
    D = torch.einsum('bti,bi->bt', qp, kp.sum(dim=1)).unsqueeze(dim=2)
    kptv = torch.einsum('bin,bim->bnm', v.float(), kp)
    y = torch.einsum('bti,bni->btn', qp, kptv) / (D.repeat(1, 1, emb) + 1e-8)
    return v + layer.proj(y)


def test_performer_without_repeats_matches_official_math():
    torch.manual_seed(0)
    layer = TokenPerformer(dim=147, out_dim=64).eval()
    x = layer.norm1(torch.randn(2, 300, 147))
    with torch.no_grad():
        k, q, v = layer.kqv(x).split(layer.out_dim, dim=-1)
        ours = v + layer.proj(performer_attention(k, q, v, layer.w, layer.eps))
        torch.testing.assert_close(ours, _official_performer_attention(layer, x), rtol=0, atol=1e-5)


def test_performer_keeps_float32_islands_under_autocast(monkeypatch):
    torch.manual_seed(0)
    model = T2TViT(**TINY).eval()
    seen = []

    def spy(k, q, v, w, eps):
        out = performer_attention(k, q, v, w, eps)
        seen.append((k.dtype, out.dtype))
        return out

    monkeypatch.setattr(layers, 'performer_attention', spy)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = model(x)
    assert seen[:2] == [(torch.float32, torch.float32)] * 2  # fp32 run: both token layers
    assert seen[2:] == [(torch.bfloat16, torch.float32)] * 2  # bf16 products in, the kernel math in float32
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), reference, rtol=0.05, atol=0.05)


def test_model_cast_to_bfloat16_runs():
    model = T2TViT(**TINY).eval().to(torch.bfloat16)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
