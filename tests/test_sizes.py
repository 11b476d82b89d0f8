"""What the official code got wrong: input sizes, resolutions, channel counts; and fast paths that keep the numbers."""
from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed

import t2tvit
from t2tvit.models import T2TViT, TokenPerformer, token_grid_size
from t2tvit.models.layers import (
    FAST_PATHS, OneDNNLinear, fast_path_default, onednn_available, patch_major_order, set_fast_paths, soft_split)

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


def test_wrong_channel_count_is_named():
    model = T2TViT(**TINY)
    with pytest.raises(ValueError, match=r'expected input of shape \(B, 3, H, W\), got \(1, 1, 32, 32\).*in_chans=1'):
        model(torch.randn(1, 1, 32, 32))


def test_fixed_size_model_names_the_fix_for_another_size():
    model = T2TViT(**TINY)
    with pytest.raises(ValueError, match='dynamic_img_size=True'):
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
    emb, m = layer.out_dim, layer.num_features

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
        torch.testing.assert_close(layer.attention(x), _official_performer_attention(layer, x), rtol=0, atol=1e-5)


def test_performer_keeps_float32_islands_under_autocast(monkeypatch):
    torch.manual_seed(0)
    model = T2TViT(**TINY).eval()
    seen = []
    original = TokenPerformer.random_features

    def spy(self, x):
        out = original(self, x)
        seen.append((x.dtype, out.dtype))
        return out

    monkeypatch.setattr(TokenPerformer, 'random_features', spy)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = model(x)
    assert seen and all(d == (torch.float32, torch.float32) for d in seen)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), reference, rtol=0.05, atol=0.05)


def test_model_cast_to_bfloat16_runs():
    model = T2TViT(**TINY).eval().to(torch.bfloat16)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


# --- fast paths: same numbers, switchable for A/B timing ---------------------------------------------------------

@pytest.mark.parametrize('shape,split', [((2, 3, 32, 32), (7, 4, 2)), ((2, 5, 13, 9), (3, 2, 1)),
                                         ((1, 4, 8, 8), (3, 1, 1)), ((1, 2, 10, 7), (2, 3, 0))])
def test_soft_split_is_unfold_bit_for_bit(shape, split):
    x = torch.randn(shape)
    kernel, stride, padding = split
    expected = torch.nn.Unfold(kernel, stride=stride, padding=padding)(x).transpose(1, 2)
    assert torch.equal(soft_split(x, *split), expected)
    assert torch.equal(soft_split(x.contiguous(memory_format=torch.channels_last), *split), expected)
    order = patch_major_order(shape[1], kernel)
    assert torch.equal(soft_split(x, *split, patch_major=True), expected[..., order])


@pytest.mark.parametrize('tokens_type', ['performer', 'transformer'])
def test_fast_paths_keep_outputs_and_gradients(tokens_type):
    torch.manual_seed(0)
    fast = T2TViT(tokens_type=tokens_type, **TINY)
    fast.tokens_to_token.chunk_tokens = 1  # batch_chunks engaged: one image per chunk
    plain = set_fast_paths(T2TViT(tokens_type=tokens_type, **TINY), **{name: False for name in FAST_PATHS})
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(2, 3, 32, 32)
    outs, grads = [], []
    for model in (fast, plain):
        model.eval()
        out = model(x)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-5)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_set_fast_paths_switches_every_module_and_refuses_unknown_names():
    model = T2TViT(tokens_type='transformer', **TINY)
    set_fast_paths(model, fused_attn=False, strided_unfold=False)
    assert not model.tokens_to_token.strided_unfold and model.tokens_to_token.conv_project
    assert not model.tokens_to_token.attention1.attn.fused_attn and not model.blocks[0].attn.fused_attn
    with pytest.raises(ValueError, match='unknown fast paths.*strided_unfold'):
        set_fast_paths(model, strided=False)


def test_environment_turns_fast_paths_off_for_new_models(monkeypatch):
    monkeypatch.setenv('T2TVIT_SLOW_PATHS', 'conv_project,fused_attn')
    model = T2TViT(tokens_type='transformer', **TINY)
    assert not model.tokens_to_token.conv_project and model.tokens_to_token.strided_unfold
    assert not model.tokens_to_token.attention1.attn.fused_attn and not model.blocks[1].attn.fused_attn
    monkeypatch.setenv('T2TVIT_SLOW_PATHS', 'all')
    assert not any(fast_path_default(name) for name in FAST_PATHS)
    monkeypatch.setenv('T2TVIT_SLOW_PATHS', 'conv_projection')
    with pytest.raises(ValueError, match="T2TVIT_SLOW_PATHS names \\['conv_projection'\\]; known fast paths"):
        T2TViT(**TINY)


