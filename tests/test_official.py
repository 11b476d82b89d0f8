"""Exact compatibility with the official T2T-ViT code: state-dict layout, parameter counts, outputs."""
from __future__ import annotations

import timm
import torch
import pytest

import t2tvit
from t2tvit.cpu_kernels import CPU_PROFILES, planned_kernels
from t2tvit.models import OFFICIAL_CLASSES, T2TViT, count_parameters

PLAIN_FIXTURES = ['tiny_performer', 'tiny_transformer', 'tiny_performer_gray32', 'tiny_transformer_qkvbias']
# The design-study classes of the official code (T2T_ViT_SE, T2T_ViT_Ghost, T2T_ViT_Dense)
ABLATION_FIXTURES = ['tiny_se', 'tiny_ghost', 'tiny_dense']


def test_every_official_variant_is_registered(official_variants):
    registered = set(timm.list_models('t2t*'))
    missing = {k.partition('@')[0] for k in official_variants} - registered
    assert not missing, f'official builders with no registered model: {missing}'


def test_state_dict_keys_shapes_and_counts_match_official(official_variants):
    checked = 0
    for entry, spec in official_variants.items():
        name = entry.partition('@')[0]
        with torch.device('meta'):
            model = timm.create_model(name, **spec['builder_kwargs'])
        shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
        assert len(shapes) == spec['num_keys'], entry
        assert shapes == spec['state_dict'], f'{entry}: state dict differs from the official one'
        assert count_parameters(model) == (spec['params_total'], spec['params_trainable']), entry
        checked += 1
    assert checked == 17  # 11 builders of the main family, SE, dense and Ghost, and 3 builds at 384 px


@pytest.mark.parametrize('name', ['t2t_vit_14', 't2t_vit_t_14', 't2t_vit_24'])
def test_384_tag_builds_the_384_model(official_variants, name):
    spec = official_variants[f'{name}@384']
    with torch.device('meta'):
        model = timm.create_model(f'{name}.in1k_384')
    assert model.img_size == (384, 384)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == spec['state_dict']


def test_frozen_tensors_are_persistent_buffers_and_every_parameter_trains():
    model = timm.create_model('t2t_vit_7', img_size=32)
    buffers = dict(model.named_buffers())
    assert 'pos_embed' in buffers
    assert 'tokens_to_token.attention1.w' in buffers and 'tokens_to_token.attention2.w' in buffers
    assert all(p.requires_grad for p in model.parameters())
    assert set(buffers) <= set(model.state_dict())


def _io(fixtures_dir, name):
    return torch.load(fixtures_dir / 'official' / f'{name}_io.pt', weights_only=True)


def test_every_fixture_is_checked(tiny_configs):
    assert set(tiny_configs) == set(PLAIN_FIXTURES + ABLATION_FIXTURES)
    assert {c['official_class'] for c in tiny_configs.values()} == set(OFFICIAL_CLASSES)


@pytest.mark.parametrize('suffix', ['.pth.tar', '_ddp_raw.pth'])
@pytest.mark.parametrize('name', PLAIN_FIXTURES + ABLATION_FIXTURES)
def test_outputs_equal_official(fixtures_dir, tiny_configs, name, suffix):
    config = tiny_configs[name]
    model = OFFICIAL_CLASSES[config['official_class']](**config['kwargs']).eval()
    assert isinstance(model, T2TViT)
    t2tvit.load_checkpoint(model, fixtures_dir / 'official' / f'{name}{suffix}')
    io = _io(fixtures_dir, name)
    assert list(io['input'].shape) == config['input_shape']
    with torch.no_grad():
        pre_logits = model.forward_head(model.forward_features(io['input']), pre_logits=True)
        logits = model(io['input'])
    torch.testing.assert_close(pre_logits, io['pre_logits'], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, io['logits'], rtol=0, atol=1e-5)


@pytest.mark.parametrize('profile', list(CPU_PROFILES))
@pytest.mark.parametrize('name', PLAIN_FIXTURES + ABLATION_FIXTURES)
def test_outputs_equal_official_with_cpu_kernels(fixtures_dir, tiny_configs, name, profile):
    """`use_cpu_kernels` as each host profile chooses them, the T2T module run image by image where the profile
    takes `batch_chunks` or `page_chunks` (with a budget of one token or one byte): the same logits and maps."""
    config = tiny_configs[name]
    model = OFFICIAL_CLASSES[config['official_class']](**config['kwargs']).eval()
    t2tvit.load_checkpoint(model, fixtures_dir / 'official' / f'{name}.pth.tar')
    io = _io(fixtures_dir, name)
    with torch.no_grad():
        whole_tokens, whole_maps = model.tokens_to_token.forward_stages(io['input'])
        t2tvit.use_cpu_kernels(model, profile=profile)
        model.tokens_to_token.chunk_tokens = model.tokens_to_token.page_bytes = 1
        chunked = {'batch_chunks', 'page_chunks'} & set(planned_kernels(profile))
        chunks = io['input'].shape[0] if chunked else 1
        assert model.tokens_to_token._num_chunks(io['input']) == chunks
        torch.testing.assert_close(model(io['input']), io['logits'], rtol=0, atol=1e-5)
        tokens, maps = model.tokens_to_token.forward_stages(io['input'])
    torch.testing.assert_close(tokens, whole_tokens, rtol=0, atol=1e-5)
    for chunked, whole in zip(maps, whole_maps, strict=True):
        torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)


