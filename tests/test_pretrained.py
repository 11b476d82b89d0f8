"""`pretrained=True`: every release as a tag, downloads into timm's cache, the release formats, hub model folders.

Release files are served by an HTTP server on 127.0.0.1 that the tests start; they are official-format files
built from the reference fixtures, redirected to with `pretrained_cfg_overlay=dict(url=...)`. timm's cache lives in
a temporary TORCH_HOME.
"""
from __future__ import annotations

import argparse
import functools
import http.server
import json
import logging
import threading
from pathlib import Path

import pytest
import timm
import torch

import t2tvit  # noqa: F401  (registers the models)
from t2tvit.cli.main import main as cli
from t2tvit.data.labels import imagenet_classes
from t2tvit.engine.restore import restore_model
from t2tvit.engine.train import load_pretrained_weights
from t2tvit.models import RELEASES, CheckpointError, T2TViT, from_mmpretrain, read_checkpoint
from t2tvit.tools.export import export_hf

OFFICIAL = 'https://github.com/yitu-opensource/T2T-ViT/releases/download/main/'
MMPRETRAIN = 'https://download.openmmlab.com/mmclassification/v0/t2t-vit/'
# tag -> (url, classes, input size, crop_pct, license, top-1 its publisher gives)
EXPECTED = {
    't2t_vit_7.in1k': (OFFICIAL + '71.7_T2T_ViT_7.pth.tar', 1000, 224, 0.9, 'bsd-3-clause-clear', 71.7),
    't2t_vit_10.in1k': (OFFICIAL + '75.2_T2T_ViT_10.pth.tar', 1000, 224, 0.9, 'bsd-3-clause-clear', 75.2),
    't2t_vit_12.in1k': (OFFICIAL + '76.5_T2T_ViT_12.pth.tar', 1000, 224, 0.9, 'bsd-3-clause-clear', 76.5),
    't2t_vit_14.in1k': (OFFICIAL + '81.5_T2T_ViT_14.pth.tar', 1000, 224, 0.9, 'bsd-3-clause-clear', 81.5),
    't2t_vit_19.in1k': (OFFICIAL + '81.9_T2T_ViT_19.pth.tar', 1000, 224, 0.9, 'bsd-3-clause-clear', 81.9),
    't2t_vit_24.in1k': (OFFICIAL + '82.3_T2T_ViT_24.pth.tar', 1000, 224, 0.9, 'bsd-3-clause-clear', 82.3),
    't2t_vit_14.in1k_384': (OFFICIAL + '83.3_T2T_ViT_14.pth.tar', 1000, 384, 0.9, 'bsd-3-clause-clear', 83.3),
    't2t_vit_24.tl_in1k': (OFFICIAL + '84.2_T2T_ViT_24.pth.tar', 1000, 224, 0.9, 'bsd-3-clause-clear', 84.2),
    't2t_vit_t_14.in1k': (OFFICIAL + '81.7_T2T_ViTt_14.pth.tar', 1000, 224, 0.9, 'bsd-3-clause-clear', 81.7),
    't2t_vit_t_19.in1k': (OFFICIAL + '82.4_T2T_ViTt_19.pth.tar', 1000, 224, 0.9, 'bsd-3-clause-clear', 82.4),
    't2t_vit_t_24.in1k': (OFFICIAL + '82.6_T2T_ViTt_24.pth.tar', 1000, 224, 0.9, 'bsd-3-clause-clear', 82.6),
    't2t_vit_14.in1k_ft_cifar10': (OFFICIAL + 'cifar10_t2t-vit_14_98.3.pth', 10, 224, 1.0, 'bsd-3-clause-clear', 98.3),
    't2t_vit_14.in1k_ft_cifar100': (
        OFFICIAL + 'cirfar100_t2t-vit-14_88.4.pth', 100, 224, 1.0, 'bsd-3-clause-clear', 88.4),
    't2t_vit_19.in1k_ft_cifar10': (OFFICIAL + 'cifar10_t2t-vit_19_98.4.pth', 10, 224, 1.0, 'bsd-3-clause-clear', 98.4),
    't2t_vit_19.in1k_ft_cifar100': (
        OFFICIAL + 'cifar100_t2t-vit-19_89.0.pth', 100, 224, 1.0, 'bsd-3-clause-clear', 89.0),
    't2t_vit_t_14.mmpretrain_in1k': (
        MMPRETRAIN + 't2t-vit-t-14_8xb64_in1k_20211220-f7378dd5.pth', 1000, 224, 0.9, 'apache-2.0', 81.83),
    't2t_vit_t_19.mmpretrain_in1k': (
        MMPRETRAIN + 't2t-vit-t-19_8xb64_in1k_20211214-7f5e3aaf.pth', 1000, 224, 0.9, 'apache-2.0', 82.63),
    't2t_vit_t_24.mmpretrain_in1k': (
        MMPRETRAIN + 't2t-vit-t-24_8xb64_in1k_20211214-b2a68ae3.pth', 1000, 224, 0.9, 'apache-2.0', 82.71),
}


