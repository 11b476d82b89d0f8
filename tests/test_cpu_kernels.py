"""`t2tvit.use_cpu_kernels`: CPU kernels that keep the plain model's numbers and step aside for every tool."""
import copy
import math

import pytest
import torch
import torch.nn as nn

from t2tvit import cpu_kernels, use_cpu_kernels
from t2tvit.cpu_kernels import (
    CPU_KERNELS, CPUKernelError, OneDNNLinear, cpu_kernel_state, onednn_available, patch_major_order, soft_split)
from t2tvit.models import T2TViT

TINY = dict(img_size=32, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2., token_dim=8, num_classes=4)


@pytest.fixture(autouse=True)
def every_kernel(monkeypatch):
    """Every kernel on, whatever this host's plan (no profile turns on all of them): these tests hold each kernel
    to the plain forward (tests/test_host_kernels.py checks each profile's choice)."""
    monkeypatch.setattr(cpu_kernels, 'planned_kernels', lambda profile=None: tuple(CPU_KERNELS))


@pytest.fixture(autouse=True)
def fresh_compile_caches():
    """The compile tests here leave no graphs behind: every model is the same forward code, and other files' tests
    compile it with `fullgraph=True`, which fails past dynamo's recompile limit."""
    yield
    torch._dynamo.reset()


def _pair(**kwargs):
    """A plain model and the same weights with every CPU kernel, the T2T module one image per chunk."""
    torch.manual_seed(0)
    plain = T2TViT(**TINY, **kwargs)
    fast = use_cpu_kernels(copy.deepcopy(plain))
    if hasattr(fast.tokens_to_token, 'chunk_tokens'):
        fast.tokens_to_token.chunk_tokens = 1  # batch_chunks and page_chunks engaged
        fast.tokens_to_token.page_bytes = 1
    return plain, fast


@pytest.mark.parametrize('shape,split', [((2, 3, 32, 32), (7, 4, 2)), ((2, 5, 13, 9), (3, 2, 1)),
                                         ((1, 4, 8, 8), (3, 1, 1)), ((1, 2, 10, 7), (2, 3, 0))])
def test_strided_soft_split_is_unfold_bit_for_bit(shape, split):
    x = torch.randn(shape)
    kernel, stride, padding = split
    expected = torch.nn.Unfold(kernel, stride=stride, padding=padding)(x).transpose(1, 2)
    assert torch.equal(soft_split(x, *split), expected)
    assert torch.equal(soft_split(x.contiguous(memory_format=torch.channels_last), *split), expected)
    order = patch_major_order(shape[1], kernel)
    assert torch.equal(soft_split(x, *split, patch_major=True), expected[..., order])


@pytest.mark.parametrize('variant', [dict(tokens_type='performer'), dict(tokens_type='transformer'),
                                     dict(block_type='se'), dict(block_type='ghost'), dict(block_type='dense',
                                     depth=None, embed_dim=16, growth_rate=8, block_config=(1, 1))])
def test_kernels_keep_outputs_and_gradients(variant):
    kwargs = dict(variant)
    if kwargs.pop('depth', 0) is None:
        plain_kwargs = {k: v for k, v in TINY.items() if k != 'depth'}
        torch.manual_seed(0)
        plain = T2TViT(**dict(plain_kwargs, **kwargs))
        fast = use_cpu_kernels(copy.deepcopy(plain))
        fast.tokens_to_token.chunk_tokens = 1
        fast.tokens_to_token.page_bytes = 1
    else:
        plain, fast = _pair(**kwargs)
    assert fast.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, 3, 32, 32)
    outs, grads = [], []
    for model in (fast, plain):
        model.eval()
        with torch.no_grad():
            inference = model(x)
        out = model(x)
        torch.testing.assert_close(inference, out.detach(), rtol=0, atol=1e-5)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-5)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_use_cpu_kernels_swaps_layers_in_place_and_refuses_unknown_names():
    plain, fast = _pair(tokens_type='transformer')
    assert type(fast.tokens_to_token).__name__ == 'CPUT2TModule'
    assert type(fast.blocks[0]).__name__ == 'CPUBlock' and type(fast.blocks[0].attn).__name__ == 'CPUAttention'
    assert type(plain.blocks[0]).__name__ == 'Block'  # the copy it came from is untouched
    expected = {name: True for name in CPU_KERNELS}
    expected.update(performer_fusion=False, onednn_linear=onednn_available(),  # transformer tokens: no Performer
                    packed_weights=onednn_available())
    assert cpu_kernel_state(fast) == expected
    use_cpu_kernels(fast, exclude=('onednn_linear', 'batch_chunks'))
    state = cpu_kernel_state(fast)
    assert not state['onednn_linear'] and not state['batch_chunks'] and state['strided_unfold']
    assert not any(isinstance(m, OneDNNLinear) for m in fast.modules())
    assert use_cpu_kernels(fast) is fast
    with pytest.raises(CPUKernelError, match=r"unknown CPU kernels \['strided'\]; known: strided_unfold"):
        use_cpu_kernels(fast, exclude=('strided',))