@pytest.mark.parametrize('name', PLAIN_FIXTURES)
def test_outputs_equal_official_compiled_with_cpu_kernels(fixtures_dir, tiny_configs, name):
    """Under torch.compile the kernels of the Intel plan that stay (the soft splits as `t2tvit::soft_split`, the
    second one patch-major) give the official logits too."""
    config = tiny_configs[name]
    model = OFFICIAL_CLASSES[config['official_class']](**config['kwargs']).eval()
    t2tvit.load_checkpoint(model, fixtures_dir / 'official' / f'{name}.pth.tar')
    t2tvit.use_cpu_kernels(model, profile='intel-amx')
    io = _io(fixtures_dir, name)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            logits = torch.compile(model, backend='aot_eager', fullgraph=True)(io['input'])
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(logits, io['logits'], rtol=0, atol=1e-5)


def test_ema_weights_are_preferred(fixtures_dir, tiny_configs):
    """The .pth.tar holds two different weight sets; the outputs belong to state_dict_ema."""
    path = fixtures_dir / 'official' / 'tiny_performer.pth.tar'
    checkpoint = t2tvit.models.read_checkpoint(path)
    assert not torch.equal(checkpoint['state_dict']['head.weight'], checkpoint['state_dict_ema']['head.weight'])
    model = T2TViT(**tiny_configs['tiny_performer']['kwargs'])
    t2tvit.load_checkpoint(model, path)
    torch.testing.assert_close(model.head.weight, checkpoint['state_dict_ema']['head.weight'], rtol=0, atol=0)


@pytest.mark.parametrize('suffix', ['.pth.tar', '_ddp_raw.pth'])
@pytest.mark.parametrize('builder, name', [
    ('t2t_vit_t_14', 'tiny_transformer_qkvbias'),
    ('t2t_vit_14_se', 'tiny_se'),
    ('t2t_vit_16_ghost', 'tiny_ghost'),
    ('t2t_vit_dense', 'tiny_dense'),
])
def test_timm_pretrained_file_overlay(fixtures_dir, tiny_configs, builder, name, suffix):
    """timm's own pretrained=True path reads the official file through checkpoint_filter_fn."""
    config = tiny_configs[name]
    kwargs = dict(config['kwargs'])
    kwargs.pop('tokens_type')
    path = fixtures_dir / 'official' / f'{name}{suffix}'
    # the registered builder with the tiny widths: the caller's kwargs win over the builder's.
    model = timm.create_model(
        builder, pretrained=True, pretrained_cfg_overlay=dict(
            file=str(path), num_classes=kwargs['num_classes'], input_size=tuple(config['input_shape'][1:])),
        **kwargs).eval()
    io = _io(fixtures_dir, name)
    with torch.no_grad():
        torch.testing.assert_close(model(io['input']), io['logits'], rtol=0, atol=1e-5)


@pytest.mark.parametrize('name, released', [
    ('t2t_vit_24.in1k_384', 'released weights: t2t_vit_24.in1k, t2t_vit_24.tl_in1k'),
    ('t2t_vit_14_se', 'no weights of t2t_vit_14_se were released'),
])
def test_pretrained_without_a_release_names_the_released_tags_and_how_to_pass_a_file(name, released):
    with pytest.raises(RuntimeError, match='pretrained_cfg_overlay=dict\\(file=') as info:
        timm.create_model(name, pretrained=True)
    assert released in str(info.value)


def test_released_qk_scale_is_head_dim():
    """The official pretrained=True set qk_scale=embed_dim**-0.5; the released weights use head_dim**-0.5."""
    model = timm.create_model('t2t_vit_7', img_size=32)
    attn = model.blocks[0].attn
    assert attn.scale == pytest.approx((256 // 4) ** -0.5)


def test_token_attention_scale_comes_from_input_width():
    model = timm.create_model('t2t_vit_t_14', img_size=32)
    t2t = model.tokens_to_token
    assert t2t.attention1.attn.scale == pytest.approx((3 * 7 * 7) ** -0.5)
    assert t2t.attention2.attn.scale == pytest.approx((64 * 3 * 3) ** -0.5)
