"""The design-study variants beyond what the timm contract and the official fixtures check: tokenizer geometry,
channel adaptation, the dense widths, and errors that name their fix."""
from __future__ import annotations

import pytest
import timm
import torch

import t2tvit
from t2tvit.models import GhostMlp, T2TViT, token_grid_size

TINY = dict(img_size=32, embed_dim=32, depth=2, num_heads=2, mlp_ratio=3., token_dim=8, num_classes=4)


@pytest.mark.parametrize('size', [(17, 17), (50, 31), (64, 64)])
def test_convolution_tokens_follow_the_soft_split_grid(size):
    model = T2TViT(tokens_type='convolution', **dict(TINY, img_size=size)).eval()
    tokens, maps = model.tokens_to_token.forward_stages(torch.randn(1, 3, *size))
    h, w = token_grid_size(size)
    assert tokens.shape == (1, 32, h, w)  # the token map the backbone flattens
    assert [tuple(m.shape[-2:]) for m in maps] == [token_grid_size(size, 1), token_grid_size(size, 2)]


def test_convolution_tokenizer_has_the_layers_the_official_code_declares():
    """Official T2T_module(tokens_type='convolution'): soft_split0/1 and project as Conv2d, 7/3/3, strides 4/2/2."""
    with torch.device('meta'):
        model = timm.create_model('t2t_vit_c_14')
    t2t = model.tokens_to_token
    shapes = {k: tuple(v.shape) for k, v in t2t.state_dict().items()}
    assert shapes == {
        'soft_split0.weight': (64, 3, 7, 7), 'soft_split0.bias': (64,),
        'soft_split1.weight': (64, 64, 3, 3), 'soft_split1.bias': (64,),
        'project.weight': (384, 64, 3, 3), 'project.bias': (384,),
    }
    assert [(c.stride[0], c.padding[0]) for c in (t2t.soft_split0, t2t.soft_split1, t2t.project)] == \
        [(4, 2), (2, 1), (2, 1)]
    assert model.grid_size == (14, 14)


@pytest.mark.parametrize('size', [(16, 16), (50, 31), (100, 37)])
def test_patch_tokens_take_whole_patches(size):
    model = T2TViT(tokens_type='patch', patch_size=16, **dict(TINY, img_size=size)).eval()
    assert model.grid_size == (size[0] // 16, size[1] // 16)
    h, w = model.grid_size
    assert model.forward_features(torch.randn(1, 3, *size)).shape == (1, 1 + h * w, 32)
    assert model.num_stem_features == 0 and model.feature_info[0]['module'] == 'blocks.0'


def test_patch_input_smaller_than_a_patch_is_refused_with_the_minimum():
    with pytest.raises(ValueError, match='use at least 16x16'):
        T2TViT(tokens_type='patch', patch_size=16, **dict(TINY, img_size=12))


@pytest.mark.parametrize('tokens_type', ['convolution', 'patch'])
def test_grey_model_from_rgb_convolution_weights_is_exact(tokens_type):
    """The first convolution's channels are summed: for a grey image repeated three times nothing changes."""
    torch.manual_seed(0)
    kwargs = dict(TINY, tokens_type=tokens_type, patch_size=4)
    rgb = T2TViT(**kwargs).eval()
    grey = t2tvit.load_checkpoint(T2TViT(**dict(kwargs, in_chans=1)).eval(), rgb.state_dict())
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(grey(x), rgb(x.repeat(1, 3, 1, 1)), rtol=0, atol=1e-5)


def test_ghost_cheap_operation_is_the_official_depthwise_convolution():
    torch.manual_seed(0)
    mlp = GhostMlp(in_features=8, hidden_features=24)
    x = torch.randn(2, 5, 8)
    primary = mlp.act(mlp.fc1(x))
    official = [primary] + [mlp.act(op(primary.transpose(1, 2)).transpose(1, 2))
                            for op in (mlp.cheap_operation2, mlp.cheap_operation3)]
    expected = mlp.fc2(torch.cat(official, dim=-1))
    torch.testing.assert_close(mlp(x), expected, rtol=0, atol=1e-6)


def test_ghost_mlp_needs_a_whole_number_ratio():
    with pytest.raises(ValueError, match='Ghost MLP needs mlp_ratio 1, 2, 3 or 4'):
        T2TViT(block_type='ghost', **dict(TINY, mlp_ratio=2.5))


def test_dense_widths_grow_and_halve_as_the_official_model():
    with torch.device('meta'):
        model = timm.create_model('t2t_vit_dense')
    widths = [info['num_chs'] for info in model.feature_info[model.num_stem_features:]]
    # stages of 3/6/6/4 blocks adding 64 each, width halved by the three transitions (blocks.3, .10, .17)
    assert widths[:4] == [192, 256, 320, 160]
    assert widths[9:11] == [544, 272] and widths[16:18] == [656, 328]
    assert widths[-1] == model.num_features == 584 and model.embed_dim == 128
    assert sum(isinstance(b, t2tvit.models.DenseTransition) for b in model.blocks) == 3
    assert model.head.in_features == 584


def test_dense_drop_path_rises_over_all_blocks():
    model = T2TViT(block_type='dense', growth_rate=8, block_config=(2, 2), drop_path_rate=0.3,
                   **{k: v for k, v in TINY.items() if k != 'depth'})
    rates = [b.drop_path1.drop_prob for b in model.blocks if hasattr(b, 'drop_path1')
             and hasattr(b.drop_path1, 'drop_prob')]
    assert rates == pytest.approx([0.1, 0.2, 0.3])  # the first block has none (an Identity)


def test_dense_reset_classifier_uses_the_final_width():
    model = T2TViT(block_type='dense', growth_rate=8, block_config=(2,), **{k: v for k, v in TINY.items()
                                                                           if k != 'depth'})
    model.reset_classifier(7)
    assert model.head.in_features == 32 + 2 * 8
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)


@pytest.mark.parametrize('kwargs, message', [
    (dict(block_type='dense', growth_rate=7, block_config=(2,)), 'not divisible by num_heads'),
    (dict(block_type='dense', block_config=()), 'at least one block per stage'),
    (dict(block_type='dense', depth=3), 'depth from block_config'),
    (dict(block_type='resnet'), "block_type 'resnet' is not one of"),
    (dict(tokens_type='conv'), "tokens_type 'conv' is not one of"),
])
def test_bad_configuration_names_the_problem(kwargs, message):
    base = {k: v for k, v in TINY.items() if k != 'depth'}
    with pytest.raises(ValueError, match=message):
        T2TViT(**dict(base, **kwargs))


def test_pruned_dense_model_ends_at_the_width_it_keeps():
    model = T2TViT(block_type='dense', growth_rate=8, block_config=(2, 2), **{k: v for k, v in TINY.items()
                                                                              if k != 'depth'}).eval()
    with pytest.raises(ValueError, match='prune_head=True'):
        model.prune_intermediate_layers([2, 4], prune_head=False)
    assert model.num_features == 40  # 32 -> 40 -> 48, transition to 24, -> 32 -> 40
    model.prune_intermediate_layers([2, 4], prune_norm=False)  # features 2, 4: the first block and the transition
    assert len(model.blocks) == 3 and isinstance(model.norm, torch.nn.Identity)  # the 40-wide norm cannot apply
    assert model.num_features == 24
    assert model.forward_features(torch.randn(1, 3, 32, 32)).shape[-1] == 24