def test_batch_chunks_only_in_eager_cpu_runs_and_leave_traces_batch_free():
    """Chunks follow the batch size, so traced and exported graphs must not contain them."""
    torch.manual_seed(0)
    model = T2TViT(**TINY).eval()
    t2t = model.tokens_to_token
    t2t.chunk_tokens = 1
    x2, x3 = torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)
    assert t2t._num_chunks(x3) == 3
    t2t.chunk_tokens = 2 * 8 * 8  # two images' first-stage tokens (8x8 at 32 px)
    assert t2t._num_chunks(x3) == 2 and t2t._num_chunks(x2) == 1
    set_fast_paths(model, batch_chunks=False)
    assert t2t._num_chunks(x3) == 1
    set_fast_paths(model, batch_chunks=True)
    t2t.chunk_tokens = 1
    with torch.no_grad():
        expected = model(x3)
        traced = torch.jit.trace(model, x2, check_trace=False)
        torch.testing.assert_close(traced(x3), expected, rtol=0, atol=1e-5)
        batch = torch.export.Dim('batch', min=1, max=64)
        exported = torch.export.export(model, (x2,), dynamic_shapes=({0: batch},))
        torch.testing.assert_close(exported.module()(x3), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize('patch_major', [False, True])
@pytest.mark.parametrize('shape,split', [((2, 5, 13, 9), (3, 2, 1)), ((1, 3, 32, 32), (7, 4, 2)),
                                         ((2, 4, 10, 7), (2, 3, 0))])
def test_soft_split_gradient_is_unfold_gradient(shape, split, patch_major):
    """Training takes the fold backward; its gradient is Unfold's (overlaps summed), in any memory format."""
    kernel, stride, padding = split
    x = torch.randn(shape, dtype=torch.float64)
    grad = torch.randn_like(soft_split(x, *split, patch_major=patch_major))
    plain = x.clone().requires_grad_()
    expected_out = torch.nn.Unfold(kernel, stride=stride, padding=padding)(plain).transpose(1, 2)
    if patch_major:
        expected_out = expected_out[..., patch_major_order(shape[1], kernel)]
    expected, = torch.autograd.grad(expected_out, plain, grad)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        fast = x.clone().contiguous(memory_format=memory_format).requires_grad_()
        out = soft_split(fast, *split, patch_major=patch_major)
        assert out.grad_fn is not None and 'SoftSplitWithFoldBackward' in type(out.grad_fn).__name__
        assert torch.equal(out, expected_out)
        got, = torch.autograd.grad(out, fast, grad)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: soft_split(t, *split, patch_major=patch_major),
                                    (x[:1, :2].clone().requires_grad_(),))


@pytest.mark.parametrize('block_type', ['vit', 'se', 'ghost'])
def test_bf16_cpu_attn_takes_explicit_products_only_under_cpu_bf16_autocast(block_type, monkeypatch):
    torch.manual_seed(0)
    model = T2TViT(block_type=block_type, **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, 'scaled_dot_product_attention',
                        lambda *a, **k: calls.append(a[0].shape) or sdpa(*a, **k))
    depth = len(model.blocks)

    def block_sdpa_calls(**fast) -> int:
        set_fast_paths(model, **fast)
        calls.clear()
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
            model(x)
        return sum(1 for shape in calls if shape[1] > 1)  # the blocks' multi-head calls, not the token layers'

    assert block_sdpa_calls(bf16_cpu_attn=True) == 0
    assert block_sdpa_calls(bf16_cpu_attn=False) == depth
    calls.clear()
    with torch.no_grad():
        fp32 = model(x)  # outside autocast the fused kernel stays
    assert sum(1 for shape in calls if shape[1] > 1) == depth
    set_fast_paths(model, bf16_cpu_attn=True)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        torch.testing.assert_close(model(x).float(), fp32, rtol=0, atol=0.1)


@pytest.mark.skipif(not onednn_available(), reason='this PyTorch has no oneDNN')
@pytest.mark.parametrize('variant', [dict(tokens_type='performer'), dict(tokens_type='transformer'),
                                     dict(tokens_type='performer', block_type='se'),
                                     dict(tokens_type='performer', block_type='ghost')])