def test_kernels_step_aside_for_traces_exports_and_compile():
    """Chunks follow the batch size and oneDNN products are eager-only: traced and exported graphs hold the plain
    computation, and a compiled one (its soft splits as ops, `compiled_splits`) the same values."""
    plain, fast = _pair()
    fast.eval()
    plain.eval()
    t2t = fast.tokens_to_token
    x2, x3 = torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)
    assert t2t._num_chunks(x3) == 3
    t2t.chunk_tokens, t2t.page_bytes = 2 * 8 * 8, 2 ** 20  # two images' first-stage tokens (8x8 at 32 px)
    assert t2t._num_chunks(x3) == 2 and t2t._num_chunks(x2) == 1
    t2t.chunk_tokens = t2t.page_bytes = 1
    with torch.no_grad():
        expected = plain(x3)
        torch.testing.assert_close(fast(x3), expected, rtol=0, atol=1e-5)
        traced = torch.jit.trace(fast, x2, check_trace=False)
        torch.testing.assert_close(traced(x3), expected, rtol=0, atol=1e-5)
        batch = torch.export.Dim('batch', min=1, max=64)
        exported = torch.export.export(fast, (x2,), dynamic_shapes=({0: batch},))
        assert 'mkldnn' not in str(exported.graph)
        torch.testing.assert_close(exported.module()(x3), expected, rtol=0, atol=1e-5)
        assert 't2tvit' not in str(exported.graph)  # compiled_splits is for torch.compile only
        compiled = torch.compile(fast, backend='aot_eager')
        torch.testing.assert_close(compiled(x3), expected, rtol=0, atol=1e-5)


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


