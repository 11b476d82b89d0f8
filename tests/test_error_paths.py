"""Ordinary mistakes and failures of the machine end in a named error, never on the bug path: a model checkpoint
given to --resume, a missing GPU, a full disk under the files a run or a conversion writes, a lost torchrun peer;
and a stop in an epoch's last step loses nothing."""
from __future__ import annotations

import errno
import importlib
import json
import os
import signal

import pytest
import timm
import torch

from t2tvit._create import UnknownModelError
from t2tvit.cli.main import main
from t2tvit.data.convert import convert_data
from t2tvit.data.readers import DataError
from t2tvit.engine import checkpointing
from t2tvit.engine.build import build_model
from t2tvit.engine.checkpointing import CheckpointSaveError, load_training_state
from t2tvit.engine.config import save_config
from t2tvit.engine.distributed import DeviceUnavailable, DistInfo, collectives, pick_device
from t2tvit.engine.metrics import plot_curves, write_eval_json
from t2tvit.errors import InputError, PeerLost, TrainingDiverged
from t2tvit.models import CheckpointError, read_checkpoint
from t2tvit.models.t2t_vit import NoReleasedWeights
from test_engine import TINY_MODEL, assert_same_weights, cli_args, tiny_config, weights


@pytest.fixture
def full_disk(monkeypatch):
    """Every fsync of `atomic_write` fails as on a full disk (ENOSPC)."""
    def fsync(fd):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(checkpointing.os, 'fsync', fsync)


def test_train_resume_from_a_model_checkpoint_is_an_input_error(tmp_path, capsys):
    model = timm.create_model('t2t_vit_mini', img_size=16, in_chans=1, num_classes=4, **TINY_MODEL)
    plain = tmp_path / 'weights.pth'
    torch.save({'state_dict': model.state_dict()}, plain)
    assert main(['train', *cli_args(tiny_config(tmp_path)), '--resume', str(plain)]) == 2
    err = capsys.readouterr().err
    assert 'unexpected' not in err
    assert f'{plain} is not a t2tvit training checkpoint to resume from (lacks optimizer, epoch, global_step)' in err
    assert f'pass --pretrained {plain} instead of --resume' in err
    with pytest.raises(CheckpointError):
        load_training_state(plain)


def test_cuda_without_a_gpu_is_an_input_error():
    if torch.cuda.is_available():
        pytest.skip('a GPU is visible: --device cuda is valid here')
    with pytest.raises(DeviceUnavailable, match='no CUDA GPU is visible; use --device cpu') as caught:
        pick_device('cuda')
    assert isinstance(caught.value, InputError)
    assert pick_device('cpu') == torch.device('cpu')


def test_unknown_model_and_a_variant_without_released_weights_are_input_errors(tmp_path):
    config = dict(tiny_config(tmp_path), model='resnet_t2t')
    with pytest.raises(UnknownModelError, match="unknown model 'resnet_t2t'"):
        build_model(config, 4)
    with pytest.raises(NoReleasedWeights, match=r't2t_vit_14_se\.in1k has no weights to download \(no weights of '
                                                r't2t_vit_14_se were released\)') as caught:
        timm.create_model('t2t_vit_14_se', pretrained=True)
    assert isinstance(caught.value, InputError) and isinstance(caught.value, RuntimeError)


def test_a_failed_collective_under_torchrun_is_a_lost_peer():
    group = DistInfo(rank=1, world_size=2)
    with pytest.raises(PeerLost, match='rank 1: a peer process of the torchrun group stopped during an all-reduce '
                                       r'\(RuntimeError: Connection reset by peer\); under torchrun --max-restarts'):
        with collectives(group, 'an all-reduce'):
            raise RuntimeError('Connection reset by peer')
    assert not isinstance(PeerLost('x'), InputError)
    with pytest.raises(TrainingDiverged):  # our own errors pass unchanged
        with collectives(group, 'an all-reduce'):
            raise TrainingDiverged('loss became nan')
    with pytest.raises(RuntimeError, match='a bug') as caught:  # one process: no peers to lose
        with collectives(DistInfo(), 'an all-reduce'):
            raise RuntimeError('a bug')
    assert type(caught.value) is RuntimeError


def test_the_cli_gives_a_lost_peer_its_own_exit_status(tmp_path, monkeypatch, capsys):
    engine_train = importlib.import_module('t2tvit.engine.train')  # the module: t2tvit.engine.train is the function

    def lost(*args, **kwargs):
        raise PeerLost('rank 0: a peer process of the torchrun group stopped during an all-reduce')
    monkeypatch.setattr(engine_train, 'train', lost)
    assert main(['train', *cli_args(tiny_config(tmp_path))]) == 4
    err = capsys.readouterr().err
    assert err == 'error: rank 0: a peer process of the torchrun group stopped during an all-reduce\n'


