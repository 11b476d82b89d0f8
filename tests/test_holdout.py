"""Model selection on images held out of the training split: the test split is never read during training."""
from __future__ import annotations

import importlib
import json

import pytest
import torch

from t2tvit.cli.main import main as cli
from t2tvit.data import DataError, FakeDataset, holdout_split
from t2tvit.data.holdout import holdout_indices
from t2tvit.engine import ConfigError, resolve_config, train
from t2tvit.engine.config import load_recipe
from t2tvit.models import read_checkpoint
from test_engine import TINY_MODEL, tiny_config

build_module = importlib.import_module('t2tvit.engine.build')


def test_holdout_is_a_seeded_partition_of_the_training_split():
    kept, held = holdout_indices(100, 20, seed=3)
    assert len(held) == 20 and len(kept) == 80
    assert sorted(kept + held) == list(range(100))
    assert holdout_indices(100, 20, seed=3) == (kept, held)  # the same whichever process or resumed run asks
    assert holdout_indices(100, 20, seed=4)[1] != held


def test_holdout_subsets_keep_classes_and_samples():
    base = FakeDataset(40, num_classes=4, image_size=8, in_chans=1, seed=1)
    train_part, val_part = holdout_split(base, 10, seed=0)
    assert (len(train_part), len(val_part)) == (30, 10)
    assert train_part.classes == val_part.classes == base.classes and val_part.num_classes == 4
    index = val_part.indices[0]
    image, label = val_part[0]
    assert label == base[index][1] and image.tobytes() == base[index][0].tobytes()


@pytest.mark.parametrize('size', [0, -5, 40, 41, 2.5, True])
def test_bad_holdout_size_names_the_fix(size):
    with pytest.raises(DataError, match='val_holdout'):
        holdout_indices(40, size, seed=0)


def test_holdout_of_a_stream_is_refused_naming_the_way_out():
    class Stream:  # what WdsDataset offers: a length, but samples only through stream()
        streaming = True
        classes = ['a', 'b']

        def __len__(self):
            return 100

    with pytest.raises(DataError, match=r'needs random access .* pass --val-holdout 0'):
        holdout_split(Stream(), 10, seed=0)


def test_config_refuses_a_negative_holdout():
    with pytest.raises(ConfigError, match='val_holdout'):
        resolve_config(None, {'val_holdout': -1})


def test_training_with_holdout_never_reads_the_validation_split(tmp_path, monkeypatch):
    real = build_module.dataset_split
    splits = []

    def recording(config, split):
        splits.append(split)
        return real(config, split)

    monkeypatch.setattr(build_module, 'dataset_split', recording)
    result = train(tiny_config(tmp_path, 'held', val_holdout=16))
    assert splits == ['train']
    records = [json.loads(line) for line in (result.run_dir / 'metrics.jsonl').read_text().splitlines()]
    evals = [r for r in records if r['type'] == 'eval']
    assert [r['samples'] for r in evals] == [16, 16] and {r['split'] for r in evals} == {'held-out'}
    assert result.global_step == 2 * ((64 - 16) // 16)  # the held-out images are not trained on
    best = read_checkpoint(result.run_dir / 'best.pth')
    assert best['config']['val_holdout'] == 16 and best['best_top1'] == max(r['top1'] for r in evals)


def test_holdout_larger_than_the_training_split_is_one_error_line(tmp_path, capsys):
    config = tiny_config(tmp_path, 'too-many')
    args = ['train', '--model', 't2t_vit_mini', '--model-kwargs', json.dumps(TINY_MODEL), '--dataset', 'fake',
            '--img-size', '16', '--in-chans', '1', '--fake-num-samples', '64', '--val-holdout', '64',
            '--batch-size', '16', '--workers', '0', '--output', config['output'], '--run-name', 'too-many',
            '--progress', 'off']
    assert cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'val_holdout=64 leaves no training images' in err[0], err


def test_the_demo_recipe_selects_on_held_out_training_images():
    recipe = load_recipe('fashion_mnist')
    assert recipe['val_holdout'] == 5000


def test_a_stream_cannot_be_held_out_and_says_what_to_pass():
    class Stream(torch.utils.data.IterableDataset):
        def __len__(self):  # timm's WebDataset reader knows its length but gives no random access
            return 100

        def __iter__(self):
            return iter(range(100))

    with pytest.raises(DataError, match=r'a stream \(--dataset wds\) does not give: pass --val-holdout 0'):
        holdout_split(Stream(), 10, seed=0)
