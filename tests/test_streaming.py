"""Sharded data: convert-data to wds and hfds, reading both, the split over 2 processes, resume, bad input."""
from __future__ import annotations

import collections
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import t2tvit.data.convert as convert_module
from t2tvit.cli.main import main as cli
from t2tvit.data import DataError, build_dataset
from t2tvit.data.datasets import FASHION_MNIST_CLASSES
from t2tvit.data.streaming import HfdsDataset, WdsDataset
from t2tvit.engine import resolve_config, train
from t2tvit.models import read_checkpoint
from t2tvit.outputs import OutputError

N_TRAIN, N_TEST = 48, 12
TINY_MODEL = {'embed_dim': 32, 'depth': 1, 'num_heads': 2, 'token_dim': 8, 't2t_drop_rate': 0.0}


@pytest.fixture(autouse=True)
def hf_cache(tmp_path_factory, monkeypatch):
    """datasets caches what it reads; keep that out of the user's cache (and work offline)."""
    import datasets
    cache = tmp_path_factory.getbasetemp() / 'hf-cache'
    monkeypatch.setattr(datasets.config, 'HF_DATASETS_CACHE', cache)
    monkeypatch.setenv('HF_DATASETS_CACHE', str(cache))
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b''.join(int(d).to_bytes(4, 'big') for d in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def sample_id(image) -> int:
    """The index written into the first two pixels of every image made by `make_fashion_mnist`."""
    pixels = np.asarray(image)
    return int(pixels[0, 0]) + 256 * int(pixels[0, 1])


def make_fashion_mnist(folder: Path, n_train: int = N_TRAIN, n_test: int = N_TEST) -> dict:
    """IDX files as distributed; image i (train and test numbered on) carries i in its first pixels and a
    class-coloured background, so a tiny model can learn it and a test can tell every sample apart."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays, start = {}, 0
    for prefix, n in (('train', n_train), ('t10k', n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = (labels[:, None, None] * 25 + rng.integers(0, 20, (n, 28, 28))).astype(np.uint8)
        ids = np.arange(start, start + n)
        images[:, 0, 0], images[:, 0, 1] = ids % 256, ids // 256
        write_idx(folder / f'{prefix}-images-idx3-ubyte', images)
        write_idx(folder / f'{prefix}-labels-idx1-ubyte', labels)
        arrays[prefix] = (images, labels)
        start += n
    return arrays


@pytest.fixture(scope='module')
def stores(tmp_path_factory):
    """Fashion-MNIST-like IDX files and both conversions (10 samples per shard)."""
    root = tmp_path_factory.mktemp('stores')
    arrays = make_fashion_mnist(root / 'idx')
    out = {'idx': root / 'idx', 'arrays': arrays}
    for fmt in ('wds', 'hfds'):
        assert cli(['convert-data', '--dataset', 'fashion_mnist', '--data', str(root / 'idx'), '--to', fmt,
                    '--output', str(root / fmt), '--shard-size', '10']) == 0
        out[fmt] = root / fmt
    return out


def identity_pairs(images, labels, offset=0):
    return sorted((offset + i, int(labels[i])) for i in range(len(labels)))


# ----------------------------------------------------------------------------------------------------------------
# conversion


def test_wds_conversion_writes_timms_split_info_and_every_sample(stores):
    info = json.loads((stores['wds'] / '_info.json').read_text())
    assert info['classes'] == FASHION_MNIST_CLASSES and info['t2tvit']['source'] == 'fashion_mnist'
    train_info, test_info = info['splits']['train'], info['splits']['test']
    assert train_info['shard_lengths'] == [10, 10, 10, 10, 8] and train_info['num_samples'] == N_TRAIN
    assert test_info['filenames'] == ['test-000000.tar', 'test-000001.tar'] and test_info['shard_lengths'] == [10, 2]
    with tarfile.open(stores['wds'] / 'train-000000.tar') as tar:
        names = tar.getnames()
    assert sorted(names[:2]) == ['train_00000000.cls', 'train_00000000.png']

    images, labels = stores['arrays']['t10k']
    test = build_dataset('wds', str(stores['wds']), 'test', in_chans=1)
    assert isinstance(test, WdsDataset) and test.split == 'test' and len(test) == N_TEST
    assert test.classes == FASHION_MNIST_CLASSES
    read = list(test.stream(None, training=False, batch_size=4, workers=0))
    assert read[0][0].mode == 'L' and read[0][0].size == (28, 28)
    # lossless: the pixels and the labels come back, test samples in their source order
    assert [sample_id(im) for im, _ in read] == list(range(N_TRAIN, N_TRAIN + N_TEST))
    for (image, label), source, source_label in zip(read, images, labels):
        assert np.array_equal(np.asarray(image), source) and label == source_label
    # the project's 'val' is the test split where a source has no other
    assert build_dataset('wds', str(stores['wds']), 'val', in_chans=1).split == 'test'


def test_training_stream_reads_each_sample_once_in_a_shuffled_order(stores):
    train_set = build_dataset('wds', str(stores['wds']), 'train', in_chans=1)
    images, labels = stores['arrays']['train']
    orders = []
    for epoch in (0, 1):
        stream = train_set.stream(sample_id, training=True, batch_size=1, workers=0, seed=3, epoch=epoch)
        pairs = list(stream)
        assert sorted(pairs) == identity_pairs(images, labels)
        orders.append([i for i, _ in pairs])
    again = [i for i, _ in train_set.stream(sample_id, training=True, batch_size=1, workers=0, seed=3, epoch=1)]
    assert orders[1] == again  # the same (seed, epoch): the same order, what an exact resume relies on
    assert orders[0] != orders[1] and orders[0] != sorted(orders[0])


def test_hfds_conversion_is_a_folder_load_dataset_reads_with_class_names(stores):
    import datasets
    direct = datasets.load_dataset(str(stores['hfds']), split='test')
    assert direct.features['label'].names == FASHION_MNIST_CLASSES and len(direct) == N_TEST
    assert sorted(p.name for p in (stores['hfds'] / 'data').iterdir()) == [
        'test-00000-of-00002.parquet', 'test-00001-of-00002.parquet'] + [
        f'train-{i:05d}-of-00005.parquet' for i in range(5)]
    images, labels = stores['arrays']['t10k']
    test = build_dataset('hfds', str(stores['hfds']), 'test', in_chans=1)
    assert isinstance(test, HfdsDataset) and test.classes == FASHION_MNIST_CLASSES and len(test) == N_TEST
    for i in range(N_TEST):
        image, label = test[i]
        assert np.array_equal(np.asarray(image), images[i]) and label == labels[i]
    train_set = build_dataset('hfds', str(stores['hfds']), 'train', in_chans=3)
    assert train_set[0][0].mode == 'RGB'
    train_images, train_labels = stores['arrays']['train']
    assert sorted((sample_id(train_set[i][0].convert('L')), train_set[i][1]) for i in range(N_TRAIN)) == \
        identity_pairs(train_images, train_labels)


def test_conversion_is_atomic_and_keeps_what_exists(stores, tmp_path, monkeypatch):
    out = tmp_path / 'out'
    calls = collections.Counter()
    original = convert_module._encoded

    def interrupted(image):
        calls['n'] += 1
        if calls['n'] == 25:
            raise KeyboardInterrupt
        return original(image)

    monkeypatch.setattr(convert_module, '_encoded', interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_module.convert_data('fashion_mnist', stores['idx'], 'wds', out, shard_size=10)
    assert list(tmp_path.iterdir()) == []  # neither OUT nor the hidden partial folder
    monkeypatch.setattr(convert_module, '_encoded', original)

    out.mkdir()
    (out / 'keep.txt').write_text('mine')
    with pytest.raises(OutputError, match='exists already; pass --force'):
        convert_module.convert_data('fashion_mnist', stores['idx'], 'hfds', out)
    assert (out / 'keep.txt').read_text() == 'mine'
    result = convert_module.convert_data('fashion_mnist', stores['idx'], 'hfds', out, force=True, shard_size=100)
    assert not (out / 'keep.txt').exists() and result.shards == {'train': 1, 'test': 1}
    assert result.samples == {'train': N_TRAIN, 'test': N_TEST} and result.bytes > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out']


def test_imagefolder_converts_with_file_bytes_and_validation_split(tmp_path):
    from PIL import Image
    for split, n in (('train', 3), ('val', 2)):
        for c in ('cat', 'dog'):
            (tmp_path / 'src' / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new('RGB', (20, 16), (i * 40, 100, 0)).save(tmp_path / 'src' / split / c / f'{i}.jpg')
    result = convert_module.convert_data('imagefolder', tmp_path / 'src', 'wds', tmp_path / 'w')
    assert result.samples == {'train': 6, 'validation': 4} and result.classes == ['cat', 'dog']
    with tarfile.open(tmp_path / 'w' / 'validation-000000.tar') as tar:
        first = tar.extractfile('validation_00000000.jpg').read()
    assert first == (tmp_path / 'src' / 'val' / 'cat' / '0.jpg').read_bytes()  # not re-encoded
    val = build_dataset('wds', str(tmp_path / 'w'), 'val')
    assert val.split == 'validation' and [t for _, t in val.stream(None, training=False, batch_size=2,
                                                                  workers=0)] == [0, 0, 1, 1]


# ----------------------------------------------------------------------------------------------------------------
# training: exact resume, bad input


def tiny_config(tmp_path: Path, run_name: str, dataset: str, data: Path, **overrides) -> dict:
    config = dict(
        model='t2t_vit_mini', model_kwargs=TINY_MODEL, dataset=dataset, data=str(data), img_size=16, in_chans=1,
        batch_size=8, epochs=2, workers=0, drop_path=0.0, warmup_epochs=0, lr=2e-3, lr_base_size=8, log_interval=1,
        ckpt_interval=1, progress='off', smoothing=0.0, mean=[0.5], std=[0.5], aa=None, color_jitter=None,
        scale=[0.5, 1.0], output=str(tmp_path), run_name=run_name, seed=5)
    config.update(overrides)
    return resolve_config(None, config)


@pytest.mark.parametrize('fmt,workers', [('wds', 2), ('hfds', 0)])
def test_stopped_run_resumes_to_the_same_weights(stores, tmp_path, fmt, workers):
    reference = train(tiny_config(tmp_path, 'reference', fmt, stores[fmt], workers=workers))
    assert reference.status == 'finished' and reference.global_step == 12  # 2 epochs x 48 / 8
    assert reference.final_eval['samples'] == N_TEST
    stopped = train(tiny_config(tmp_path, 'resumed', fmt, stores[fmt], workers=workers, max_steps=3))
    assert stopped.status == 'budget' and read_checkpoint(stopped.run_dir / 'last.pth')['step_in_epoch'] == 3
    resumed = train(tiny_config(tmp_path, 'resumed', fmt, stores[fmt], workers=workers))
    assert resumed.global_step == 12
    a = read_checkpoint(reference.run_dir / 'last.pth')['state_dict']
    b = read_checkpoint(resumed.run_dir / 'last.pth')['state_dict']
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_cli_trains_and_evaluates_from_shards(stores, tmp_path, capsys):
    config = tiny_config(tmp_path, 'cli', 'wds', stores['wds'], epochs=1)
    args = ['train']
    for key in ('model', 'dataset', 'data', 'img_size', 'in_chans', 'batch_size', 'epochs', 'workers', 'output',
                'run_name', 'progress', 'mean', 'std', 'aa', 'color_jitter', 'lr_base_size', 'warmup_epochs'):
        args += [f"--{key.replace('_', '-')}", json.dumps(config[key])]
    args += ['--model-kwargs', json.dumps(TINY_MODEL), '--val-holdout', '0']  # a stream validates on its own split
    assert cli(args) == 0
    assert cli(['eval', '--checkpoint', str(tmp_path / 'cli' / 'last.pth'), '--dataset', 'hfds', '--data',
                str(stores['hfds']), '--split', 'test', '--workers', '0', '--output', str(tmp_path / 'eval')]) == 0
    out = capsys.readouterr().out
    assert f'on {N_TEST} images' in out and 'Ankle boot' in out


def corrupt_one_sample(shard: Path, victim: int = 3) -> str:
    """Rewrite a tar shard with the image of its `victim`-th sample replaced by bytes that are no image."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    images = [m.name for m, _ in members if m.name.endswith('.png')]
    with tarfile.open(shard, 'w') as tar:
        for member, data in members:
            if member.name == images[victim]:
                data = b'no image here'
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return images[victim]


def test_corrupt_sample_is_skipped_and_counted_or_stops_the_run(stores, tmp_path, capsys):
    import shutil
    store = tmp_path / 'store'
    shutil.copytree(stores['wds'], store)
    corrupt_one_sample(store / 'test-000000.tar')
    test = build_dataset('wds', str(store), 'test', in_chans=1)
    read = list(test.stream(None, training=False, batch_size=4, workers=0))
    assert len(read) == N_TEST - 1 and test.bad_samples.count == 1

    corrupt_one_sample(store / 'train-000001.tar')
    assert cli(['train', '--dataset', 'wds', '--data', str(store), '--model', 't2t_vit_mini', '--model-kwargs',
                json.dumps(TINY_MODEL), '--img-size', '16', '--in-chans', '1', '--batch-size', '8', '--epochs', '1',
                '--workers', '0', '--output', str(tmp_path), '--run-name', 'fail', '--progress', 'off',
                '--val-holdout', '0']) == 2
    err = capsys.readouterr().err
    assert 'error: 1 unreadable sample(s)' in err and str(store) in err and '--on-bad-image skip' in err
    config = tiny_config(tmp_path, 'skip', 'wds', store, epochs=1, on_bad_image='skip')
    result = train(config)
    assert result.status == 'finished' and result.final_eval['samples'] == N_TEST - 1
    assert 'unreadable sample(s) of' in capsys.readouterr().err


def test_corrupt_hfds_row_fails_naming_it_or_is_skipped(stores, tmp_path):
    import datasets
    rows = datasets.load_dataset(str(stores['hfds']), split='test')
    broken = rows.cast_column('image', datasets.Image(decode=False)).map(
        lambda row, i: {'image': {'bytes': b'broken' if i == 2 else row['image']['bytes'], 'path': None}},
        with_indices=True)
    (tmp_path / 'h' / 'data').mkdir(parents=True)
    broken.to_parquet(str(tmp_path / 'h' / 'data' / 'test-00000-of-00001.parquet'))
    failing = build_dataset('hfds', str(tmp_path / 'h'), 'test', in_chans=1)
    with pytest.raises(DataError, match=r'split test row 2: .*--on-bad-image skip'):
        failing[2]
    skipping = build_dataset('hfds', str(tmp_path / 'h'), 'test', in_chans=1, on_bad_image='skip')
    assert sample_id(skipping[2][0]) == N_TRAIN + 3 and skipping.bad_files == [f'{tmp_path / "h"} split test row 2']


def test_missing_store_split_and_shard_are_named(stores, tmp_path):
    import shutil
    with pytest.raises(DataError, match='does not exist.*convert-data'):
        build_dataset('wds', str(tmp_path / 'nowhere'), 'train')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(DataError, match=r'no _info.json or _info.yaml.*convert-data --to wds'):
        build_dataset('wds', str(tmp_path / 'empty'), 'train')
    store = tmp_path / 'store'
    shutil.copytree(stores['wds'], store)
    info = json.loads((store / '_info.json').read_text())
    del info['splits']['test']
    (store / '_info.json').write_text(json.dumps(info))
    with pytest.raises(DataError, match=r'no val split \(looked for validation or val or valid or test; it has '
                                        r'train\)'):
        build_dataset('wds', str(store), 'val')
    (store / 'train-000003.tar').unlink()
    with pytest.raises(DataError, match=r'1 of the 5 shards of split .train. are missing.*train-000003.tar'):
        build_dataset('wds', str(store), 'train')
    with pytest.raises(DataError, match='Hugging Face dataset folder .* does not exist'):
        build_dataset('hfds', str(tmp_path / 'nowhere'), 'train')
    shutil.copytree(stores['hfds'], tmp_path / 'h')
    for p in (tmp_path / 'h' / 'data').glob('train-*'):
        p.unlink()
    with pytest.raises(DataError, match=r'has no train split \(looked for train; it has test\)'):
        build_dataset('hfds', str(tmp_path / 'h'), 'train')
    few = build_dataset('wds', str(stores['wds']), 'train')
    with pytest.raises(DataError, match=r'5 shards, fewer than the 6 streams .*2 process\(es\) x 3'):
        few.check_workers(2, 3)


# ----------------------------------------------------------------------------------------------------------------
# two processes


READER_SCRIPT = '''
import json, sys
import torch.distributed as dist
from torch.utils.data import DataLoader
sys.path.insert(0, {tests!r})
from test_streaming import sample_id
from t2tvit.data import build_dataset
from t2tvit.engine.distributed import init_distributed

info = init_distributed('cpu')
store = build_dataset('wds', {store!r}, 'train', in_chans=1)
seen = {{}}
for epoch in (0, 1):
    stream = store.stream(sample_id, training=True, batch_size=4, workers=2, seed=1, epoch=epoch)
    loader = DataLoader(stream, batch_size=4, num_workers=2, drop_last=True)
    seen[f'train{{epoch}}'] = [int(i) for ids, _ in loader for i in ids]
test = build_dataset('wds', {store!r}, 'test', in_chans=1)
stream = test.stream(sample_id, training=False, batch_size=4, workers=2, rank=info.rank, world_size=info.world_size)
seen['test'] = [int(i) for ids, _ in DataLoader(stream, batch_size=4, num_workers=2) for i in ids]
with open({out!r} + f'/rank{{info.rank}}.json', 'w') as f:
    json.dump(seen, f)
dist.destroy_process_group()
'''


def test_two_gloo_processes_and_their_workers_read_disjoint_shards(stores, tmp_path):
    import subprocess
    store = tmp_path / 'store'
    convert_module.convert_data('fashion_mnist', stores['idx'], 'wds', store, shard_size=6)  # 8 train, 2 test shards
    script = tmp_path / 'read.py'
    script.write_text(READER_SCRIPT.format(tests=str(Path(__file__).parent), store=str(store), out=str(tmp_path)))
    done = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', '2',
                           str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in (0, 1)]
    for epoch in ('train0', 'train1'):
        # 48 samples in 8 shards over 2 processes x 2 workers: 12 each, every training sample exactly once
        assert len(ranks[0][epoch]) == len(ranks[1][epoch]) == 24
        assert sorted(ranks[0][epoch] + ranks[1][epoch]) == list(range(N_TRAIN))
    assert ranks[0]['train0'] != ranks[0]['train1']  # shards are dealt out anew each epoch
    assert sorted(ranks[0]['test'] + ranks[1]['test']) == list(range(N_TRAIN, N_TRAIN + N_TEST))
    assert len(ranks[0]['test']) == 6 and len(ranks[1]['test']) == 6


# ----------------------------------------------------------------------------------------------------------------
# data-loading benchmark


def test_data_loading_benchmark_prints_rates_and_workers(capsys):
    assert cli(['benchmark', '--data-loading', '--loading-images', '12', '--train-rate',
                't2t_vit_7=5000,t2t_vit_14=50']) == 0
    out = capsys.readouterr().out
    rows = {line.split('|')[1].strip(): line for line in out.splitlines() if line.startswith('| ')}
    rates = {fmt: float(rows[fmt].split('|')[2]) for fmt in ('imagefolder', 'wds', 'hfds')}
    assert all(rate > 0 for rate in rates.values())
    workers = [int(v) for v in rows['t2t_vit_7'].split('|')[3:6]]
    for needed, rate in zip(workers, rates.values()):  # the table rounds the rates it prints
        assert needed >= 1 and abs(needed - np.ceil(5000 / rate)) <= 1
    assert 'rand-m9-mstd0.5-inc1' in out
    assert cli(['benchmark', '--data-loading', '--train-rate', 't2t_vit_7']) == 2