# --- the registry -------------------------------------------------------------------------------------------------

def test_list_pretrained_is_exactly_the_released_files():
    assert set(timm.list_pretrained('t2t*')) == set(EXPECTED)
    for tag, (url, classes, size, crop_pct, license_name, top1) in EXPECTED.items():
        cfg = timm.models.get_pretrained_cfg(tag)
        assert (cfg.url, cfg.num_classes, cfg.input_size, cfg.crop_pct, cfg.license) == \
            (url, classes, (3, size, size), crop_pct, license_name), tag
        assert RELEASES[tag]['top1'] == top1 and f'top-1 {top1}%' in cfg.notes[0], tag
    # configurations no file backs stay tags, but are not presented as pretrained
    for tag in ('t2t_vit_19.in1k_384', 't2t_vit_24.in1k_384', 't2t_vit_t_14.in1k_384', 't2t_vit_14_se.in1k'):
        assert tag in timm.list_models('t2t*', include_tags=True) and not timm.models.get_pretrained_cfg(tag).url
    # the untagged name is the official file; the CIFAR tags use the statistics of the official transfer script
    with torch.device('meta'):
        assert timm.create_model('t2t_vit_t_14').pretrained_cfg['tag'] == 'in1k'
    cifar = timm.models.get_pretrained_cfg('t2t_vit_19.in1k_ft_cifar100')
    assert (cifar.mean, cifar.std, cifar.interpolation) == ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010),
                                                           'bilinear')


# --- a loopback release server --------------------------------------------------------------------------------------

