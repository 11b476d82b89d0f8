"""T2T-ViT as a backbone for dense tasks: the feature pyramid, and the example FPN head that trains on it."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import timm
import torch

import t2tvit  # noqa: F401  (registers the models)

REPO = Path(__file__).resolve().parents[1]
TINY = dict(embed_dim=32, depth=2, num_heads=2, token_dim=8)


def test_features_only_gives_a_stride_4_8_16_pyramid_at_any_size():
    backbone = timm.create_model('t2t_vit_7', features_only=True, img_size=64, dynamic_img_size=True, **TINY).eval()
    assert backbone.feature_info.reduction() == [4, 8, 16] and backbone.feature_info.channels() == [8, 8, 32]
    x = torch.randn(2, 3, 64, 96)  # not the build size, not square
    with torch.no_grad():
        maps = backbone(x)
        final, same = backbone.model.forward_intermediates(x, indices=[0, 1, 3])  # 0, 1: T2T stages; 3: last block
    assert [tuple(m.shape) for m in maps] == [(2, 8, 16, 24), (2, 8, 8, 12), (2, 32, 4, 6)]
    assert all(torch.equal(a, b) for a, b in zip(maps, same)) and final.shape == (2, 1 + 4 * 6, 32)


def test_segmentation_example_trains_an_fpn_head_on_the_pyramid(capsys):
    spec = importlib.util.spec_from_file_location('segmentation_head', REPO / 'examples' / 'segmentation_head.py')
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    losses = example.main(steps=30, model_kwargs=TINY, batch_size=6, log_every=100)
    assert 'strides [4, 8, 16]' in capsys.readouterr().out
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