def _record_sdpa_shapes(monkeypatch) -> list:
    """The query shape of every call of F.scaled_dot_product_attention from now on (the call still runs)."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, 'scaled_dot_product_attention',
                        lambda *a, **k: calls.append(a[0].shape) or sdpa(*a, **k))
    return calls


def _block_calls(calls: list) -> list:
    """Of the recorded query shapes, the blocks' multi-head calls (not the token layers' single-head ones)."""
    return [shape for shape in calls if shape[1] > 1]


@pytest.mark.parametrize('block_type', ['vit', 'se', 'ghost'])
def test_bf16_cpu_attention_takes_explicit_products_only_under_cpu_bf16_autocast(block_type, monkeypatch):
    plain, model = _pair(block_type=block_type)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    calls = _record_sdpa_shapes(monkeypatch)
    depth = len(model.blocks)

    def block_sdpa_calls(**kernels) -> int:
        use_cpu_kernels(model, **kernels)
        calls.clear()
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
            model(x)
        return len(_block_calls(calls))

    assert block_sdpa_calls(exclude=('short_attn',)) == 0
    assert block_sdpa_calls(exclude=('bf16_cpu_attn', 'short_attn')) == depth
    calls.clear()
    with torch.no_grad():
        fp32 = model(x)  # outside autocast the fused kernel stays (short_attn, off here, would take it away)
    assert len(_block_calls(calls)) == depth
    use_cpu_kernels(model)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        torch.testing.assert_close(model(x).float(), fp32, rtol=0, atol=0.1)


@pytest.mark.parametrize('block_type', ['vit', 'se', 'ghost'])
def test_short_attention_takes_explicit_products_only_for_short_sequences(block_type, monkeypatch):
    """`short_attn`: the blocks' attention as explicit products in eager fp32 runs while a sequence has at most
    SHORT_ATTN_TOKENS tokens, the fused kernel above that and wherever the kernel is off."""
    plain, model = _pair(block_type=block_type)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    calls = _record_sdpa_shapes(monkeypatch)
    depth = len(model.blocks)
    tokens = model.pos_embed.shape[1]  # the blocks' sequence: the class token and the T2T module's tokens

    def block_sdpa_calls(kernels) -> int:
        use_cpu_kernels(model, kernels=kernels)
        calls.clear()
        with torch.no_grad():
            model(x)
        assert {shape[2] for shape in _block_calls(calls)} <= {tokens}
        return len(_block_calls(calls))

    assert block_sdpa_calls(('short_attn',)) == 0
    assert block_sdpa_calls(()) == depth
    monkeypatch.setattr(cpu_kernels, 'SHORT_ATTN_TOKENS', tokens)  # at the bound: still explicit
    assert block_sdpa_calls(('short_attn',)) == 0
    monkeypatch.setattr(cpu_kernels, 'SHORT_ATTN_TOKENS', tokens - 1)  # one token past it: the fused kernel
    assert block_sdpa_calls(('short_attn',)) == depth
    monkeypatch.setattr(cpu_kernels, 'SHORT_ATTN_TOKENS', 10 ** 6)
    with torch.no_grad():  # traced, the model's own computation: the fused kernel in every block
        traced = torch.jit.trace(use_cpu_kernels(copy.deepcopy(plain).eval(), kernels=('short_attn',)), x)
    assert str(traced.inlined_graph).count('aten::scaled_dot_product_attention') == depth


@pytest.mark.parametrize('block_type', ['vit', 'se', 'ghost'])
def test_short_attention_keeps_outputs_and_gradients(block_type):
    """`short_attn` alone, in training (dropout off in these layers): the plain model's outputs and gradients
    within fp32 rounding."""
    plain, model = _pair(block_type=block_type)
    use_cpu_kernels(model, kernels=('short_attn',))
    x = torch.randn(2, 3, 32, 32)
    outputs, grads = [], []
    for m in (model, plain):
        m.train()
        out = m(x)
        out.sum().backward()
        outputs.append(out)
        grads.append({n: p.grad for n, p in m.blocks.named_parameters()})
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=5e-5, msg=name)  # |grad| < 0.1


@pytest.mark.parametrize('block_type', ['vit', 'se', 'ghost'])
def test_bf16_cpu_attention_train_takes_explicit_products_only_where_a_backward_follows(block_type, monkeypatch):
    """`bf16_cpu_attn_train` alone: the fused kernel in bf16 inference (no gradients), explicit products in bf16
    training, with the plain model's outputs and gradients (to bf16 rounding)."""
    plain, model = _pair(block_type=block_type)
    use_cpu_kernels(model, kernels=('bf16_cpu_attn_train',))
    x = torch.randn(2, 3, 32, 32)
    calls = _record_sdpa_shapes(monkeypatch)
    depth = len(model.blocks)

    model.eval()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        model(x)
    assert len(_block_calls(calls)) == depth
    calls.clear()
    outputs, grads = [], []
    for m in (model, plain):
        m.train()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = m(x)
        out.float().sum().backward()
        outputs.append(out.float())
        grads.append(next(m.blocks[0].attn.parameters()).grad)
        if m is model:
            assert len(_block_calls(calls)) == 0
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0.1)
    torch.testing.assert_close(grads[0], grads[1], rtol=0.1, atol=0.1)


@pytest.mark.skipif(not onednn_available(), reason='this PyTorch has no oneDNN')
@pytest.mark.parametrize('variant', [dict(tokens_type='performer'), dict(tokens_type='transformer'),
                                     dict(tokens_type='performer', block_type='se'),
                                     dict(tokens_type='performer', block_type='ghost')])
