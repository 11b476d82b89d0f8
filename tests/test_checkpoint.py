"""Checkpoint loading: the formats users have, strictness, safety and clear errors."""
from __future__ import annotations

import argparse
import os
import subprocess

import pytest
import timm
import torch
from safetensors.torch import save_file

import t2tvit
from t2tvit.models import CheckpointError, T2TViT, checkpoint_filter_fn, read_checkpoint
from t2tvit.models.checkpoint import EVAL_STATE_DICT_KEY, extract_state_dict

TINY = dict(tokens_type='performer', img_size=32, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2., token_dim=8,
            num_classes=4)


def _pair(**overrides):
    torch.manual_seed(0)
    source = T2TViT(**dict(TINY, **overrides)).eval()
    target = T2TViT(**dict(TINY, **overrides)).eval()
    return source, target


def _same_outputs(a, b, size=32):
    x = torch.randn(2, a.in_chans, size, size)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize('wrap', ['bare', 'state_dict', 'model', 'state_dict_ema', 'module_prefix', 'compiled'])
def test_every_container_format_loads(tmp_path, wrap):
    source, target = _pair()
    sd = source.state_dict()
    payload = {
        'bare': sd,
        'state_dict': {'state_dict': sd, 'epoch': 3, 'args': argparse.Namespace(lr=1e-3)},
        'model': {'model': sd, 'optimizer': {}},
        'state_dict_ema': {'state_dict': {k: torch.zeros_like(v) for k, v in sd.items()}, 'state_dict_ema': sd},
        'module_prefix': {f'module.{k}': v for k, v in sd.items()},
        'compiled': {f'_orig_mod.{k}': v for k, v in sd.items()},
    }[wrap]
    path = tmp_path / 'ckpt.pth'
    torch.save(payload, path)
    t2tvit.load_checkpoint(target, path)
    _same_outputs(source, target)


@pytest.mark.parametrize('named, expected', [('state_dict', 'raw'), ('state_dict_ema', 'ema'), (None, 'ema'),
                                             ('optimizer', 'ema')])
def test_a_training_checkpoint_names_the_weights_it_scored(named, expected):
    """`t2tvit train` writes which set (raw or EMA) scored best.pth's top-1; loaders read that set, else EMA first
    (a name that is not a weight set is ignored)."""
    raw, ema = {'w': torch.zeros(2)}, {'w': torch.ones(2)}
    checkpoint = {'state_dict': raw, 'state_dict_ema': ema, 'optimizer': {'x': torch.zeros(1)},
                  EVAL_STATE_DICT_KEY: named}
    assert torch.equal(extract_state_dict(checkpoint)['w'], (raw if expected == 'raw' else ema)['w'])


def test_safetensors_round_trip_through_create_model(tmp_path):
    source = timm.create_model('t2t_vit_7', img_size=32, num_classes=3).eval()
    path = tmp_path / 'weights.safetensors'
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = t2tvit.create_model('t2t_vit_7', img_size=32, num_classes=3, checkpoint_path=str(path)).eval()
    _same_outputs(source, loaded)


def test_filter_is_idempotent():
    source, target = _pair()
    raw = {'state_dict_ema': {f'module.{k}': v for k, v in source.state_dict().items()}}
    once = checkpoint_filter_fn(raw, target)
    twice = checkpoint_filter_fn(once, target)
    assert once.keys() == twice.keys()
    assert all(torch.equal(once[k], twice[k]) for k in once)


def test_other_architecture_names_every_bad_key(tmp_path):
    small = timm.create_model('t2t_vit_7', img_size=32)
    path = tmp_path / 'seven.pth.tar'
    torch.save({'arch': 't2t_vit_7', 'state_dict': small.state_dict()}, path)
    other = timm.create_model('t2t_vit_t_14', img_size=32)
    with pytest.raises(CheckpointError) as info:
        t2tvit.load_checkpoint(other, path)
    message = str(info.value)
    assert str(path) in message and "arch='t2t_vit_7'" in message
    assert 'missing keys' in message and 'tokens_to_token.attention1.attn.qkv.weight' in message
    assert 'unexpected keys' in message and 'tokens_to_token.attention1.kqv.weight' in message
    assert 'shape mismatches' in message and 'cls_token: checkpoint (1, 1, 256) vs model (1, 1, 384)' in message


def test_wrong_class_count_is_a_shape_mismatch_and_non_strict_loads_the_rest():
    source, _ = _pair()
    target = T2TViT(**dict(TINY, num_classes=7))
    with pytest.raises(CheckpointError, match=r'head\.weight: checkpoint \(4, 32\) vs model \(7, 32\)'):
        t2tvit.load_checkpoint(target, source.state_dict())
    head_before = target.head.weight.clone()
    t2tvit.load_checkpoint(target, source.state_dict(), strict=False)
    assert torch.equal(target.head.weight, head_before)
    assert torch.equal(target.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match='nowhere.pth'):
        read_checkpoint('nowhere.pth')


@pytest.mark.parametrize('suffix', ['.pth.tar', '.safetensors'])
def test_corrupt_or_truncated_file(tmp_path, suffix):
    source, _ = _pair()
    good = tmp_path / f'good{suffix}'
    if suffix == '.safetensors':
        save_file(source.state_dict(), str(good))
    else:
        torch.save({'state_dict': source.state_dict()}, good)
    bad = tmp_path / f'bad{suffix}'
    bad.write_bytes(good.read_bytes()[: os.path.getsize(good) // 2])
    with pytest.raises(CheckpointError, match='bad'):
        read_checkpoint(bad)


class _Payload:
    """Unpickling this would run code: a weights-only load must refuse it."""

    def __reduce__(self):
        return (subprocess.call, (['touch', '/tmp/t2tvit-pwned'],))


def test_refuses_to_unpickle_code(tmp_path):
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'payload': _Payload()}, path)
    with pytest.raises(CheckpointError, match='refused to unpickle'):
        read_checkpoint(path)
    assert not os.path.exists('/tmp/t2tvit-pwned')


def test_not_a_state_dict_is_named():
    _, target = _pair()
    with pytest.raises(CheckpointError, match="entry 'epoch' is a int"):
        t2tvit.load_checkpoint(target, {'epoch': 3, 'weights': {}})
