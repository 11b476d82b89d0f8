"""Shared test set-up: where the official reference fixtures live, and small model builders."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import t2tvit  # noqa: F401  (registers the models)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get('T2TVIT_FIXTURES', REPO.parent / 'shared' / 'fixtures'))

# one thread per xdist worker: two workers on two cores, no oversubscription
torch.set_num_threads(1 if os.environ.get('PYTEST_XDIST_WORKER') else min(2, torch.get_num_threads()))


def _require_fixtures() -> Path:
    if not (FIXTURES / 'official' / 'tiny_configs.json').is_file():
        message = f'official fixtures not found under {FIXTURES}; set T2TVIT_FIXTURES to the shared/fixtures folder'
        if os.environ.get('CI'):
            pytest.fail(message)  # CI has them beside the clone: a missing copy is a failure, not a skip
        pytest.skip(message)
    return FIXTURES


@pytest.fixture(scope='session')
def fixtures_dir() -> Path:
    return _require_fixtures()


@pytest.fixture(scope='session')
def tiny_configs(fixtures_dir) -> dict:
    return json.loads((fixtures_dir / 'official' / 'tiny_configs.json').read_text())


@pytest.fixture(scope='session')
def official_variants(fixtures_dir) -> dict:
    return json.loads((fixtures_dir / 'official_variants.json').read_text())


TINY_RUN_MODEL = {'embed_dim': 32, 'depth': 2, 'num_heads': 2, 'token_dim': 8, 't2t_drop_rate': 0.0}


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory) -> Path:
    """A checkpoint as `t2tvit train` writes it: a 2-block t2t_vit_mini trained briefly on 4 classes of fake RGB
    images at 32 px (config, class names and weights inside)."""
    from t2tvit.engine import resolve_config, train
    out = tmp_path_factory.mktemp('tiny_run')
    config = resolve_config(None, dict(
        model='t2t_vit_mini', model_kwargs=TINY_RUN_MODEL, dataset='fake', img_size=32, in_chans=3, num_classes=4,
        fake_num_samples=64, batch_size=16, epochs=2, workers=0, drop_path=0.0, warmup_epochs=0, lr=3e-3,
        lr_base_size=16, progress='off', smoothing=0.0, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], aa=None,
        color_jitter=None, scale=[0.5, 1.0], output=str(out), run_name='run', seed=3))
    return train(config).run_dir / 'best.pth'
