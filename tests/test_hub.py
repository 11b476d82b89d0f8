"""`t2tvit export --format hf` folders read by timm (`local-dir:`) and by Hugging Face transformers (TimmWrapper):
the same logits, the same input tensor, and the model card's snippets run as written."""
from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification  # the dev extra installs it

import t2tvit  # noqa: F401  (registers the architectures transformers builds through timm)
from t2tvit.cli.main import main as cli
from t2tvit.engine.restore import restore_model



def _photo(size=(45, 37), mode='RGB', seed=0) -> Image.Image:
    chans = 1 if mode == 'L' else 3
    pixels = (np.random.RandomState(seed).rand(size[1], size[0], chans) * 255).astype('uint8')
    return Image.fromarray(pixels.squeeze(-1) if chans == 1 else pixels, mode)


@pytest.fixture(scope='module')
def hub_folder(tiny_run, tmp_path_factory) -> Path:
    """The tiny trained run (4 classes, 3 x 32 x 32) exported through the command line."""
    out = tmp_path_factory.mktemp('hub') / 'tiny-hub'
    assert cli(['export', '--format', 'hf', '--checkpoint', str(tiny_run), '-o', str(out)]) == 0
    return out


def test_config_names_num_classes_once_and_the_classes(hub_folder, tiny_run):
    config = json.loads((hub_folder / 'config.json').read_text())
    restored = restore_model(str(tiny_run))
    assert 'num_classes' not in config['model_args']  # transformers passes it itself
    assert config['num_classes'] == 4 == config['pretrained_cfg']['num_classes']
    assert config['label_names'] == restored.classes and len(restored.classes) == 4


def test_transformers_and_timm_give_the_same_logits_and_input(hub_folder, tiny_run):
    model = AutoModelForImageClassification.from_pretrained(hub_folder).eval()
    processor = AutoImageProcessor.from_pretrained(hub_folder)
    reference = timm.create_model(f'local-dir:{hub_folder}', pretrained=True).eval()
    source = restore_model(str(tiny_run))
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=reference))
    images = [_photo(seed=s, size=(40 + 7 * s, 33 + 5 * s)) for s in range(3)]
    pixels = processor(images, return_tensors='pt')['pixel_values']
    expected = torch.stack([transform(image) for image in images])
    assert pixels.shape == (3, 3, 32, 32)
    assert torch.equal(pixels, expected)
    with torch.no_grad():
        got = model(pixel_values=pixels).logits
        want = reference(expected)
        trained = source.model.eval()(expected)
    diff = (got - want).abs().max().item()
    print(f'max |transformers - timm local-dir| = {diff:.2e}; vs the checkpoint {(got - trained).abs().max():.2e}')
    assert got.shape == (3, 4)
    assert diff <= 1e-6 and (got - trained).abs().max().item() <= 1e-6
    assert [model.config.id2label[i] for i in range(4)] == source.classes


def _snippets(card: str):
    return re.findall(r'```python\n(.*?)```', card, flags=re.S)


def test_the_model_card_snippets_run(hub_folder, tiny_run, tmp_path, monkeypatch):
    card = (hub_folder / 'README.md').read_text()
    blocks = _snippets(card)
    assert len(blocks) == 2 and 'AutoModelForImageClassification' in blocks[1]
    _photo().save(tmp_path / 'image.png')
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    for block in blocks:
        code = (block.replace('hf-hub:ORG/REPO', f'local-dir:{hub_folder}')
                .replace("'ORG/REPO'", repr(str(hub_folder))))
        assert 'ORG/REPO' not in code
        scope: dict = {}
        with contextlib.redirect_stdout(printed):
            exec(compile(code, 'README.md', 'exec'), scope)  # noqa: S102  (the card's own example)
    assert printed.getvalue().strip() in restore_model(str(tiny_run)).classes
    assert tuple(scope['logits'].shape) == (1, 4)


def test_a_one_channel_model_round_trips_through_transformers(tmp_path):
    restored = restore_model(None, 't2t_vit_mini.fmnist', dict(embed_dim=32, depth=1, num_heads=2, token_dim=8))
    out = tmp_path / 'gray'
    assert cli(['export', '--format', 'hf', '--model', 't2t_vit_mini.fmnist', '--model-kwargs',
                '{embed_dim: 32, depth: 1, num_heads: 2, token_dim: 8}', '-o', str(out)]) == 0
    card = (out / 'README.md').read_text()
    assert ".convert('L')" in card
    model = AutoModelForImageClassification.from_pretrained(out).eval()
    processor = AutoImageProcessor.from_pretrained(out)
    reference = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    image = _photo(size=(30, 30), mode='L')
    pixels = processor(image, return_tensors='pt')['pixel_values']
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=reference))
    assert pixels.shape == (1, 1, 28, 28) and torch.equal(pixels, transform(image).unsqueeze(0))
    with torch.no_grad():
        diff = (model(pixel_values=pixels).logits - reference(pixels)).abs().max().item()
    print(f'1-channel: max |transformers - timm local-dir| = {diff:.2e}')
    assert diff <= 1e-6
    assert model.config.num_labels == restored.model.num_classes == 10


def test_the_folder_is_a_hub_repository(hub_folder, tmp_path, monkeypatch):
    """Uploaded as is, `hf-hub:ORG/REPO` (timm) and `ORG/REPO` (transformers) load it: here from a hub cache
    holding the folder as the repository's main revision, offline."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    cache, revision = tmp_path / 'hub-cache', '0' * 40
    repo = cache / 'models--org--t2t-tiny'
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(revision)
    shutil.copytree(hub_folder, repo / 'snapshots' / revision)
    from_timm = timm.create_model('hf-hub:org/t2t-tiny', pretrained=True, cache_dir=cache).eval()
    from_transformers = AutoModelForImageClassification.from_pretrained('org/t2t-tiny', cache_dir=cache).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # to fp32 rounding: transformers' weights sit at other addresses, where a CPU product may add in another order
        assert (from_transformers(pixel_values=x).logits - from_timm(x)).abs().max().item() <= 1e-6
    assert from_timm.num_classes == from_transformers.config.num_labels == 4
