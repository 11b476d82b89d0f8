"""`t2tvit visualize IMAGE --compare A,B`: feature maps of several models at comparable depths, invalid channels."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from t2tvit.cli.main import main
from t2tvit.engine.config import ConfigError
from t2tvit.tools.compare import CONSTANT_REL, ZERO_ABS, invalid_channels, parse_compare


@pytest.fixture()
def image(tmp_path):
    picture = Image.new('L', (28, 28), 0)
    picture.paste(200, (6, 4, 22, 24))  # a bright block: edges for the maps to show
    path = tmp_path / 'block.png'
    picture.save(path)
    return path


def test_invalid_channels_by_the_documented_thresholds():
    torch.manual_seed(0)
    fmap = torch.randn(6, 5, 5)  # spatial stds near 1
    fmap[1] = 0.0  # zero
    fmap[2] = 3.0 + 1e-4 * torch.randn(5, 5)  # near-constant: far below 1% of the median spread
    fmap[3] = 5e-7  # below ZERO_ABS in magnitude: zero, not counted twice
    counts = invalid_channels(fmap)
    assert (counts['channels'], counts['zero'], counts['near_constant']) == (6, 2, 1)
    assert counts['invalid_share'] == pytest.approx(3 / 6)
    assert (ZERO_ABS, CONSTANT_REL) == (1e-6, 0.01)


def test_parse_compare():
    assert parse_compare('resnet18, t2t_vit_14=runs/x ,') == [('resnet18', None), ('t2t_vit_14', 'runs/x')]
    with pytest.raises(ConfigError, match='two or more models'):
        parse_compare('resnet18')
    with pytest.raises(ConfigError, match='give NAME or NAME=CHECKPOINT'):
        parse_compare('resnet18,t2t_vit_14=')


def test_compare_two_tiny_models_writes_the_figure_and_the_json(image, tmp_path, capsys):
    out = tmp_path / 'pictures'
    assert main(['visualize', str(image), '--compare', 'test_vit,test_convnext', '-o', str(out),
                 '--channels', '4']) == 0
    printed = capsys.readouterr().out
    assert 'test_vit: patch_embed' in printed and '% invalid' in printed and 'block_compare.json' in printed
    record = json.loads((out / 'block_compare.json').read_text())
    assert record['thresholds']['zero_abs'] == 1e-6 and record['thresholds']['constant_rel_std'] == 0.01
    assert 'near-constant' in record['thresholds']['definition'] and record['depths'] == [0.0, 0.5, 1.0]
    assert [m['model'] for m in record['models']] == ['test_vit', 'test_convnext']
    vit, cnn = record['models']
    assert vit['weights'] == 'random' and vit['checkpoint'] is None
    assert [layer['layer'] for layer in vit['layers']][:2] == ['patch_embed', 'blocks.0']
    assert [layer['layer'] for layer in cnn['layers'] if layer['shown']] == ['stages.0', 'stages.2', 'stages.3']
    for model in record['models']:
        shown = [layer for layer in model['layers'] if layer['shown']]
        assert len(shown) == 3 and shown[0]['depth'] == 0.0 and shown[-1]['depth'] == 1.0
        for layer in model['layers']:
            assert layer['channels'] == layer['shape'][0]
            assert layer['invalid_share'] == pytest.approx((layer['zero'] + layer['near_constant']) / layer['channels'])
    with Image.open(out / 'block_compare.png') as picture:
        assert picture.format == 'PNG' and picture.width > 500
    # a second run refuses to replace what the first wrote
    assert main(['visualize', str(image), '--compare', 'test_vit,test_convnext', '-o', str(out)]) == 2


@pytest.mark.parametrize('models,message', [
    ('test_vit', 'give two or more models'),
    ('test_vit,no_such_model', "unknown model 'no_such_model'"),
    ('test_vit,test_vit=missing-folder', 'is neither a checkpoint file nor a run folder holding last.pth'),
])
def test_compare_refuses_bad_input_in_one_line(image, tmp_path, capsys, models, message):
    assert main(['visualize', str(image), '--compare', models, '-o', str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith('error: ') and err.strip().count('\n') == 0
