"""Parameters and MACs under the two conventions, counted from the code."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import t2tvit
from t2tvit.models import T2TViT
from t2tvit.tools.complexity import count_macs, format_complexity_table, model_complexity

TINY = dict(img_size=32, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2., token_dim=8, num_classes=4)


def test_mac_counter_on_linear_and_conv_layers():
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    assert count_macs(mlp, (8,), device='cpu') == {'layers': 8 * 16 + 16 * 4, 'all': 8 * 16 + 16 * 4}
    assert count_macs(mlp, (5, 8), device='cpu')['layers'] == 5 * (8 * 16 + 16 * 4)  # per token
    conv = nn.Conv2d(3, 4, 3)
    assert count_macs(conv, (3, 8, 8), device='cpu') == {'layers': 6 * 6 * 4 * 3 * 3 * 3, 'all': 6 * 6 * 4 * 27}


def _attention_macs(tokens_type: str) -> int:
    """The attention products of the TINY model, by hand: 8x8 and 4x4 token grids in the T2T module, 1 + 2x2 in
    the blocks."""
    n1, n2, d = 8 * 8, 4 * 4, 8  # tokens of the two T2T stages; token_dim
    if tokens_type == 'transformer':
        t2t = sum(2 * n * n * d for n in (n1, n2))  # q @ k^T and attn @ v, one head of width token_dim
    else:
        m = d // 2  # random features
        # phi(k), phi(q): 2 N d m; k'^T v: N m d; q' (k'^T v): N m d; normaliser q' @ sum(k'): N m
        t2t = sum(4 * n * d * m + n * m for n in (n1, n2))
    blocks = 2 * 2 * 5 * 5 * 32  # depth x (q @ k^T + attn @ v) over 5 tokens, all heads together 32 wide
    return t2t + blocks


def _layer_macs() -> int:
    """Every Linear of the TINY model times the tokens it sees."""
    n1, n2, n3, d, e = 64, 16, 4, 8, 32
    stage = lambda n, dim_in: n * (dim_in * 3 * d + d * d + 2 * d * d)  # qkv, proj, two MLP layers of width d
    t2t = stage(n1, 3 * 49) + stage(n2, d * 9) + n3 * (d * 9) * e
    blocks = 2 * 5 * (e * 3 * e + e * e + 2 * e * 2 * e)
    return t2t + blocks + e * 4


@pytest.mark.parametrize('tokens_type', ['performer', 'transformer'])
def test_conventions_differ_by_exactly_the_attention_products(tokens_type):
    torch.manual_seed(0)
    model = T2TViT(tokens_type=tokens_type, **TINY)
    macs = count_macs(model, (3, 32, 32), device='cpu')
    assert macs['layers'] == _layer_macs()
    assert macs['all'] - macs['layers'] == _attention_macs(tokens_type)


@pytest.mark.parametrize('tokens_type', ['performer', 'transformer'])
def test_counts_do_not_depend_on_the_cpu_kernels(tokens_type):
    """The counter sees the plain computation whether or not the CPU kernels are applied (they step aside under
    dispatch modes)."""
    model = T2TViT(tokens_type=tokens_type, **TINY)
    plain = count_macs(model, (3, 32, 32), device='cpu')
    t2tvit.use_cpu_kernels(model)
    assert count_macs(model, (3, 32, 32), device='cpu') == plain


def test_paper_variants_counted_on_meta():
    t14 = model_complexity('t2t_vit_14')
    assert (round(t14.macs_layers / 1e9, 2), round(t14.macs_all / 1e9, 2)) == (4.33, 4.78)
    assert t14.params_total == 21_545_550 and t14.params_no_frozen == t14.params_trainable == 21_465_806
    assert abs(t14.macs_diff) < 0.01 and t14.paper_macs_g == 4.8
    t_14 = model_complexity('t2t_vit_t_14')
    assert round(t_14.macs_all / 1e9, 2) == 6.09 and t_14.macs_layers == t14.macs_layers
    at_384 = model_complexity('t2t_vit_14', 384)
    assert at_384.paper_macs_g is None and at_384.macs_all > 3 * t14.macs_all
    table = format_complexity_table([t14, at_384])
    assert '4.78G' in table and '4.8' in table and '(b)' in table


def test_peers_are_counted_at_the_benchmark_size():
    """CNNs take no img_size argument: they are built as they are and counted at the size asked for."""
    resnet = model_complexity('resnet50', 224)
    assert resnet.macs_layers == resnet.macs_all and round(resnet.macs_all / 1e9, 2) == 4.09
    assert model_complexity('resnet50', 112).macs_all < resnet.macs_all / 3
    deit = model_complexity('deit_small_patch16_224', 224)
    assert (round(deit.macs_layers / 1e9, 2), round(deit.macs_all / 1e9, 2)) == (4.24, 4.60)
