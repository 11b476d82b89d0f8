"""Command paths run as a user runs them, in a fresh process: export to each format, benchmark --smoke and
--complexity-only, convert-data from CIFAR, MNIST and an image folder, and where eval writes by default.

Each case checks what the command wrote (the exported model's logits against the checkpoint's, the converted
samples against the source pixels and labels), not only that it ran. Tiny models and data keep them fast; the
cases that take longer on 2 cores are marked slow.
"""
from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch

from t2tvit.cli.main import eval_folder, main

REPO = Path(__file__).resolve().parents[1]


def run_cli(args: List[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO / 'src') + os.pathsep + os.environ.get('PYTHONPATH', ''),
               OMP_NUM_THREADS='1', HF_DATASETS_OFFLINE='1', HF_HUB_OFFLINE='1',
               HF_DATASETS_CACHE=str(cwd / 'hf-cache'))
    result = subprocess.run([sys.executable, '-m', 't2tvit', *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f't2tvit {" ".join(args)} exited {result.returncode}:\n{result.stderr}'
    assert 'unexpected' not in result.stderr and 'Traceback' not in result.stderr, result.stderr
    return result


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """datasets caches what it reads; keep that out of the user's cache, and work offline."""
    import datasets
    monkeypatch.setattr(datasets.config, 'HF_DATASETS_CACHE', tmp_path / 'hf-cache')
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')


# --- eval writes beside what it evaluates --------------------------------------------------------------------------

def test_eval_folder_follows_the_checkpoint_and_the_split():
    assert eval_folder('runs/a/best.pth', None, 'test') == Path('runs/a/eval-best-test')
    assert eval_folder('/w/model_best.pth.tar', None, 'val') == Path('/w/eval-model_best-val')
    assert eval_folder('m.safetensors', 't2t_vit_7', 'train') == Path('eval-m-train')
    assert eval_folder('.pth', None, 'val') == Path('eval-.pth-val')  # a name that is only a suffix stays whole
    assert eval_folder(None, 't2t_vit_7.in1k', 'val') == Path('runs/eval/t2t_vit_7.in1k-val')


def test_two_evals_of_two_checkpoints_need_no_output_and_no_force(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for run in ('a', 'b'):
        (tmp_path / run).mkdir()
        shutil.copy(tiny_run, tmp_path / run / 'best.pth')
    base = ['eval', '--dataset', 'fake', '--workers', '0', '--batch-size', '16']
    assert main(base + ['--checkpoint', 'a/best.pth']) == 0
    assert main(base + ['--checkpoint', 'b/best.pth']) == 0
    assert main(base + ['--checkpoint', 'a/best.pth', '--split', 'train']) == 0
    out = capsys.readouterr().out
    for folder in ('a/eval-best-val', 'b/eval-best-val', 'a/eval-best-train'):
        assert sorted(p.name for p in (tmp_path / folder).iterdir()) == ['confusion_matrix.png', 'eval.json']
        assert f'wrote {Path(folder) / "eval.json"}' in out
    samples = {f: json.loads((tmp_path / f / 'eval.json').read_text())['samples']
               for f in ('a/eval-best-val', 'a/eval-best-train')}
    assert samples == {'a/eval-best-val': 16, 'a/eval-best-train': 64}  # the fake set's two splits
    assert not (tmp_path / 'runs').exists()
    assert main(base + ['--checkpoint', 'a/best.pth']) == 2  # the same evaluation again: kept unless --force
    assert 'eval-best-val/eval.json exists already; pass --force' in capsys.readouterr().err


# --- export: each format, loaded back and compared with the checkpoint --------------------------------------------

def _reference_logits(checkpoint: Path, x: torch.Tensor) -> torch.Tensor:
    from t2tvit.engine.restore import restore_model
    with torch.no_grad():
        return restore_model(checkpoint).model.eval()(x)


def _exported_logits(fmt: str, path: Path, x: torch.Tensor) -> torch.Tensor:
    if fmt == 'onnx':
        import onnxruntime
        session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
        return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        if fmt == 'torchscript':
            return torch.jit.load(str(path))(x)
        return torch.export.load(str(path)).module()(x)


@pytest.mark.parametrize('fmt, suffix, extra', [
    ('torchscript', 'pt', []),
    ('onnx', 'onnx', ['--onnx-exporter', 'legacy']),
    pytest.param('onnx', 'onnx', [], marks=pytest.mark.slow),  # dynamo: dynamic height and width
    ('exported-program', 'pt2', []),
])
def test_export_writes_a_file_that_loads_and_gives_the_models_logits(fmt, suffix, extra, tiny_run, tmp_path):
    path = tmp_path / f'model.{suffix}'
    result = run_cli(['export', '--format', fmt, '--checkpoint', str(tiny_run), '-o', str(path), *extra], tmp_path)
    assert f'wrote {path}' in result.stdout
    sidecar = json.loads(Path(f'{path}.json').read_text())
    assert sidecar['classes'] == [f'class_{i}' for i in range(4)]
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32)
    expected = _reference_logits(tiny_run, x)
    got = _exported_logits(fmt, path, x)
    assert got.shape == (3, 4)
    assert torch.allclose(got, expected, atol=1e-4, rtol=0), (got - expected).abs().max()


# --- benchmark ---------------------------------------------------------------------------------------------------

def test_benchmark_smoke_writes_its_results(tmp_path):
    result = run_cli(['benchmark', '--smoke', '--models', 't2t_vit_mini', '--peers', 'none', '--no-variants-table',
                      '--agreement-images', '0', '--output', str(tmp_path / 'bench'), '--name', 'smoke'], tmp_path)
    assert f"wrote {tmp_path / 'bench' / 'smoke.json'} and {tmp_path / 'bench' / 'smoke.png'}" in result.stdout
    report = json.loads((tmp_path / 'bench' / 'smoke.json').read_text())
    config = report['config']
    assert config['smoke'] and (config['batch_size'], config['img_size'], config['reps'], config['iters']) == \
        (2, 64, 2, 1)
    assert [r['run'] for r in report['runs']] == ['infer:fp32:eager', 'infer:bf16:eager', 'train:fp32:eager']
    for run in report['runs']:
        (model,) = run['models']
        assert model['label'] == 't2t_vit_mini' and model['images_per_s'] > 0 and len(model['times_s']) == 2
    assert (tmp_path / 'bench' / 'smoke.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.slow
def test_benchmark_smoke_with_the_presets_models(tmp_path):
    run_cli(['benchmark', '--smoke', '--output', str(tmp_path / 'bench'), '--name', 'smoke'], tmp_path)
    report = json.loads((tmp_path / 'bench' / 'smoke.json').read_text())
    assert report['config']['models'] == ['t2t_vit_7', 't2t_vit_14', 't2t_vit_t_14']
    assert all(m['images_per_s'] > 0 for run in report['runs'] for m in run['models'])


@pytest.mark.slow
def test_benchmark_complexity_only_prints_every_variant_and_stops(tmp_path):
    import timm
    from t2tvit.models import count_parameters
    result = run_cli(['benchmark', '--complexity-only'], tmp_path)
    rows = {}
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) > 3 and parts[0].startswith('t2t_vit') and parts[1] in ('224', '384'):
            rows[parts[0], int(parts[1])] = parts
    variants = [n for n in timm.list_models('t2t_vit*')]
    assert {name for name, _ in rows} == set(variants)
    assert all((name, 224) in rows and (name, 384) in rows for name in variants)
    assert rows['t2t_vit_7', 224][2] == f"{count_parameters(timm.create_model('t2t_vit_7'))[0]:,}"
    assert list(tmp_path.iterdir()) == []  # prints only


# --- convert-data from each source layout ------------------------------------------------------------------------

def _cifar10(folder: Path, per_batch: int = 2, test: int = 3) -> dict:
    """The CIFAR-10 "python version" layout: pickled dicts with bytes keys, rows of 3072 channel-major bytes."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [b'airplane', b'automobile', b'bird', b'cat', b'deer', b'dog', b'frog', b'horse', b'ship', b'truck']
    out = {}
    for name, n in [(f'data_batch_{i}', per_batch) for i in range(1, 6)] + [('test_batch', test)]:
        batch = {b'data': rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b'labels': [int(v) for v in rng.integers(0, 10, n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        out[name] = batch
    (folder / 'batches.meta').write_bytes(pickle.dumps({b'label_names': names}, protocol=2))
    return out


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b''.join(int(d).to_bytes(4, 'big') for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def _mnist(folder: Path) -> dict:
    """MNIST as distributed: four gzipped IDX files."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    out = {}
    for prefix, n in (('train', 5), ('t10k', 4)):
        images, labels = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)
        _write_idx(folder / f'{prefix}-images-idx3-ubyte.gz', images)
        _write_idx(folder / f'{prefix}-labels-idx1-ubyte.gz', labels)
        out[prefix] = (images, labels)
    return out


def _wds_test_split(folder: Path, in_chans: int):
    from t2tvit.data import build_dataset
    dataset = build_dataset('wds', str(folder), 'val', in_chans=in_chans)
    return dataset, list(dataset.stream(None, training=False, batch_size=2, workers=0))


def test_convert_data_from_cifar10_to_shards(tmp_path):
    source = _cifar10(tmp_path / 'cifar' / 'cifar-10-batches-py')
    result = run_cli(['convert-data', '--dataset', 'cifar10', '--data', str(tmp_path / 'cifar'), '--to', 'wds',
                      '-o', str(tmp_path / 'shards'), '--shard-size', '4'], tmp_path)
    assert 'train 10 samples in 3 shard(s), test 3 samples in 1 shard(s); 10 classes' in result.stdout
    info = json.loads((tmp_path / 'shards' / '_info.json').read_text())
    assert info['splits']['train']['num_samples'] == 10 and info['splits']['train']['shard_lengths'] == [4, 4, 2]
    dataset, samples = _wds_test_split(tmp_path / 'shards', in_chans=3)
    assert dataset.classes[:2] == ['airplane', 'automobile'] and len(dataset) == 3
    test = source['test_batch']
    for (image, label), row, expected_label in zip(samples, test[b'data'], test[b'labels']):
        assert np.array_equal(np.asarray(image), row.reshape(3, 32, 32).transpose(1, 2, 0))  # CHW rows -> HWC
        assert label == expected_label


def test_convert_data_from_gzipped_mnist_to_shards(tmp_path):
    source = _mnist(tmp_path / 'mnist')
    result = run_cli(['convert-data', '--dataset', 'mnist', '--data', str(tmp_path / 'mnist'), '--to', 'wds',
                      '-o', str(tmp_path / 'shards')], tmp_path)
    assert 'train 5 samples in 1 shard(s), test 4 samples in 1 shard(s); 10 classes' in result.stdout
    dataset, samples = _wds_test_split(tmp_path / 'shards', in_chans=1)
    images, labels = source['t10k']
    assert len(samples) == 4 and dataset.classes == [str(i) for i in range(10)]
    for (image, label), expected_image, expected_label in zip(samples, images, labels):
        assert image.mode == 'L' and np.array_equal(np.asarray(image), expected_image) and label == expected_label


def test_convert_data_from_an_image_folder_to_a_hugging_face_dataset(tmp_path):
    import datasets
    from PIL import Image
    rng = np.random.default_rng(2)
    pixels = {}
    for split, n in (('train', 3), ('val', 2)):
        for name in ('cat', 'dog'):
            (tmp_path / 'photos' / split / name).mkdir(parents=True)
            for i in range(n):
                array = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
                Image.fromarray(array).save(tmp_path / 'photos' / split / name / f'{i}.png')
                pixels[split, name, i] = array
    result = run_cli(['convert-data', '--dataset', 'imagefolder', '--data', str(tmp_path / 'photos'), '--to', 'hfds',
                      '-o', str(tmp_path / 'hf')], tmp_path)
    assert 'train 6 samples' in result.stdout and 'validation 4 samples' in result.stdout
    validation = datasets.load_dataset(str(tmp_path / 'hf'), split='validation')
    assert validation.features['label'].names == ['cat', 'dog'] and len(validation) == 4
    got = sorted((row['label'], np.asarray(row['image'].convert('RGB')).tobytes()) for row in validation)
    expected = sorted((c, pixels['val', name, i].tobytes()) for c, name in enumerate(('cat', 'dog')) for i in range(2))
    assert got == expected  # every image, lossless, with its class
    train = datasets.load_dataset(str(tmp_path / 'hf'), split='train')
    assert sorted(train['label']) == [0, 0, 0, 1, 1, 1]
