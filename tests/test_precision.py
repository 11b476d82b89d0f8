"""`amp: auto`: bf16 exactly where the hardware multiplies bf16 natively, forced per host by faking the probe."""
from __future__ import annotations

import importlib

import pytest
import torch

from t2tvit.engine import precision
from t2tvit.engine.precision import native_bf16_cpu, resolve_amp
from t2tvit.options import RECIPE_OPTIONS

CPU = torch.device('cpu')
AMX_HOST = frozenset({'avx512f', 'avx512_vnni', 'amx_tile', 'amx_bf16', 'amx_int8', 'avx512_bf16'})
ZEN4_HOST = frozenset({'avx512f', 'avx512_vnni', 'avx512_bf16'})  # AVX-512 BF16 without AMX
OLD_AVX512_HOST = frozenset({'avx2', 'avx512f', 'avx512_vnni'})  # Cascade Lake, Zen 3 class: no bf16 unit


@pytest.mark.parametrize('flags,expected', [
    (AMX_HOST, 'bf16'), (ZEN4_HOST, 'bf16'), (OLD_AVX512_HOST, 'none'), (frozenset(), 'none')])
def test_auto_on_cpu_follows_the_instruction_set(monkeypatch, flags, expected):
    monkeypatch.setattr(precision, 'cpu_flags', lambda: flags)
    assert resolve_amp('auto', CPU) == expected


@pytest.mark.parametrize('supported,expected', [(True, 'bf16'), (False, 'none')])
def test_auto_on_cuda_follows_the_gpu(monkeypatch, supported, expected):
    calls = []

    def is_bf16_supported(including_emulation=True):
        calls.append(including_emulation)
        return supported

    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', is_bf16_supported)
    monkeypatch.setattr(precision, 'cpu_flags', lambda: AMX_HOST)  # the CPU must not decide for the GPU
    assert resolve_amp('auto', torch.device('cuda')) == expected
    assert calls == [False]  # emulated bf16 does not pay


@pytest.mark.parametrize('amp', ['none', 'bf16', 'fp16'])
def test_an_explicit_choice_is_kept_on_every_host(monkeypatch, amp):
    monkeypatch.setattr(precision, 'cpu_flags', lambda: frozenset())
    assert resolve_amp(amp, CPU) == amp


def test_cpu_flags_reads_this_linux_host():
    flags = precision.cpu_flags()
    with open('/proc/cpuinfo') as f:
        line = next(line for line in f if line.startswith(('flags', 'Features')))
    assert flags == frozenset(line.split(':', 1)[1].split())
    assert native_bf16_cpu(flags) == bool({'amx_bf16', 'avx512_bf16'} & flags)


def test_auto_is_a_recipe_choice():
    assert RECIPE_OPTIONS['amp'].choices == precision.AMP_CHOICES


@pytest.mark.parametrize('flags,expected', [(AMX_HOST, 'bf16'), (OLD_AVX512_HOST, 'none')])
def test_training_with_amp_auto_records_what_it_ran(monkeypatch, tmp_path, flags, expected):
    """The run folder's config.yaml says which precision `auto` became on this (faked) host."""
    import yaml
    from conftest import TINY_RUN_MODEL
    from t2tvit.engine import resolve_config, train
    train_module = importlib.import_module('t2tvit.engine.train')  # the module, not the function of that name
    monkeypatch.setattr(precision, 'cpu_flags', lambda: flags)
    used = []
    real = train_module.autocast_for
    monkeypatch.setattr(train_module, 'autocast_for', lambda amp, device: used.append(amp) or real(amp, device))
    config = resolve_config(None, dict(
        model='t2t_vit_mini', model_kwargs=TINY_RUN_MODEL, dataset='fake', img_size=32, in_chans=3, num_classes=4,
        fake_num_samples=16, batch_size=8, epochs=1, workers=0, warmup_epochs=0, progress='off', aa=None,
        color_jitter=None, amp='auto', output=str(tmp_path), run_name='run', seed=0))
    result = train(config)
    assert yaml.safe_load((result.run_dir / 'config.yaml').read_text())['amp'] == expected
    assert used and set(used) == {expected}  # every training and evaluation step ran under it


@pytest.mark.parametrize('flags,warned', [(AMX_HOST, False), (ZEN4_HOST, False), (OLD_AVX512_HOST, True),
                                          (frozenset({'avx2'}), True)])
def test_bf16_asked_for_on_a_cpu_that_emulates_it_is_warned_once(monkeypatch, tmp_path, capsys, flags, warned):
    """`amp: bf16` on a CPU without a bf16 unit runs, with one warning line that names the fix; auto, none and a
    GPU never warn."""
    from conftest import TINY_RUN_MODEL
    from t2tvit.engine import resolve_config, train
    from t2tvit.engine.precision import emulated_bf16_warning
    monkeypatch.setattr(precision, 'cpu_flags', lambda: flags)
    assert (emulated_bf16_warning('bf16', CPU) is not None) == warned
    assert emulated_bf16_warning('auto', CPU) is emulated_bf16_warning('none', CPU) is None
    assert emulated_bf16_warning('bf16', torch.device('cuda')) is None
    config = resolve_config(None, dict(
        model='t2t_vit_mini', model_kwargs=TINY_RUN_MODEL, dataset='fake', img_size=32, in_chans=3, num_classes=4,
        fake_num_samples=8, batch_size=8, epochs=1, workers=0, warmup_epochs=0, progress='off', aa=None,
        color_jitter=None, amp='bf16', output=str(tmp_path), run_name='run', seed=0))
    train(config)
    lines = [line for line in capsys.readouterr().err.splitlines() if 'emulated' in line]
    assert len(lines) == int(warned)
    assert all(line.startswith('warning: bf16 on this CPU is emulated') and 'amp auto' in line for line in lines)