def test_a_full_disk_under_the_run_files_is_an_input_error_naming_the_file(tmp_path, full_disk):
    confusion = torch.eye(2, dtype=torch.int64)
    result = {'top1': 50.0, 'per_class_top1': [100.0, 0.0], 'confusion': confusion}
    with pytest.raises(CheckpointSaveError, match=f'could not write evaluation {tmp_path / "eval.json"}: No space'):
        write_eval_json(tmp_path / 'eval.json', result, ['a', 'b'])
    with pytest.raises(CheckpointSaveError, match=f'could not write config {tmp_path / "config.yaml"}: No space'):
        save_config({'model': 't2t_vit_7'}, tmp_path / 'config.yaml')
    metrics = tmp_path / 'metrics.jsonl'
    metrics.write_text(json.dumps({'type': 'train', 'global_step': 1, 'loss': 1.0, 'lr': 0.1}) + '\n')
    with pytest.raises(CheckpointSaveError, match=f'could not write training curves {tmp_path / "curves.png"}'):
        plot_curves(metrics, tmp_path / 'curves.png')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['metrics.jsonl']  # no temporary file left behind


def test_run_files_go_through_atomic_writes(tmp_path):
    confusion = torch.eye(2, dtype=torch.int64)
    write_eval_json(tmp_path / 'eval.json', {'top1': 50.0, 'per_class_top1': [100.0, 0.0], 'confusion': confusion},
                    ['a', 'b'])
    assert json.loads((tmp_path / 'eval.json').read_text()) == {
        'top1': 50.0, 'per_class_top1': {'a': 100.0, 'b': 0.0}, 'confusion': [[1, 0], [0, 1]]}
    save_config({'model': 't2t_vit_7', 'lr': 0.1}, tmp_path / 'config.yaml')
    assert (tmp_path / 'config.yaml').read_text() == 'model: t2t_vit_7\nlr: 0.1\n'
    metrics = tmp_path / 'metrics.jsonl'
    metrics.write_text(json.dumps({'type': 'train', 'global_step': 1, 'loss': 1.0, 'lr': 0.1}) + '\n')
    assert plot_curves(metrics, tmp_path / 'curves.png') == tmp_path / 'curves.png'
    assert (tmp_path / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    with pytest.raises(CheckpointSaveError, match='could not write config .*; choose a writable place'):
        save_config({}, tmp_path / 'config.yaml' / 'inside-a-file.yaml')


def test_a_full_disk_during_a_conversion_is_an_input_error_and_leaves_nothing(tmp_path, monkeypatch):
    import t2tvit.data.convert as convert

    def fsync(fd):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(convert.os, 'fsync', fsync)
    out = tmp_path / 'shards'
    with pytest.raises(DataError, match=f'No space left on device.* while converting into {out}; nothing was left '
                                        'behind. Free disk space or choose another --output'):
        convert_data('fake', None, 'wds', out, fake_num_samples=8, fake_image_size=8, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_stop_in_an_epochs_last_step_saves_that_step_and_the_rerun_ends_as_an_uninterrupted_run(
        tmp_path, monkeypatch):
    """SIGTERM arriving while the epoch's last step is logged: that step is saved (the run stops before the epoch's
    own save), and the rerun evaluates and saves the epoch, then ends with an uninterrupted run's weights."""
    engine_train = importlib.import_module('t2tvit.engine.train')
    reference = engine_train.train(tiny_config(tmp_path, 'reference'))  # 2 epochs of 4 steps
    log_step = engine_train.Trainer.log_step

    def log_then_sigterm(self, epoch, step, loss_value, bar):
        log_step(self, epoch, step, loss_value, bar)
        if self.global_step == 4:
            # the run's handler must be in place, or the signal would end the test process instead of the run
            assert callable(signal.getsignal(signal.SIGTERM)), signal.getsignal(signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(engine_train.Trainer, 'log_step', log_then_sigterm)
    stopped = engine_train.train(tiny_config(tmp_path, 'preempted'))
    assert (stopped.status, stopped.global_step) == ('interrupted', 4)
    assert read_checkpoint(tmp_path / 'preempted' / 'last.pth')['global_step'] == 4  # the last step logged
    monkeypatch.setattr(engine_train.Trainer, 'log_step', log_step)
    resumed = engine_train.train(tiny_config(tmp_path, 'preempted'))
    assert (resumed.status, resumed.global_step) == ('finished', 8)
    assert_same_weights(weights(tmp_path / 'preempted'), weights(reference.run_dir))
