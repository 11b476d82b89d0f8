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
