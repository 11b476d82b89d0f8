"""`t2tvit visualize`: attention recovered by hooks is the attention the model used; pictures are written."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from t2tvit.cli.main import main as cli
from t2tvit.engine.restore import restore_model
from t2tvit.models import performer_features
from t2tvit.tools.visualize import AttentionRecorder, attention_rollout, t2t_attention, visualize

TINY = dict(embed_dim=32, depth=3, num_heads=2, token_dim=8, img_size=64, num_classes=5)


def _model(tokens_type: str):
    torch.manual_seed(0)
    model = restore_model(None, 't2t_vit_7', dict(TINY, tokens_type=tokens_type)).model
    with torch.no_grad():  # away from init, so that attention is not nearly uniform
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize('tokens_type', ['performer', 'transformer'])
def test_recorded_attention_rebuilds_every_block_output(tokens_type):
    model = _model(tokens_type)
    x = torch.randn(2, 3, 64, 64)
    seen, t2t_in = [], []
    handles = [blk.register_forward_hook(lambda m, a, out: seen.append((a[0], out))) for blk in model.blocks]
    handles += [layer.register_forward_hook(lambda m, a, out: t2t_in.append(a[0]))
                for layer in (model.tokens_to_token.attention1, model.tokens_to_token.attention2)]
    with torch.no_grad(), AttentionRecorder(model) as recorder:
        logits = model(x)
    for h in handles:
        h.remove()
    with torch.no_grad():
        assert torch.equal(model(x), logits)  # the hooks are gone and changed nothing
    assert len(recorder.blocks) == 3 and recorder.max_error < 1e-5
    for blk, weights, (block_in, block_out) in zip(model.blocks, recorder.blocks, seen):
        assert weights.shape == (2, 2, 17, 17)  # 64 px -> 4x4 grid + class token
        assert (weights >= 0).all() and torch.allclose(weights.sum(-1), torch.ones(2, 2, 17), atol=1e-5)
        with torch.no_grad():  # the whole block, from the recorded attention alone
            a = blk.attn
            v = a.qkv(blk.norm1(block_in)).reshape(2, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)[2]  # (B, h, N, d)
            y = block_in + blk.ls1(a.proj((weights @ v).transpose(1, 2).reshape(2, 17, 32)))
            y = y + blk.ls2(blk.mlp(blk.norm2(y)))
        assert (y - block_out).abs().max() < 1e-5
    # the T2T layers: 16x16 tokens after the first soft split, 8x8 after the second
    assert [w.shape for w in recorder.t2t] == [(2, 256, 256), (2, 64, 64)]
    for weights, layer, tokens in zip(recorder.t2t, (model.tokens_to_token.attention1,
                                                     model.tokens_to_token.attention2), t2t_in):
        expected = torch.ones(weights.shape[:2])
        if tokens_type == 'performer':  # a row sums to s / (s + eps), s = phi(q_i).sum_j phi(k_j): eps is official
            with torch.no_grad():
                k, q, _ = layer.kqv(layer.norm1(tokens)).split(layer.out_dim, dim=-1)
                qp, kp = performer_features(q, layer.w), performer_features(k, layer.w)
                s = (qp @ kp.sum(1, keepdim=True).transpose(1, 2))[..., 0]
            expected = s / (s + layer.eps)
        assert (weights >= 0).all() and torch.allclose(weights.sum(-1), expected, atol=1e-5)


def test_performer_implied_attention_is_what_favor_applies():
    layer = _model('performer').tokens_to_token.attention1
    tokens = torch.randn(1, 50, layer.norm1.normalized_shape[0])
    with torch.no_grad():
        weights, rebuilt = t2t_attention(layer, tokens)
        assert (rebuilt - layer(tokens)).abs().max() < 1e-5
        # exact softmax attention of the same q, k differs: the kernel only approximates it
        k, q, _ = layer.kqv(layer.norm1(tokens)).split(layer.out_dim, dim=-1)
        exact = (q @ k.transpose(1, 2)).softmax(-1)
    assert not torch.allclose(weights, exact, atol=1e-3)


def test_rollout_keeps_rows_stochastic_and_mixes_in_the_residual():
    a = torch.rand(1, 3, 5, 5).softmax(-1)
    b = torch.rand(1, 3, 5, 5).softmax(-1)
    eye = torch.eye(5)
    one = attention_rollout([a])
    assert torch.allclose(one[0], 0.5 * eye + 0.5 * a[0].mean(0))
    two = attention_rollout([a, b])
    assert torch.allclose(two[0], (0.5 * eye + 0.5 * b[0].mean(0)) @ one[0])
    assert torch.allclose(two.sum(-1), torch.ones(1, 5))


def test_visualize_default_photos_writes_four_pictures_each(tmp_path):
    restored = restore_model(None, 't2t_vit_7', dict(TINY, tokens_type='performer'))
    files, explanations = visualize(restored, output=tmp_path, blocks=[0, 2], channels=4)
    assert [e.name for e in explanations] == ['astronaut', 'chelsea', 'coffee']
    assert len(files) == 12 and all(f.parent == tmp_path for f in files)
    for f in files:
        with Image.open(f) as image:
            assert image.format == 'PNG' and image.width > 200
    e = explanations[1]
    assert e.image.shape == (64, 64, 3) and 0 <= e.image.min() and e.image.max() <= 1
    assert [(t, tuple(m.shape), s) for t, m, s in e.features] == [
        ('T2T stage 1 (stride 4)', (8, 16, 16), 4), ('T2T stage 2 (stride 8)', (8, 8, 8), 8),
        ('block 0 (stride 16)', (32, 4, 4), 16), ('block 2 (stride 16)', (32, 4, 4), 16)]
    assert torch.allclose(e.rollout.sum(-1), torch.ones(17), atol=1e-5)
    assert e.grid == (4, 4) and e.t2t_grids == [(16, 16), (8, 8)] and e.max_error < 1e-5
    assert sum(p for _, p in e.top) <= 1


def test_visualize_command(tiny_run, tmp_path, capsys):
    Image.new('RGBA', (90, 60), (200, 100, 0, 255)).save(tmp_path / 'shirt.png')
    out = tmp_path / 'pictures'
    assert cli(['visualize', str(tmp_path / 'shirt.png'), '--checkpoint', str(tiny_run), '-o', str(out)]) == 0
    printed = capsys.readouterr().out
    assert 'shirt: class_' in printed and 'rebuilds every hooked layer output' in printed
    assert sorted(p.name for p in out.iterdir()) == [
        'shirt_attention.png', 'shirt_feature_maps.png', 'shirt_rollout.png', 'shirt_t2t_attention.png']

    assert cli(['visualize', str(tmp_path / 'shirt.png'), '--model', 't2t_vit_7', '--model-kwargs',
                '{embed_dim: 32, depth: 1, num_heads: 2, token_dim: 8, img_size: 32}', '-o', str(out), '--force']) == 0
    assert 'random weights' in capsys.readouterr().err

    assert cli(['visualize', str(tmp_path / 'nope.png'), '--checkpoint', str(tiny_run), '-o', str(out)]) == 2
    assert 'nope.png does not exist' in capsys.readouterr().err
    (tmp_path / 'broken.jpg').write_bytes(b'\xff\xd8 not a jpeg')
    assert cli(['visualize', str(tmp_path / 'broken.jpg'), '--checkpoint', str(tiny_run), '-o',
                str(tmp_path / 'unused')]) == 2
    assert 'cannot read image' in capsys.readouterr().err and not (tmp_path / 'unused').exists()
    assert cli(['visualize', str(tmp_path / 'shirt.png'), '--checkpoint', str(tiny_run), '--blocks', '0,7',
                '-o', str(out), '--force']) == 2
    assert 'blocks [7] do not exist' in capsys.readouterr().err
    assert cli(['visualize', str(tmp_path / 'shirt.png')]) == 2
    assert 'give --checkpoint FILE, or --model NAME' in capsys.readouterr().err


DESIGN_STUDY = {  # small builds of every backbone block and tokenizer the pictures must handle
    't2t_vit_14_se': dict(embed_dim=32, depth=2, num_heads=2),
    't2t_vit_16_ghost': dict(embed_dim=32, depth=2, num_heads=2),
    't2t_vit_dense': dict(embed_dim=32, growth_rate=8, block_config=(1, 2), num_heads=2),
    't2t_vit_c_14': dict(embed_dim=32, depth=2, num_heads=2),
    't2t_vit_p_14': dict(embed_dim=32, depth=2, num_heads=2),
}


@pytest.mark.parametrize('name', list(DESIGN_STUDY))
def test_visualize_design_study_variants(name, tmp_path):
    restored = restore_model(None, name, dict(DESIGN_STUDY[name], token_dim=8, img_size=64, num_classes=5))
    Image.new('RGB', (64, 64), (30, 140, 200)).save(tmp_path / 'blue.png')
    files, (e,) = visualize(restored, [tmp_path / 'blue.png'], tmp_path / 'out', channels=4)
    attending = [i for i, b in enumerate(restored.model.blocks) if hasattr(b, 'attn')]
    assert sorted(e.block_attention) == attending and e.max_error < 1e-5  # hooks rebuild SE / Ghost outputs too
    for weights in e.block_attention.values():
        assert torch.allclose(weights.sum(-1), torch.ones(weights.shape[:2]), atol=1e-5)
    has_t2t_attention = name not in ('t2t_vit_c_14', 't2t_vit_p_14')
    assert len(e.t2t_attention) == (2 if has_t2t_attention else 0)
    assert len(files) == (4 if has_t2t_attention else 3) and all(f.is_file() for f in files)
    stems = [t for t, _, _ in e.features if 'stage' in t]
    assert len(stems) == (0 if name == 't2t_vit_p_14' else 2)
