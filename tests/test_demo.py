"""The README's demo end to end: Fashion-MNIST from Debian's package, training from scratch, test evaluation.

Slow (12 min 22 s on 2 CPU cores on 2026-12-02; 8 min 53 s on an Intel AMX host on 2026-12-06): run by
`make test-all`, not `make test`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from t2tvit.cli.main import main as cli
from t2tvit.data import DataError, fetch_fashion_mnist

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fashion_mnist_demo_reaches_90_percent(tmp_path):
    data = REPO / 'data' / 'fashion-mnist'
    if shutil.which('apt-get') is None and not data.exists():
        pytest.skip('no apt-get here to fetch Fashion-MNIST, and no copy under data/')
    try:
        fetch_fashion_mnist(data)
    except DataError as e:
        pytest.skip(str(e))
    assert cli(['train', '--config', 'fashion_mnist', '--data', str(data), '--output', str(tmp_path),
                '--run-name', 'demo', '--progress', 'off']) == 0
    run = tmp_path / 'demo'
    records = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
    # best.pth was chosen on training images held out by seed, never on the test images
    assert {(r['split'], r['samples']) for r in records if r['type'] == 'eval'} == {('held-out', 5000)}
    assert cli(['eval', '--checkpoint', str(run / 'best.pth'), '--data', str(data), '--split', 'test',
                '--workers', '0', '--output', str(run / 'test-eval')]) == 0
    report = json.loads((run / 'test-eval' / 'eval.json').read_text())
    assert report['samples'] == 10000
    assert report['top1'] >= 90.0, report['top1']
    for name in ('curves.png', 'confusion_matrix.png', 'metrics.jsonl', 'last.pth'):
        assert (run / name).is_file()
