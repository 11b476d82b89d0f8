"""`t2tvit train` run as a user runs it (a subprocess) on tiny fake data: resuming from a file, --no-resume,
SIGTERM, and the input errors that must never take the bug path (exit 2, no "unexpected")."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from t2tvit.data.convert import convert_data
from t2tvit.engine import train
from t2tvit.models import read_checkpoint
from test_engine import TINY_MODEL, assert_same_weights, cli_args, subprocess_env, tiny_config, wait_for_step, weights

STREAM_MESSAGE = 'val_holdout needs random access to the training images, which a stream (--dataset wds) does not give'


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 't2tvit', *args], env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)


def train_command(config: dict, *extra: str) -> list:
    return ['train', *cli_args(config), *extra]


def assert_input_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert 'unexpected' not in result.stderr and 'Traceback' not in result.stderr, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0], (fragment, error_lines[0])


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """An uninterrupted 2-epoch run (8 steps) that resumed runs must reproduce exactly."""
    return train(tiny_config(tmp_path_factory.mktemp('reference'), 'reference'))


@pytest.mark.parametrize('change', [
    {'model_kwargs': dict(TINY_MODEL, embed_dim=48)},  # the same model name, weights of other shapes
    {'model': 't2t_vit_7'},  # another model
])
def test_resuming_a_run_folder_with_another_architecture_names_the_way_out(tmp_path, change):
    first = train(tiny_config(tmp_path, 'run', max_steps=2))
    saved = (first.run_dir / 'last.pth').read_bytes()
    result = run_cli(*train_command(tiny_config(tmp_path, 'run', **change)))
    assert_input_error(result, f'{first.run_dir} holds a run of t2t_vit_mini', '--no-resume --force', '--run-name',
                       '--model t2t_vit_mini')
    assert (first.run_dir / 'last.pth').read_bytes() == saved  # the run is left as it was


def test_resume_file_of_another_architecture_names_the_file(tmp_path):
    first = train(tiny_config(tmp_path, 'first', max_steps=2))
    result = run_cli(*train_command(tiny_config(tmp_path, 'second', num_classes=5), '--resume',
                                    str(first.run_dir / 'last.pth')))
    assert_input_error(result, f"{first.run_dir / 'last.pth'} is a checkpoint of t2t_vit_mini", 'head.weight',
                       '[4, 32] there, [5, 32] with these settings')


@pytest.mark.parametrize('holdout', ['recipe', 'flag'])
def test_holdout_on_a_stream_is_an_input_error(tmp_path, holdout):
    shards = tmp_path / 'shards'
    convert_data('fake', None, 'wds', shards, shard_size=32, fake_num_samples=64, fake_image_size=16)
    extra = ['--val-holdout', '16'] if holdout == 'flag' else []  # the fashion_mnist recipe holds out 5000
    result = run_cli('train', '--config', 'fashion_mnist', '--dataset', 'wds', '--data', str(shards),
                     '--output', str(tmp_path / 'runs'), *extra)
    assert_input_error(result, STREAM_MESSAGE, '--val-holdout 0')


def test_resume_from_a_file_continues_that_run_in_a_new_folder(tmp_path, reference):
    first = train(tiny_config(tmp_path, 'first', max_steps=3))
    assert read_checkpoint(first.run_dir / 'last.pth')['global_step'] == 3
    config = tiny_config(tmp_path, 'continued')
    result = run_cli(*train_command(config, '--resume', str(first.run_dir / 'last.pth')))
    assert result.returncode == 0, result.stderr
    assert 'resuming' in result.stdout and 'global step 3' in result.stdout
    assert read_checkpoint(tmp_path / 'continued' / 'last.pth')['global_step'] == 8
    assert_same_weights(weights(tmp_path / 'continued'), weights(reference.run_dir))


def test_resume_and_no_resume_together_are_refused(tmp_path):
    checkpoint = tmp_path / 'x.pth'
    checkpoint.write_bytes(b'not read: the options contradict each other first')
    result = run_cli('train', '--resume', str(checkpoint), '--no-resume', timeout=120)
    assert_input_error(result, '--resume and --no-resume contradict each other')


def test_no_resume_refuses_an_existing_run_and_starts_afresh_where_none(tmp_path, reference):
    first = train(tiny_config(tmp_path, 'run', max_steps=2))
    refused = run_cli(*train_command(tiny_config(tmp_path, 'run'), '--no-resume'))
    assert_input_error(refused, f'{first.run_dir} already holds a run', '--run-name')
    assert read_checkpoint(first.run_dir / 'last.pth')['global_step'] == 2  # left as it was

    fresh = run_cli(*train_command(tiny_config(tmp_path, 'fresh'), '--no-resume'))
    assert fresh.returncode == 0, fresh.stderr
    assert 'resuming' not in fresh.stdout
    assert read_checkpoint(tmp_path / 'fresh' / 'last.pth')['global_step'] == 8
    assert_same_weights(weights(tmp_path / 'fresh'), weights(reference.run_dir))


def test_sigterm_saves_a_resumable_checkpoint_and_the_rerun_resumes(tmp_path, reference):
    command = [sys.executable, '-m', 't2tvit', *train_command(tiny_config(tmp_path, 'preempted'))]
    proc = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(tmp_path / 'preempted', 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert 'SIGTERM received' in err and 'run the same command again to resume' in err
    assert 'unexpected' not in err and 'Traceback' not in err
    state = read_checkpoint(tmp_path / 'preempted' / 'last.pth')
    assert 2 <= state['global_step'] < 8  # saved where it stopped, mid-run
    logged = [json.loads(line)['global_step'] for line in
              (tmp_path / 'preempted' / 'metrics.jsonl').read_text().splitlines()]
    assert max(logged) == state['global_step']  # nothing logged beyond what was saved

    resumed = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"(global step {state['global_step']})" in resumed.stdout
    assert_same_weights(weights(tmp_path / 'preempted'), weights(reference.run_dir))