def test_onednn_linear_takes_every_product_where_it_can_and_keeps_the_numbers(variant, monkeypatch):
    """Every Linear of the blocks and token layers runs on oneDNN: fused with GELU / residual in inference (fp32
    and bf16 autocast), by the autograd function in fp32 training; none under fp16 autocast or in a trace."""
    calls, trained = [], []
    fused, function = cpu_kernels.fused_linear, cpu_kernels._OneDNNLinearFunction.apply

    def counted(*args, **kwargs):
        calls.append((kwargs.get('gelu', False), kwargs.get('add') is not None))
        return fused(*args, **kwargs)

    monkeypatch.setattr(cpu_kernels, 'fused_linear', counted)
    monkeypatch.setattr(cpu_kernels._OneDNNLinearFunction, 'apply', lambda *a: trained.append(1) or function(*a))
    plain_model, model = _pair(**variant)
    model.tokens_to_token.chunk_tokens, model.tokens_to_token.page_bytes = 16384, 2 ** 30  # one chunk: each layer once
    model.eval()
    linears = [m for m in (*model.tokens_to_token.modules(), *model.blocks.modules()) if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m, OneDNNLinear) for m in linears)
    linears.remove(model.tokens_to_token.project)  # runs as a convolution
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        fast = model(x)
        calls_on = list(calls)
        use_cpu_kernels(model, exclude=('onednn_linear',))
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
    use_cpu_kernels(model)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        calls.clear()
        fast_bf16 = model(x)  # bf16 products as autocast's, the float32 residual stream kept
    # where oneDNN has no bf16 products (AVX2-only CPUs), autocast's own products run
    assert len(calls) == (len(linears) if onednn_available(torch.bfloat16) else 0)
    assert fast_bf16.dtype == plain_bf16.dtype
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
def test_onednn_linear_leaves_bf16_to_autocast_where_onednn_has_no_bf16_products(monkeypatch):
    """On a CPU where oneDNN has no bf16 products (AVX2 only, e.g. AMD EPYC Zen 3; forced here), bf16 autocast
    inference takes autocast's own products, fp32 inference still oneDNN's, and the benchmark's peak GEMM in bf16
    times torch's own products alone."""
    from t2tvit.tools import benchmark
    monkeypatch.setattr(cpu_kernels, '_ONEDNN_BF16', False)
    fused, calls = cpu_kernels.fused_linear, []
    monkeypatch.setattr(cpu_kernels, 'fused_linear', lambda *a, **k: calls.append(1) or fused(*a, **k))
    plain, model = _pair(tokens_type='performer')
    plain.eval(), model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert not onednn_available(torch.bfloat16) and not cpu_kernels.onednn_inference(x)
            got, want = model(x), plain(x)
        assert not calls
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0.05)
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=1e-5)
    assert calls  # fp32 inference: oneDNN's products
    a = torch.randn(8, 8)
    assert list(benchmark._gemm_libraries(torch.device('cpu'), a.bfloat16(), a.bfloat16())) == ['torch.mm', 'F.linear']
    assert list(benchmark._gemm_libraries(torch.device('cpu'), a, a)) == ['torch.mm', 'F.linear', 'oneDNN']


@pytest.mark.skipif(not onednn_available(torch.bfloat16), reason='oneDNN has no bf16 products on this CPU')
@pytest.mark.parametrize('tokens_type', ['performer', 'transformer'])
def test_bf16_gelu_apart_takes_the_gelu_out_of_the_product_only_under_bf16_autocast(tokens_type, monkeypatch):
    """With `bf16_gelu_apart` every fused MLP (two token layers, each block) takes its GELU as its own op on the
    bf16 product, under CPU bf16 autocast in inference only; the outputs stay the plain model's within bf16."""
    plain, model = _pair(tokens_type=tokens_type)
    model.tokens_to_token.chunk_tokens, model.tokens_to_token.page_bytes = 16384, 2 ** 30  # one chunk: each MLP once
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    fused, gelu = cpu_kernels.fused_linear, cpu_kernels.F.gelu
    products, apart = [], []
    monkeypatch.setattr(cpu_kernels, 'fused_linear',
                        lambda *a, **k: products.append(k.get('gelu', False)) or fused(*a, **k))
    monkeypatch.setattr(cpu_kernels.F, 'gelu', lambda t, **k: apart.append(t.dtype) or gelu(t, **k))

    def run(*, bf16: bool, **kernels):
        use_cpu_kernels(model, **kernels)
        products.clear(), apart.clear()
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
            out = model(x).float()
        return out, sum(products), list(apart)

    mlps = 2 + len(model.blocks)
    on, gelu_in_products, gelus = run(bf16=True)
    assert gelu_in_products == 0 and gelus == [torch.bfloat16] * mlps
    off, gelu_in_products, gelus = run(bf16=True, exclude=('bf16_gelu_apart',))
    assert gelu_in_products == mlps and not gelus
    assert not torch.equal(on, off)  # rounded once after the GELU inside the product, twice apart
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        reference = plain(x).float()
    torch.testing.assert_close(on, reference, rtol=0, atol=0.05)
    torch.testing.assert_close(off, reference, rtol=0, atol=0.05)
    fp32, gelu_in_products, gelus = run(bf16=False)
    assert gelu_in_products == mlps and not gelus  # fp32 keeps the GELU inside the product
    use_cpu_kernels(model, exclude=('onednn_linear',))
    assert not cpu_kernel_state(model)['bf16_gelu_apart']  # a choice within oneDNN's products only
    with torch.no_grad():
        torch.testing.assert_close(fp32, plain(x), rtol=0, atol=1e-5)
    block = model.blocks[0]  # what the block computes: autocast's order, with oneDNN's products
    tokens = torch.randn(3, 5, block.norm1.normalized_shape[0])
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        mid = block.attn.forward_add(block.norm1(tokens), tokens)
        expected = fused(gelu(fused(block.norm2(mid), block.mlp.fc1.weight, block.mlp.fc1.bias, packed=True)),
                         block.mlp.fc2.weight, block.mlp.fc2.bias, add=mid, packed=True)
        assert torch.equal(block(tokens), expected)