def test_onednn_linear_takes_every_product_where_it_can_and_keeps_the_numbers(variant, monkeypatch):
    """Every Linear of the blocks and token layers runs on oneDNN: fused with GELU / residual in inference (fp32
    and bf16 autocast), by the autograd function in fp32 training; none under fp16 autocast or in a trace."""
    from t2tvit.models import blocks, layers
    calls, trained = [], []
    fused, function = layers.fused_linear, layers._OneDNNLinearFunction.apply

    def counted(*args, **kwargs):
        calls.append((kwargs.get('gelu', False), kwargs.get('add') is not None))
        return fused(*args, **kwargs)

    monkeypatch.setattr(layers, 'fused_linear', counted)
    monkeypatch.setattr(blocks, 'fused_linear', counted)
    monkeypatch.setattr(layers._OneDNNLinearFunction, 'apply', lambda *a: trained.append(1) or function(*a))
    torch.manual_seed(0)
    model = T2TViT(**variant, **TINY).eval()
    linears = [m for m in (*model.tokens_to_token.modules(), *model.blocks.modules()) if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m, OneDNNLinear) for m in linears)
    linears.remove(model.tokens_to_token.project)  # runs as a convolution (`conv_project`)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        fast = model(x)
        calls_on = list(calls)
        set_fast_paths(model, onednn_linear=False)
        calls.clear()
        plain = model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            plain_bf16 = model(x)
    assert not calls
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-5)
    depth = len(model.blocks)
    block_type = variant.get('block_type', 'vit')
    assert len(calls_on) == len(linears)  # each product once, with what follows it inside where it can be
    assert sum(gelu for gelu, _ in calls_on) == 2 + (depth if block_type != 'ghost' else 0)
    assert sum(add for _, add in calls_on) == 2 * 2 + {'vit': 2, 'se': 1, 'ghost': 0}[block_type] * depth
    set_fast_paths(model, onednn_linear=True)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        calls.clear()
        fast_bf16 = model(x)  # bf16 products as autocast's, the float32 residual stream kept
    assert len(calls) == len(linears) and fast_bf16.dtype == plain_bf16.dtype
    torch.testing.assert_close(fast_bf16.float(), plain_bf16.float(), rtol=0, atol=0.05)
    calls.clear()
    model(x).sum().backward()  # autograd: the products by the autograd function, nothing fused
    assert not calls and len(trained) == len(linears)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.float16):
        model(x)
    with torch.no_grad():
        torch.jit.trace(model, x, check_trace=False)
    assert not calls and len(trained) == len(linears)
    seen = []  # a hook on a layer inside a block or token layer still runs
    for layer in (model.blocks[0].mlp.fc1, model.tokens_to_token.attention1.mlp[0] if variant.get('tokens_type') ==
                  'performer' else model.tokens_to_token.attention1.mlp.fc1):
        layer.register_forward_hook(lambda *_: seen.append(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain, rtol=0, atol=1e-5)
    assert len(seen) == 2 and len(calls) == len(linears)  # the hooked layers' own products, unfused


@pytest.mark.skipif(not onednn_available(), reason='this PyTorch has no oneDNN')
@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('input_grad', [True, False])
def test_onednn_linear_training_gradients_are_linear_gradients(bias, input_grad):
    torch.manual_seed(0)
    plain = nn.Linear(24, 40, bias=bias)
    fast = OneDNNLinear.from_linear(copy.deepcopy(plain))
    assert set(fast.state_dict()) == set(plain.state_dict())
    x = torch.randn(3, 7, 24)
    grad = torch.randn(3, 7, 40)
    results = []
    for layer in (plain, fast):
        inp = x.clone().requires_grad_(input_grad)
        out = layer(inp)
        out.backward(grad)
        results.append((out, inp.grad, [p.grad for p in layer.parameters()]))
        layer.zero_grad()
    (out0, gx0, gp0), (out1, gx1, gp1) = results
    assert '_OneDNNLinearFunction' in type(out1.grad_fn.next_functions[0][0]).__name__  # (a view of its rows)
    torch.testing.assert_close(out1, out0, rtol=1e-5, atol=1e-5)
    if input_grad:
        torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-5)
    else:
        assert gx1 is None
    for a, b in zip(gp1, gp0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
