"""The timm model contract, over every registered T2T-ViT variant, in the manner of timm's tests/test_models.py."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.optim import param_groups_layer_decay

import t2tvit

MODELS = t2tvit.list_variants()
SIZE = 64  # small input: for the paper's soft splits, 16x16 tokens in the first T2T stage and a 4x4 backbone grid
BATCH = 2


def _create(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, img_size=SIZE, **kwargs)


def _grid(model):
    return model.grid_size  # built for SIZE: the token grid the backbone sees


def _input(model, batch=BATCH):
    torch.manual_seed(1)
    return torch.randn(batch, model.in_chans, SIZE, SIZE)


def test_registry():
    assert len(MODELS) >= 17
    # the paper's design study (Tables 6 and 7) beside the main family
    assert {'t2t_vit_14_se', 't2t_vit_16_ghost', 't2t_vit_dense', 't2t_vit_14_resnext', 't2t_vit_14_wide',
            't2t_vit_c_14', 't2t_vit_p_14'} <= set(MODELS)
    assert set(timm.list_models('t2t_vit_t_*')) == {'t2t_vit_t_14', 't2t_vit_t_19', 't2t_vit_t_24'}
    assert {'t2t_vit_14.in1k_384', 't2t_vit_t_14.in1k_384', 't2t_vit_19.in1k_384', 't2t_vit_24.in1k_384',
            't2t_vit_t_24.in1k_384'} <= set(timm.list_models('t2t*', include_tags=True))
    assert isinstance(t2tvit.create_model('t2t_vit_7', img_size=32), t2tvit.T2TViT)


@pytest.mark.parametrize('name', MODELS)
def test_model_forward(name):
    model = _create(name).eval()
    with torch.no_grad():
        out = model(_input(model))
    assert out.shape == (BATCH, model.num_classes)
    assert not torch.isnan(out).any()


@pytest.mark.parametrize('name', MODELS)
def test_model_backward(name):
    """Forward and backward; every parameter is trainable and receives a gradient."""
    model = _create(name, num_classes=5, drop_path_rate=0.1).train()
    out = model(_input(model))
    out.mean().backward()
    for n, p in model.named_parameters():
        assert p.requires_grad, f'{n} is a frozen parameter; frozen tensors must be buffers'
        assert p.grad is not None, f'No gradient for {n}'
    assert out.shape == (BATCH, 5)


@pytest.mark.parametrize('name', MODELS)
def test_model_default_cfgs(name):
    model = _create(name).eval()
    cfg = model.pretrained_cfg
    for field in ('input_size', 'mean', 'std', 'crop_pct', 'interpolation', 'first_conv', 'classifier',
                  'num_classes'):
        assert field in cfg, f'{name}: pretrained_cfg lacks {field}'
    assert len(cfg['input_size']) == 3 and cfg['input_size'][0] == model.in_chans
    assert len(cfg['mean']) == len(cfg['std']) == model.in_chans
    assert cfg['interpolation'] == 'bicubic'
    state_dict = model.state_dict()
    assert cfg['first_conv'] + '.weight' in state_dict, f'{name}: first_conv names no weight'
    assert cfg['classifier'] + '.weight' in state_dict, f'{name}: classifier names no weight'
    assert cfg['classifier'] + '.bias' in state_dict

    x = _input(model)
    with torch.no_grad():
        features = model.forward_features(x)
        num_tokens = 1 + _grid(model)[0] * _grid(model)[1]
        assert features.shape == (BATCH, num_tokens, model.num_features)
        pre_logits = model.forward_head(features, pre_logits=True)
        assert pre_logits.shape == (BATCH, model.num_features)
        model.reset_classifier(0)
        assert model(x).shape == (BATCH, model.num_features)
        torch.testing.assert_close(model(x), pre_logits)
        model.reset_classifier(7, global_pool='avg')
        assert model(x).shape == (BATCH, 7)
        model.reset_classifier(0, global_pool='')
        assert model(x).shape == (BATCH, num_tokens, model.num_features)


@pytest.mark.parametrize('name', MODELS)
def test_no_weight_decay_and_group_matcher(name):
    model = _create(name)
    assert model.no_weight_decay() == {'cls_token', 'pos_embed'}
    groups = param_groups_layer_decay(
        model, weight_decay=0.05, no_weight_decay_list=model.no_weight_decay(), layer_decay=0.75)
    grouped = sum(len(g['params']) for g in groups)
    assert grouped == len(list(model.parameters()))
    scales = sorted({g['lr_scale'] for g in groups})
    assert len(scales) == len(model.blocks) + 2  # stem, each block, final norm and head
    no_decay = {id(p) for g in groups if g['weight_decay'] == 0 for p in g['params']}
    assert id(model.cls_token) in no_decay


@pytest.mark.parametrize('name', MODELS)
def test_grad_checkpointing_gives_same_outputs_and_gradients(name):
    model = _create(name, drop_path_rate=0.1).train()
    x = _input(model)

    def run():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # same dropout and drop-path masks in both runs
        out = model(x)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out_plain, grads_plain = run()
    model.set_grad_checkpointing(True)
    out_ckpt, grads_ckpt = run()
    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=1e-6)
    for n in grads_plain:
        torch.testing.assert_close(grads_ckpt[n], grads_plain[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize('name', MODELS)
def test_forward_intermediates(name):
    """Features carry the channels and strides feature_info reports (widths change along the dense variant)."""
    model = _create(name).eval()
    x = _input(model)
    num_features = model.num_stem_features + len(model.blocks)  # tokenizer maps (none for patches), then blocks
    assert len(model.feature_info) == num_features
    with torch.no_grad():
        final, feats = model.forward_intermediates(x, indices=[0, 1, num_features - 1])
        torch.testing.assert_close(final, model.forward_features(x))
        infos = [model.feature_info[i] for i in (0, 1, num_features - 1)]
        assert [f.shape[1] for f in feats] == [info['num_chs'] for info in infos]
        assert [f.shape[-1] for f in feats] == [SIZE // info['reduction'] for info in infos]
        assert feats[-1].shape[-2:] == _grid(model)
        every = model.forward_intermediates(x, intermediates_only=True)
        assert [f.shape[1] for f in every] == [info['num_chs'] for info in model.feature_info]
        assert every[-1].shape[1] == model.num_features
        # the last block's map is the final tokens before the norm, laid out as an image
        tokens = every[-1].flatten(2).transpose(1, 2)
        torch.testing.assert_close(model.norm(tokens), final[:, 1:])
        nlc = model.forward_intermediates(x, indices=2, output_fmt='NLC', norm=True, intermediates_only=True)
        torch.testing.assert_close(nlc[-1], final[:, 1:])
        with_prefix = model.forward_intermediates(x, indices=1, return_prefix_tokens=True, intermediates_only=True)
        assert with_prefix[0][1].shape == (BATCH, 1, model.num_features)


@pytest.mark.parametrize('name', MODELS)
def test_features_only(name):
    model = timm.create_model(name, features_only=True, dynamic_img_size=True).eval()
    x = torch.randn(1, model.model.in_chans, 96, 64)
    with torch.no_grad():
        feats = model(x)
    reductions = model.feature_info.reduction()
    if name != 't2t_vit_mini':
        # default out_indices (0, 1, -1): the tokenizer's two maps and the last block; patches have no maps
        assert reductions == ([16, 16, 16] if name == 't2t_vit_p_14' else [4, 8, 16])
    assert [f.shape[1] for f in feats] == model.feature_info.channels()
    assert [tuple(f.shape[-2:]) for f in feats] == [(96 // r, 64 // r) for r in reductions]
    chosen = timm.create_model(name, features_only=True, out_indices=(1, 3)).eval()
    assert chosen.feature_info.reduction() == reductions[1:]
    # blocks after the last one asked for (feature 3) are pruned
    assert len(chosen.model.blocks) == 3 - chosen.model.num_stem_features + 1


@pytest.mark.filterwarnings('ignore:`torch.jit.trace')
@pytest.mark.parametrize('name', MODELS)
def test_torchscript_trace(name):
    model = _create(name).eval()
    x = _input(model)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize('name', MODELS)
def test_torch_export(name):
    model = _create(name).eval()
    x = _input(model)
    batch = torch.export.Dim('batch', min=1, max=64)
    program = torch.export.export(model, (x,), dynamic_shapes={'x': {0: batch}})
    bigger = _input(model, batch=5)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(program.module()(bigger), model(bigger), rtol=0, atol=1e-5)


@pytest.mark.parametrize('name', MODELS)
def test_torch_compile_fullgraph(name):
    """One graph, no breaks: training step captured by dynamo, inference traced through AOT autograd."""
    torch._dynamo.reset()
    model = _create(name, drop_path_rate=0.1).train()
    x = _input(model)

    def step(fn):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(4)  # same dropout masks for eager and compiled
        out = fn(x)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    out_eager, grads_eager = step(model)
    out_compiled, grads_compiled = step(torch.compile(model, fullgraph=True, backend='eager'))
    torch.testing.assert_close(out_compiled, out_eager, rtol=0, atol=1e-5)
    for g_c, g_e in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-6)

    model.eval()
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize('name', ['t2t_vit_7', 't2t_vit_t_14'])
def test_torch_compile_inductor(name):
    """Generated kernels, forward and backward, match eager."""
    torch._dynamo.reset()
    model = timm.create_model(name, img_size=32, depth=2).eval()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)
    grad_compiled, = torch.autograd.grad(out.square().sum(), x)
    grad_eager, = torch.autograd.grad(model(x).square().sum(), x)
    torch.testing.assert_close(grad_compiled, grad_eager, rtol=1e-3, atol=1e-5)