@pytest.mark.skipif(not onednn_available(), reason='this PyTorch has no oneDNN')
@pytest.mark.parametrize('tokens_type', ['performer', 'transformer'])
def test_fp32_training_products_follow_onednn_linear_train(tokens_type, monkeypatch):
    """With `onednn_linear` alone, fp32 training takes PyTorch's own products (the plain model's numbers, bit for bit)
    while inference keeps oneDNN's fused ones; `onednn_linear_train` sends the training products to oneDNN too."""
    trained, fused_calls = [], []
    function, fused = cpu_kernels._OneDNNLinearFunction.apply, cpu_kernels.fused_linear
    monkeypatch.setattr(cpu_kernels._OneDNNLinearFunction, 'apply', lambda *a: trained.append(1) or function(*a))
    monkeypatch.setattr(cpu_kernels, 'fused_linear', lambda *a, **k: fused_calls.append(1) or fused(*a, **k))
    torch.manual_seed(0)
    plain = T2TViT(**TINY, tokens_type=tokens_type, t2t_drop_rate=0.)
    x = torch.randn(2, 3, 32, 32)

    def step(model):
        out = model(x)
        out.square().sum().backward()
        return out.detach(), [p.grad for p in model.parameters()]

    reference, reference_grads = step(plain)
    linears = sum(isinstance(m, nn.Linear) for m in (*plain.tokens_to_token.modules(), *plain.blocks.modules()))
    for kernels in (('onednn_linear',), ('onednn_linear', 'onednn_linear_train')):
        model = use_cpu_kernels(copy.deepcopy(plain), kernels=kernels)
        model.zero_grad()
        trained.clear()
        out, grads = step(model)
        if 'onednn_linear_train' in kernels:
            assert len(trained) == linears - 1  # all but the last stage's projection, a convolution
            torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
            for g, r in zip(grads, reference_grads):
                torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
        else:
            assert not trained and torch.equal(out, reference)
            assert all(torch.equal(g, r) for g, r in zip(grads, reference_grads))
        assert cpu_kernel_state(model)['onednn_linear_train'] == ('onednn_linear_train' in kernels)
        fused_calls.clear()
        with torch.no_grad():
            model.eval()(x)
        assert len(fused_calls) == linears - 1  # inference fuses either way


@pytest.mark.skipif(not onednn_available(), reason='this PyTorch has no oneDNN')
@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('input_grad', [True, False])
def test_onednn_linear_training_gradients_are_linear_gradients(bias, input_grad):
    torch.manual_seed(0)
    plain = nn.Linear(24, 40, bias=bias)
    fast = copy.deepcopy(plain)
    fast.__class__ = OneDNNLinear
    fast.onednn_linear_train = True
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


def _packed(model: nn.Module) -> dict:
    """The packed weights `packed_weights` keeps for `model`, by parameter name."""
    return {name: cpu_kernels._PACKED[p][1] for name, p in model.named_parameters() if p in cpu_kernels._PACKED}