class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; /cut/NAME sends NAME's full Content-Length, then only half the bytes and hangs up."""
    requests = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).requests.append(self.path)
        if self.path.startswith('/cut/'):
            data = (Path(self.directory) / self.path[len('/cut/'):]).read_bytes()
            self.send_response(200)
            self.send_header('Content-Length', str(len(data)))
            self.end_headers()
            self.wfile.write(data[:len(data) // 2])
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp('releases')
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(_Handler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield folder, f'http://127.0.0.1:{httpd.server_port}/'
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """timm's download cache (torch.hub's TORCH_HOME/hub/checkpoints), empty for each test."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    return tmp_path / 'torch' / 'hub' / 'checkpoints'


def _publish(server, name: str, payload) -> str:
    folder, base = server
    torch.save(payload, folder / name)
    return base + name


def _tiny(tiny_configs, name):
    """(registered builder, kwargs matching the tiny config, overlay keys the tiny file needs)."""
    config = tiny_configs[name]
    kwargs = dict(config['kwargs'])
    builder = {'T2T_ViT_SE': 't2t_vit_14_se', 'T2T_ViT_Ghost': 't2t_vit_16_ghost',
               'T2T_ViT_Dense': 't2t_vit_dense'}.get(config['official_class'])
    builder = builder or ('t2t_vit_t_14' if kwargs['tokens_type'] == 'transformer' else 't2t_vit_7')
    if builder != 't2t_vit_7':
        kwargs.pop('tokens_type')
    overlay = dict(num_classes=kwargs['num_classes'], input_size=tuple(config['input_shape'][1:]))
    return builder, kwargs, overlay


def _io(fixtures_dir, name):
    return torch.load(fixtures_dir / 'official' / f'{name}_io.pt', weights_only=True)


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


# --- downloads ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['tiny_performer', 'tiny_transformer_qkvbias', 'tiny_dense'])
def test_download_once_into_the_cache_and_match_the_official_outputs(
        server, cache, fixtures_dir, tiny_configs, name, capfd):
    folder, _ = server
    url = _publish(server, f'{name}.pth.tar', read_checkpoint(fixtures_dir / 'official' / f'{name}.pth.tar'))
    builder, kwargs, overlay = _tiny(tiny_configs, name)
    before = len(_Handler.requests)
    model = timm.create_model(builder, pretrained=True, pretrained_cfg_overlay=dict(overlay, url=url), **kwargs)
    assert len(_Handler.requests) == before + 1 and (cache / f'{name}.pth.tar').is_file()
    assert '100%' in capfd.readouterr().err  # the download's progress bar
    io = _io(fixtures_dir, name)
    torch.testing.assert_close(_logits(model, io['input']), io['logits'], rtol=0, atol=1e-5)
    assert 'state_dict' not in model.pretrained_cfg and model.pretrained_cfg['url'] == url
    (folder / f'{name}.pth.tar').unlink()  # the server no longer has it: the cached file serves
    again = timm.create_model(builder, pretrained=True, pretrained_cfg_overlay=dict(overlay, url=url), **kwargs)
    assert len(_Handler.requests) == before + 1
    torch.testing.assert_close(_logits(again, io['input']), io['logits'], rtol=0, atol=1e-5)


@pytest.mark.parametrize('override', [dict(num_classes=3), dict(in_chans=1), dict(img_size=96),
                                      dict(num_classes=7, in_chans=2, img_size=48)])
def test_overrides_adapt_as_the_file_path_does(server, cache, fixtures_dir, tiny_configs, override):
    name = 'tiny_performer'
    path = fixtures_dir / 'official' / f'{name}.pth.tar'
    url = _publish(server, 'overrides.pth.tar', read_checkpoint(path))
    builder, kwargs, overlay = _tiny(tiny_configs, name)
    kwargs.update(override)
    by_url = timm.create_model(builder, pretrained=True, pretrained_cfg_overlay=dict(overlay, url=url), **kwargs)
    torch.manual_seed(0)  # the same fresh head where the class count changes
    by_file = timm.create_model(builder, pretrained=True, pretrained_cfg_overlay=dict(overlay, file=str(path)),
                                **kwargs)
    assert (by_url.num_classes, by_url.in_chans) == (kwargs['num_classes'], kwargs.get('in_chans', 3))
    assert by_url.img_size == (kwargs['img_size'],) * 2
    expected, got = by_file.state_dict(), by_url.state_dict()
    checked = [k for k in expected if not (k.startswith('head.') and 'num_classes' in override)]
    assert all(torch.equal(got[k], expected[k]) for k in checked)
    ema = read_checkpoint(path)['state_dict_ema']
    if 'num_classes' not in override:
        assert torch.equal(got['head.weight'], ema['head.weight'])
    if 'in_chans' not in override and 'img_size' not in override:
        assert all(torch.equal(got[k], ema[k]) for k in ema if not k.startswith('head.'))


def test_a_1_channel_model_from_a_download_sees_grey_images_as_the_3_channel_one(server, cache, fixtures_dir,
                                                                                 tiny_configs):
    name = 'tiny_transformer'
    url = _publish(server, 'grey.pth.tar', read_checkpoint(fixtures_dir / 'official' / f'{name}.pth.tar'))
    builder, kwargs, overlay = _tiny(tiny_configs, name)
    rgb = timm.create_model(builder, pretrained=True, pretrained_cfg_overlay=dict(overlay, url=url), **kwargs)
    grey = timm.create_model(builder, pretrained=True, pretrained_cfg_overlay=dict(overlay, url=url),
                             **dict(kwargs, in_chans=1))
    x = torch.rand(2, 1, 64, 64)
    torch.testing.assert_close(_logits(grey, x), _logits(rgb, x.expand(-1, 3, -1, -1)), rtol=0, atol=1e-4)


# --- what the release files hold ----------------------------------------------------------------------------------

def test_cifar_transfer_format_loads(server, cache, fixtures_dir, tiny_configs):
    """transfer_learning.py saves {'net': DataParallel state dict, 'acc', 'epoch'}."""
    name = 'tiny_performer'
    ddp = read_checkpoint(fixtures_dir / 'official' / f'{name}_ddp_raw.pth')
    assert all(k.startswith('module.') for k in ddp)
    url = _publish(server, 'cifar10_tiny_98.3.pth', {'net': ddp, 'acc': 98.3, 'epoch': 59})
    builder, kwargs, overlay = _tiny(tiny_configs, name)
    model = timm.create_model(builder, pretrained=True, pretrained_cfg_overlay=dict(overlay, url=url), **kwargs)
    io = _io(fixtures_dir, name)
    torch.testing.assert_close(_logits(model, io['input']), io['logits'], rtol=0, atol=1e-5)


def test_token_labeling_aux_head_is_dropped_with_a_log_line(server, cache, fixtures_dir, tiny_configs, caplog):
    name = 'tiny_performer'
    ckpt = read_checkpoint(fixtures_dir / 'official' / f'{name}.pth.tar')
    weights = dict(ckpt['state_dict_ema'])
    weights.update({'aux_head.weight': torch.randn(10, 64), 'aux_head.bias': torch.randn(10)})
    args = argparse.Namespace(model='T2t_vit_24', token_label=True, dense_weight=0.5, model_ema=False)
    url = _publish(server, 'tl.pth.tar', {'epoch': 309, 'arch': 'T2t_vit_24', 'state_dict': weights, 'args': args})
    builder, kwargs, overlay = _tiny(tiny_configs, name)
    with caplog.at_level(logging.WARNING, logger='t2tvit'):
        model = timm.create_model(builder, pretrained=True, pretrained_cfg_overlay=dict(overlay, url=url), **kwargs)
    assert 'aux_head.weight, aux_head.bias' in caplog.text
    io = _io(fixtures_dir, name)
    torch.testing.assert_close(_logits(model, io['input']), io['logits'], rtol=0, atol=1e-5)

    weights['dist_head.weight'] = torch.randn(10, 64)  # anything else that does not fit fails by name
    url = _publish(server, 'tl_other.pth.tar', {'state_dict': weights, 'args': args})
    with pytest.raises(RuntimeError, match='dist_head.weight'):
        timm.create_model(builder, pretrained=True, pretrained_cfg_overlay=dict(overlay, url=url), **kwargs)


def _to_mmpretrain(state_dict):
    """Our names -> mmpretrain's ImageClassifier names, written out by hand (the inverse of the documented map)."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith('head.'):
            out['head.layers.' + key] = value
            continue
        key = key.replace('.norm1.', '.ln1.').replace('.norm2.', '.ln2.')
        key = key.replace('.mlp.fc1.', '.ffn.layers.0.0.').replace('.mlp.fc2.', '.ffn.layers.1.')
        if key.startswith('blocks.'):
            key = 'encoder.' + key[len('blocks.'):]
        out['backbone.' + key] = value
    return out


def test_mmpretrain_layout_maps_one_to_one():
    model = T2TViT(tokens_type='transformer', img_size=32, embed_dim=32, depth=2, num_heads=2, token_dim=8,
                   num_classes=4)
    ours = model.state_dict()
    theirs = _to_mmpretrain(ours)
    assert 'backbone.encoder.1.ffn.layers.0.0.weight' in theirs and 'head.layers.head.bias' in theirs
    assert 'backbone.tokens_to_token.attention1.ln1.weight' in theirs and 'backbone.norm.weight' in theirs
    mapped = from_mmpretrain(theirs)
    assert mapped.keys() == ours.keys() and all(mapped[k] is ours[k] for k in ours)


def test_mmpretrain_checkpoint_loads_its_ema_parameters(server, cache, fixtures_dir, tiny_configs, caplog):
    """mmcv's EMAHook leaves the EMA weights in the parameters and the raw ones in top-level ema_* buffers."""
    name = 'tiny_transformer'
    ckpt = read_checkpoint(fixtures_dir / 'official' / f'{name}.pth.tar')
    state = _to_mmpretrain(ckpt['state_dict_ema'])
    state.update({'ema_' + k.replace('.', '_'): v for k, v in _to_mmpretrain(ckpt['state_dict']).items()
                  if k != 'backbone.pos_embed'})
    meta = {'mmcls_version': '0.19.0', 'epoch': 310, 'iter': 781550, 'CLASSES': ('tench', 'goldfish'),
            'config': "model = dict(type='ImageClassifier')", 'hook_msgs': {'best_score': 81.83}}
    url = _publish(server, 't2t-vit-t-tiny_in1k_20211220.pth', {'meta': meta, 'state_dict': state})
    builder, kwargs, overlay = _tiny(tiny_configs, name)
    with caplog.at_level(logging.INFO, logger='t2tvit'):
        model = timm.create_model(builder, pretrained=True, pretrained_cfg_overlay=dict(overlay, url=url), **kwargs)
    assert 'ema_* buffers' in caplog.text
    io = _io(fixtures_dir, name)
    torch.testing.assert_close(_logits(model, io['input']), io['logits'], rtol=0, atol=1e-5)


# --- untrusted downloads ------------------------------------------------------------------------------------------

class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return open, (str(self.marker), 'w')


def test_a_pickle_that_would_run_code_is_refused_and_not_cached(server, cache, tmp_path, tiny_configs):
    marker = tmp_path / 'ran'
    url = _publish(server, 'evil.pth.tar', {'state_dict': {'x': torch.zeros(1)}, 'payload': _Payload(marker)})
    builder, kwargs, overlay = _tiny(tiny_configs, 'tiny_performer')
    with pytest.raises(CheckpointError, match='refused to unpickle') as info:
        timm.create_model(builder, pretrained=True, pretrained_cfg_overlay=dict(overlay, url=url), **kwargs)
    assert 'removed from the cache' in str(info.value)
    assert not marker.exists() and not (cache / 'evil.pth.tar').exists()


@pytest.mark.parametrize('broken', ['cut', 'html'])
def test_a_broken_download_fails_clearly_and_leaves_nothing_in_the_cache(
        server, cache, fixtures_dir, tiny_configs, broken):
    folder, base = server
    name = 'tiny_performer'
    (folder / 'release.pth.tar').write_bytes((fixtures_dir / 'official' / f'{name}.pth.tar').read_bytes())
    (folder / 'page.pth.tar').write_text('<html><body>Sign in to continue</body></html>')
    url = base + ('cut/release.pth.tar' if broken == 'cut' else 'page.pth.tar')
    builder, kwargs, overlay = _tiny(tiny_configs, name)
    with pytest.raises(CheckpointError, match='not a usable checkpoint and was removed from the cache'):
        timm.create_model(builder, pretrained=True, pretrained_cfg_overlay=dict(overlay, url=url), **kwargs)
    assert not cache.exists() or not any(cache.iterdir())
    if broken == 'cut':  # the next try downloads afresh
        overlay['url'] = base + 'release.pth.tar'
        model = timm.create_model(builder, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        io = _io(fixtures_dir, name)
        torch.testing.assert_close(_logits(model, io['input']), io['logits'], rtol=0, atol=1e-5)


def test_an_unreachable_url_names_the_url_and_the_file_fallback(cache, tiny_configs):
    builder, kwargs, overlay = _tiny(tiny_configs, 'tiny_performer')
    with pytest.raises(CheckpointError, match="could not download http://127.0.0.1:9/x.pth.*dict\\(file="):
        overlay['url'] = 'http://127.0.0.1:9/x.pth'  # the discard port: nothing listens
        timm.create_model(builder, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)


# --- hub model folders --------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['tiny_performer', 'tiny_transformer', 'tiny_performer_gray32',
                                  'tiny_transformer_qkvbias', 'tiny_se', 'tiny_ghost', 'tiny_dense'])
def test_hub_folder_round_trip_gives_identical_outputs(fixtures_dir, tiny_configs, tmp_path, name):
    builder, kwargs, _ = _tiny(tiny_configs, name)
    restored = restore_model(str(fixtures_dir / 'official' / f'{name}.pth.tar'), builder, kwargs)
    result = export_hf(restored, tmp_path / 'hub')
    assert sorted(p.name for p in (tmp_path / 'hub').iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    assert result.max_abs_diff == 0.0
    config = json.loads((tmp_path / 'hub' / 'config.json').read_text())
    assert config['architecture'] == builder and config['num_classes'] == kwargs['num_classes']
    assert config['pretrained_cfg']['input_size'][0] == kwargs.get('in_chans', 3)
    assert 'notes' not in config['pretrained_cfg']  # the official release notes do not describe this file
    loaded = timm.create_model(f'local-dir:{tmp_path / "hub"}', pretrained=True)
    x = torch.randn(2, *config['pretrained_cfg']['input_size'])
    assert torch.equal(_logits(loaded, x), _logits(restored.model, x))
    assert isinstance(loaded, T2TViT) and loaded.num_classes == kwargs['num_classes']
    card = (tmp_path / 'hub' / 'README.md').read_text()
    assert 'license: other' in card and 'Yuan_2021_ICCV' in card and f'{name}.pth.tar' in card


@pytest.mark.parametrize('name, kwargs', [
    ('t2t_vit_c_14', dict(img_size=64, num_classes=7)),  # convolution tokenizer
    ('t2t_vit_p_14', dict(img_size=64, in_chans=1, num_classes=3)),  # patch tokenizer, 1 channel
    ('t2t_vit_mini.fmnist', dict(token_dim=8)),  # small-image soft splits, 1 x 28 x 28
])
def test_hub_folder_round_trip_of_the_other_tokenizers(tmp_path, name, kwargs):
    restored = restore_model(None, name, dict(kwargs, embed_dim=32, depth=1, num_heads=2))
    result = export_hf(restored, tmp_path / 'hub')
    assert result.max_abs_diff == 0.0
    loaded = timm.create_model(f'local-dir:{tmp_path / "hub"}', pretrained=True)
    assert (loaded.in_chans, loaded.num_classes, loaded.img_size) == \
        (restored.model.in_chans, restored.model.num_classes, restored.model.img_size)
    x = torch.randn(2, loaded.in_chans, *loaded.img_size)
    assert torch.equal(_logits(loaded, x), _logits(restored.model, x))


def test_hub_export_refuses_a_file_as_the_folder(tmp_path):
    (tmp_path / 'taken').write_text('x')
    restored = restore_model(None, 't2t_vit_mini', dict(embed_dim=32, depth=1, num_heads=2, token_dim=8))
    with pytest.raises(ValueError, match='is a file; --format hf writes a folder'):
        export_hf(restored, tmp_path / 'taken')


# --- the command line: tags, --pretrained, checkpoint args --------------------------------------------------------

@pytest.fixture
def cached_release(cache):
    """A full-size T2T-ViT-7 in the official format, in the cache under the name of the real release file."""
    torch.manual_seed(0)
    model = timm.create_model('t2t_vit_7')
    args = argparse.Namespace(model='T2t_vit_7', img_size=224, num_classes=1000, crop_pct=None, interpolation='')
    cache.mkdir(parents=True)
    torch.save({'epoch': 309, 'arch': 'T2t_vit_7', 'version': 2, 'args': args, 'metric': 71.68,
                'state_dict': {k: torch.zeros_like(v) for k, v in model.state_dict().items()},
                'state_dict_ema': model.state_dict()}, cache / '71.7_T2T_ViT_7.pth.tar')
    return model.eval()


def test_predict_with_a_pretrained_tag_prints_imagenet_labels(cached_release, tmp_path, capsys):
    from PIL import Image
    image = tmp_path / 'photo.png'
    Image.new('RGB', (300, 260), (200, 120, 40)).save(image)
    assert cli(['predict', str(image), '--model', 't2t_vit_7.in1k', '--pretrained', '--topk', '3',
                '--device', 'cpu']) == 0
    out, err = capsys.readouterr()
    names = imagenet_classes()
    lines = out.splitlines()
    assert lines[0] == str(image) and len(lines) == 4
    assert all(line.split('%  ', 1)[1] in names for line in lines[1:])
    assert 'model=t2t_vit_7.in1k (flag)' in err and 'crop_pct=0.9' in err
    assert cli(['predict', str(image), '--model', 't2t_vit_24.in1k_384', '--pretrained']) == 2
    assert 'released weights: t2t_vit_24.in1k, t2t_vit_24.tl_in1k' in capsys.readouterr().err


def test_export_hf_from_a_pretrained_tag(cached_release, tmp_path, capsys):
    out = tmp_path / 'hub'
    assert cli(['export', '--format', 'hf', '--model', 't2t_vit_7.in1k', '--pretrained', '--output', str(out)]) == 0
    assert 'max |create_model' in capsys.readouterr().out
    card = (out / 'README.md').read_text()
    assert 'license: bsd-3-clause-clear' in card and EXPECTED['t2t_vit_7.in1k'][0] in card and '71.7%' in card
    assert '71.68% (stored in the source checkpoint)' in card  # the checkpoint's metric, on the Recorded top-1 line
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True)
    x = torch.randn(1, 3, 224, 224)
    assert torch.equal(_logits(loaded, x), _logits(cached_release, x))
    assert loaded.pretrained_cfg['license'] == 'bsd-3-clause-clear'


def test_finetune_starts_from_a_pretrained_tag(cached_release):
    model = timm.create_model('t2t_vit_7', num_classes=10)
    reset = load_pretrained_weights(model, 't2t_vit_7.in1k')
    assert reset == ['head.weight', 'head.bias']
    assert torch.equal(model.blocks[3].mlp.fc1.weight, cached_release.blocks[3].mlp.fc1.weight)


def test_checkpoint_args_set_model_size_and_preprocessing(tmp_path, capsys):
    """A T2T-ViT-7 trained at 64 px by timm's train.py (--model-kwargs img_size=64) is rebuilt at 64 px."""
    torch.manual_seed(0)
    small = dict(depth=1, embed_dim=32, num_heads=2, token_dim=8)  # T2T-ViT-7's tokenizer, fewer and thinner blocks
    source = timm.create_model('t2t_vit_7', img_size=64, num_classes=5, **small)
    args = argparse.Namespace(model='t2t_vit_7', model_kwargs=dict(small, img_size=64), img_size=None, input_size=None,
                              in_chans=None, num_classes=5, crop_pct=0.95, interpolation='bilinear', mean=None,
                              std=None)
    path = tmp_path / 'model_best.pth.tar'
    torch.save({'arch': 't2t_vit_7', 'state_dict': source.state_dict(), 'args': args, 'metric': 55.5}, path)
    restored = restore_model(str(path))
    assert restored.model.img_size == (64, 64) and restored.model.num_classes == 5
    assert (restored.preprocess['crop_pct'], restored.preprocess['interpolation']) == (0.95, 'bilinear')
    assert restored.sources['img_size'] == restored.sources['crop_pct'] == 'checkpoint args'
    described = restored.describe_sources()
    assert 'model=t2t_vit_7, depth=1, embed_dim=32, num_heads=2, token_dim=8, img_size=64, crop_pct=0.95, ' \
           'interpolation=bilinear (checkpoint args); num_classes=5 (checkpoint weights)' in described
    flagged = restore_model(str(path), img_size=96, crop_pct=1.0)  # flags win
    assert flagged.model.img_size == (96, 96) and flagged.sources['img_size'] == 'flag'
    assert flagged.preprocess['crop_pct'] == 1.0


def test_pretrained_flags_need_a_tag_and_exclude_a_checkpoint(tmp_path, capsys):
    assert cli(['finetune', '--pretrained', '--dataset', 'fake']) == 2
    assert '--pretrained needs --model TAG' in capsys.readouterr().err
    assert cli(['finetune', '--dataset', 'fake']) == 2
    assert 'give --checkpoint FILE to start from, or --model TAG --pretrained' in capsys.readouterr().err
    (tmp_path / 'x.pth').write_bytes(b'')  # exists: the two weight sources are what is refused
    assert cli(['predict', str(tmp_path), '--checkpoint', str(tmp_path / 'x.pth'), '--model', 't2t_vit_7.in1k',
                '--pretrained']) == 2
    assert 'not both' in capsys.readouterr().err
    assert cli(['eval', '--dataset', 'fake']) == 2
    assert 'give --checkpoint FILE, or --model TAG --pretrained' in capsys.readouterr().err