@pytest.mark.skipif(not onednn_available(), reason='this PyTorch has no oneDNN')
@pytest.mark.parametrize('tokens_type', ['performer', 'transformer'])
def test_packed_weights_keep_the_numbers_and_follow_weight_changes(tokens_type):
    """Inference products take weights packed once; a changed weight (optimizer step, load_state_dict, another
    batch size) is packed again, so the outputs stay the plain model's, in fp32 and under bf16 autocast."""
    plain, fast = _pair(tokens_type=tokens_type)
    unpacked = use_cpu_kernels(copy.deepcopy(fast), exclude=('packed_weights',))
    for model in (plain, fast, unpacked):
        model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), rtol=0, atol=1e-5)
        kept = _packed(fast)
        products = [m for m in (*fast.tokens_to_token.modules(), *fast.blocks.modules()) if isinstance(m, nn.Linear)]
        assert len(kept) == len(products) - 1  # every product's weight but the projection, a convolution
        assert all(w.is_mkldnn for w in kept.values()) and not _packed(unpacked)
        fast(x)
        assert all(_packed(fast)[name] is w for name, w in kept.items())  # kept, not packed again
        with torch.autocast('cpu', dtype=torch.bfloat16):
            torch.testing.assert_close(fast(x), unpacked(x), rtol=0, atol=1e-6)  # the same bf16 products
        # packed for bf16 where oneDNN has bf16 products; elsewhere autocast's own products take the plain weights
        bf16 = onednn_available(torch.bfloat16)
        assert all(w.dtype == (torch.bfloat16 if bf16 else torch.float32) for w in _packed(fast).values())

    # training: autograd takes the parameters themselves, then an optimizer step changes them in place
    for model in (plain, fast):
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model(x).square().mean().backward()
        optimizer.step()
        model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(fast(x[:1]), plain(x[:1]), rtol=0, atol=1e-5)  # another batch size
        other = T2TViT(**TINY, tokens_type=tokens_type).state_dict()
        plain.load_state_dict(other)
        fast.load_state_dict(other)
        torch.testing.assert_close(fast(x), plain(x), rtol=0, atol=1e-5)
        # writes through .data bypass the version counter: applying the kernels again drops what was kept
        for model in (plain, fast):
            model.blocks[0].mlp.fc1.weight.data.mul_(2)
        use_cpu_kernels(fast)
        assert not _packed(fast)
        torch.testing.assert_close(fast(x), plain(x), rtol=0, atol=1e-5)


@pytest.mark.skipif(not onednn_available(), reason='this PyTorch has no oneDNN')
def test_packed_weights_are_kept_only_for_weights_they_can_watch():
    """A weight without a version counter (made in inference mode) or one autograd must see is not kept; a model's
    packed weights go with it."""
    x = torch.randn(5, 8)
    with torch.inference_mode():
        frozen = torch.randn(4, 8)
    trained = nn.Parameter(torch.randn(4, 8))
    with torch.no_grad():
        assert not cpu_kernels.packed_weight(frozen, x).is_mkldnn and frozen not in cpu_kernels._PACKED
    assert not cpu_kernels.packed_weight(trained, x).is_mkldnn and trained not in cpu_kernels._PACKED
    with torch.no_grad():
        packed = cpu_kernels.packed_weight(trained, x)
        assert packed.is_mkldnn and trained in cpu_kernels._PACKED
        torch.testing.assert_close(cpu_kernels.fused_linear(x, packed), x @ trained.t(), rtol=0, atol=1e-5)
    count = len(cpu_kernels._PACKED)
    del trained
    assert len(cpu_kernels._PACKED) == count - 1


@pytest.mark.parametrize('tokens_type', ['performer', 'transformer'])
def test_page_chunks_keep_the_first_stage_under_the_mmap_threshold(tokens_type):
    """As few chunks as keep the first stage's widest tensor (its soft split, or its first product's output in the
    product's dtype) under `page_bytes`; the outputs and maps are the whole batch's."""
    torch.manual_seed(0)
    plain = T2TViT(**dict(TINY, in_chans=1, token_dim=32), tokens_type=tokens_type).eval()
    fast = use_cpu_kernels(copy.deepcopy(plain), kernels=('strided_unfold', 'page_chunks'))
    t2t = fast.tokens_to_token
    x = torch.randn(6, 1, 32, 32)
    # 8 x 8 first-stage tokens; per image: the split 49 wide, the product 96 wide (4 bytes each in fp32, 2 in bf16)
    split, product = 64 * 49 * 4, 64 * 96 * 4
    with torch.no_grad():  # inference: page_chunks engages
        assert t2t._num_chunks(x) == 1
        t2t.page_bytes = 2 * product + 1  # two images' products fit: 3 chunks in fp32
        assert t2t._num_chunks(x) == 3
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert t2t._num_chunks(x) == math.ceil(6 / (2 * product // split))  # the split is wider than a bf16 product
        t2t.page_bytes = product  # not one image fits: one image per chunk
        assert t2t._num_chunks(x) == 6
        with torch.enable_grad():  # with autograd every chunk's tensors would stay for the backward: whole
            assert t2t._num_chunks(x) == 1
    t2t.page_bytes = 2 * product + 1
    with torch.no_grad():
        tokens, maps = t2t.forward_stages(x)
        whole_tokens, whole_maps = plain.tokens_to_token.forward_stages(x)
        torch.testing.assert_close(fast(x), plain(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(tokens, whole_tokens, rtol=0, atol=1e-5)
    for chunked, whole in zip(maps, whole_maps, strict=True):
        torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)


@pytest.mark.parametrize('tokens_type', ['performer', 'transformer'])
def test_split_chunks_give_the_first_product_the_same_input(tokens_type, monkeypatch):
    """Under CPU bf16 autocast in inference the first soft split and its LayerNorm run a few images at a time into
    one bf16 tensor: the same outputs as the plain model's; elsewhere (fp32, autograd) the whole batch at once."""
    plain, fast = _pair(tokens_type=tokens_type)
    use_cpu_kernels(fast, kernels=('strided_unfold', 'split_chunks', 'onednn_linear'))
    whole = use_cpu_kernels(copy.deepcopy(fast), kernels=('strided_unfold', 'onednn_linear')).eval()
    t2t = fast.tokens_to_token
    t2t.chunk_tokens = 2 * 8 * 8  # two images' first-stage tokens (8x8 at 32 px)
    splits = []
    split = cpu_kernels.soft_split
    monkeypatch.setattr(cpu_kernels, 'soft_split', lambda x, *a, **k: splits.append(x.shape[0]) or split(x, *a, **k))
    x = torch.randn(5, 3, 32, 32)
    for model in (plain, fast):
        model.eval()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        torch.testing.assert_close(fast(x), whole(x), rtol=0, atol=1e-6)  # the same bf16 products' input
        torch.testing.assert_close(fast(x), plain(x), rtol=0, atol=0.05)
        splits.clear()
        fast(x)
        assert splits[:3] == [2, 2, 1]  # the first split in chunks of two images, then the second split whole
        splits.clear()
        fast(x[:1])
        assert splits[0] == 1
    splits.clear()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), rtol=0, atol=1e-5)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = fast(x)
        out.float().sum().backward()
    assert splits[0] == 5 and splits[2] == 5  # fp32, then with autograd: the whole batch


@pytest.mark.skipif(not onednn_available(), reason='this PyTorch has no oneDNN')
def test_packed_weights_see_weight_ema_updates():
    """timm's weight EMA updates its copy in place through the state dict's tensors: the evaluation after each
    update takes the new weights, as training's evaluation of `--model-ema` weights does."""
    from timm.utils import ModelEmaV3
    plain, fast = _pair()
    ema = ModelEmaV3(fast, decay=0.5)
    use_cpu_kernels(ema.module).eval()
    reference = copy.deepcopy(plain)
    x = torch.randn(2, 3, 32, 32)
    for step in range(2):
        with torch.no_grad():
            for p in fast.parameters():
                p.add_(0.01 * (step + 1))
        ema.update(fast)
        reference.load_state_dict({k: v.clone() for k, v in ema.module.state_dict().items()})
        reference.eval()
        with torch.no_grad():
            torch.testing.assert_close(ema.module(x), reference(x), rtol=0, atol=1e-5)
        assert _packed(ema.module)  # the products took packed weights


@pytest.mark.parametrize('shape,split,patch_major', [((2, 3, 32, 32), (7, 4, 2), False),
                                                     ((2, 5, 13, 9), (3, 2, 1), True),
                                                     ((1, 1, 10, 7), (2, 3, 0), False)])
def test_compiled_splits_op_is_unfold_with_its_gradient(shape, split, patch_major):
    """`t2tvit::soft_split` is the eager gather as an op: Unfold's values, a shape-only fake for tracing, and
    Unfold's gradient through its backward op (torch.library's own checks of an op's registration)."""
    x = torch.randn(shape, requires_grad=True)
    kernel = split[0]
    expected = torch.nn.Unfold(kernel, stride=split[1], padding=split[2])(x).transpose(1, 2)
    if patch_major:
        expected = expected[..., patch_major_order(shape[1], kernel)]
    out = torch.ops.t2tvit.soft_split(x, *split, patch_major)
    assert torch.equal(out, expected) and out.data_ptr() != x.data_ptr()
    grad = torch.randn_like(out)
    assert torch.equal(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(expected, x, grad)[0])
    torch.library.opcheck(torch.ops.t2tvit.soft_split.default, (x, *split, patch_major))


def _graph_recorder():
    """A compiler that runs each graph as it is and keeps its text in the returned list."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm

    return graphs, keep


def _compiled_graphs(model: nn.Module, x: torch.Tensor, train: bool = False):
    """`model`'s output (and gradients) under torch.compile, and the forward and backward graphs it compiled."""
    from torch._dynamo.backends.common import aot_autograd
    graphs, keep = _graph_recorder()
    torch._dynamo.reset()  # a graph of its own for each call
    compiled = torch.compile(model, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))
    if not train:
        with torch.no_grad():
            return compiled(x), None, graphs
    out = compiled(x)
    out.square().mean().backward()
    return out, [p.grad for p in model.parameters()], graphs


@pytest.mark.parametrize('tokens_type', ['performer', 'transformer'])
def test_compiled_splits_put_the_split_op_in_the_compiled_graph(tokens_type):
    """Under torch.compile the soft splits are `t2tvit::soft_split` calls, forward and backward, with the plain
    model's outputs and gradients; without the kernel the graph gathers the patches itself (the plain forward)."""
    plain, fast = _pair(tokens_type=tokens_type)
    x = torch.randn(2, 3, 32, 32)
    for model in (plain, fast):
        model.eval()
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.  # the same gradients in training: compiled and eager dropout draw different masks
    with torch.no_grad():
        expected = plain(x)
    out, _, graphs = _compiled_graphs(fast, x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    assert sum(g.count('t2tvit.soft_split.default') for g in graphs) == 2  # both soft splits, one op each
    without = use_cpu_kernels(copy.deepcopy(fast), exclude=('compiled_splits',))
    out, _, graphs = _compiled_graphs(without, x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    assert not any('t2tvit' in g for g in graphs) and any('im2col' in g for g in graphs)

    plain.train()
    fast.train()
    plain(x).square().mean().backward()
    out, grads, graphs = _compiled_graphs(fast, x, train=True)
    forward, backward = graphs
    assert forward.count('t2tvit.soft_split.default') == 2
    assert backward.count('t2tvit.soft_split_backward') == 1  # the second split's: the image takes no gradient
    for (name, p), grad in zip(plain.named_parameters(), grads):
        torch.testing.assert_close(grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_compiled_splits_under_inductor():
    """The graph inductor builds with the op: the plain model's outputs in fp32 and bf16 autocast inference."""
    plain, fast = _pair(tokens_type='performer')
    plain.eval()
    fast.eval()
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    compiled = torch.compile(fast)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), plain(x), rtol=0, atol=1e-5)
        with torch.autocast('cpu', torch.bfloat16):
            torch.testing.assert_close(compiled(x).float(), plain(x).float(), rtol=0, atol=0.05)


def test_bf16_cpu_attention_train_holds_under_compile():
    """Under torch.compile the graph of a bf16 training step holds the explicit attention products, not the fused
    kernel (whose CPU backward is the slow part), with the plain model's gradients to bf16 rounding; without the
    kernel, the fused kernel as in the plain model."""
    plain, fast = _pair()
    x = torch.randn(2, 3, 32, 32)

    def step(model):
        graphs, keep = _graph_recorder()  # the graph dynamo captured, run as it is
        torch._dynamo.reset()
        model.zero_grad(set_to_none=True)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            torch.compile(model, backend=keep, fullgraph=True)(x).float().sum().backward()
        return graphs[0], next(model.blocks[0].attn.parameters()).grad.clone()

    plain.train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        plain(x).float().sum().backward()
    expected = next(plain.blocks[0].attn.parameters()).grad
    use_cpu_kernels(fast.train(), kernels=('bf16_cpu_attn_train',))
    graph, grad = step(fast)
    assert 'scaled_dot_product' not in graph and 'softmax' in graph
    torch.testing.assert_close(grad, expected, rtol=0.1, atol=0.1)
    use_cpu_kernels(fast, kernels=())
    graph, _ = step(fast)
    assert graph.count('scaled_dot_product') >= len(fast.blocks)
