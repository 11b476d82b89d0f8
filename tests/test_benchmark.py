"""The benchmark command: what it prints and writes, and the options it refuses; never timings."""
from __future__ import annotations

import json
import statistics

import pytest
import torch

from t2tvit.cli.main import main
from t2tvit.cpu_kernels import CPU_KERNELS, CPU_PROFILE_ENV
from t2tvit.tools.benchmark import BenchmarkError, config_from_options, parse_runs, validate


def test_benchmark_runs_end_to_end_writing_json_and_png(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        code = main([
            'benchmark', '--models', 't2t_vit_mini', '--peers', 'deit_tiny_patch16_224', '--img-size', '32',
            '--batch-size', '2', '--reps', '2', '--iters', '2', '--warmup', '1',
            '--runs', 'infer:fp32,infer:bf16,train:fp32',
            '--no-variants-table', '--agreement-images', '2', '--peak-size', '64', '--threads', '1', '--ab', 'all',
            '--reference', 'deit_tiny_patch16_224', '--output', str(tmp_path), '--name', 'tiny'])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    out = capsys.readouterr().out
    assert 'infer:bf16:eager' in out and 't2t_vit_mini [plain]' in out and 'bf16 / fp32 images/s' in out
    result = json.loads((tmp_path / 'tiny.json').read_text())
    assert [r['run'] for r in result['runs']] == ['infer:fp32:eager', 'infer:bf16:eager', 'train:fp32:eager']
    for run in result['runs']:
        assert run['peak']['flops_per_s'] > 0
        assert [m['label'] for m in run['models']] == ['t2t_vit_mini', 't2t_vit_mini [plain]',
                                                       'deit_tiny_patch16_224']
        for m in run['models']:
            assert m['images_per_s'] > 0 and m['mfu'] > 0 and m['peak_bytes'] > m['resident_bytes'] > 0
            assert m['images_per_s'] == pytest.approx(statistics.median(2 / t for t in m['times_s']))  # per step
            assert len(m['times_s']) == 2 and 'x_reference' in m
        assert 'x_fast' in run['models'][1]
    # runs that differ only in precision share their rounds: bf16 over fp32 is measured side by side
    assert result['runs'][1]['timed_with'] == ['infer:fp32:eager', 'infer:bf16:eager']
    assert all('x_fp32' in m for m in result['runs'][1]['models'])
    assert set(result['agreement']) == {'t2t_vit_mini', 'deit_tiny_patch16_224'}
    assert 0 <= result['agreement']['t2t_vit_mini']['top1_agreement'] <= 1
    assert result['complexity']['t2t_vit_mini']['macs_all'] > result['complexity']['t2t_vit_mini']['macs_layers']
    assert (tmp_path / 'tiny.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.parametrize('argv,message', [
    (['--models', 't2t_vit_99'], "'t2t_vit_99' is not a T2T-ViT variant"),
    (['--peers', 'resnet_5000'], "'resnet_5000' is not a timm model name"),
    (['--runs', 'infer:fp16'], "precision 'fp16' is not one of fp32, bf16, int8"),
    (['--runs', 'train:int8'], "int8 is timed as inference in ONNX Runtime; use infer:int8"),
    (['--runs', 'infer:int8:compiled'], "int8 is timed as inference in ONNX Runtime; use infer:int8"),
    (['--runs', 'infer'], 'is not MODE:PRECISION'),
    (['--ab', 'strided'], "'strided' is not a CPU kernel; one of strided_unfold"),
    (['--batch-size', '0'], '--batch-size 0: give a whole number >= 1'),
    (['--checkpoint', 't2t_vit_14'], '--checkpoint t2t_vit_14: give NAME=FILE'),
    (['--checkpoint', 't2t_vit_14=missing.pth'], 'missing.pth does not exist'),
    (['--train-models', 'resnet50', '--peers', 'none'], "'resnet50' is not among --models/--peers"),
    (['--reference', 'resnet18'], "--reference 'resnet18' is not among --models/--peers"),
])
def test_benchmark_refuses_bad_options_with_the_fix(argv, message, capsys):
    assert main(['benchmark', '--no-variants-table', '--output', 'none'] + argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize('profile,kernel', [('intel-amx', 'batch_chunks'), ('intel-amx', 'onednn_linear_train'),
                                            ('generic', 'onednn_linear'), ('amd-avx512', 'packed_weights')])
def test_ab_of_a_kernel_the_plan_has_off_names_the_fix(profile, kernel, monkeypatch, capsys):
    """A copy without a kernel the plan leaves off is the same model: `--ab` refuses it and says how to time it."""
    monkeypatch.setenv(CPU_PROFILE_ENV, profile)
    argv = ['benchmark', '--no-variants-table', '--output', 'none', '--device', 'cpu', '--models', 't2t_vit_mini',
            '--peers', 'none', '--ab']
    assert main(argv + [f'strided_unfold,{kernel}']) == 2
    err = capsys.readouterr().err
    assert f"--ab: {kernel} is off in this host's plan (profile {profile})" in err
    assert f'{CPU_PROFILE_ENV}=PROFILE' in err and len(err.strip().splitlines()) == 1
    config = config_from_options('cpu', models=['t2t_vit_mini'], peers=[], ab='strided_unfold', device='cpu')
    assert validate(config).ab == ('strided_unfold',)  # a kernel the plan has on is timed


@pytest.mark.skipif(torch.cuda.is_available(), reason='a CUDA device is visible')
def test_gpu_preset_without_a_gpu_says_how_to_check_it(capsys):
    assert main(['benchmark', '--preset', 'gpu', '--output', 'none']) == 2
    assert '--device cpu' in capsys.readouterr().err


def test_presets_and_overrides():
    config = config_from_options('gpu', smoke=True, device='cpu')
    assert (config.batch_size, config.img_size, config.device) == (2, 64, 'cpu')
    assert config.runs == parse_runs('infer:bf16,train:bf16,infer:bf16:compiled,train:bf16:compiled')
    cpu = config_from_options('cpu', models=['t2t_vit_7'], peers=['resnet50'])
    assert cpu.train_models is None  # the preset's train models are gone: all of the named ones train
    assert config_from_options('cpu', ab='all').ab == tuple(CPU_KERNELS)
    with pytest.raises(BenchmarkError, match="--preset 'tpu'"):
        config_from_options('tpu')


def test_mfu_divides_by_the_gemm_around_each_step():
    """A slow spell that slows the model step and the GEMM around it alike leaves MFU where it was."""
    from t2tvit.tools.benchmark import Entry, _summarise
    gemm = Entry(name='gemm', kind='gemm', flops_per_step=100.)
    model = Entry(name='m', kind='ours', flops_per_step=50., images_per_step=10,
                  times_s=[1., 2., 1.], peak_times_s=[0.5, 1., 0.5])  # round 2: everything twice as slow
    gemm.times_s = [0.5, 0.5, 1., 1., 0.5, 0.5]
    row = _summarise(model, None, gemm)
    assert row['mfu'] == pytest.approx(0.25)  # 50 FLOP/s of 200 FLOP/s, in every round
    assert row['images_per_s'] == pytest.approx(10.) and row['images_per_s_min'] == pytest.approx(5.)
    assert _summarise(gemm, None, gemm)['flops_per_s'] == pytest.approx(200.)


def test_peak_is_the_fastest_gemm_library_and_mfu_is_also_given_against_the_others(monkeypatch):
    """A model calling a faster GEMM library than the peak's would read as over 100% MFU: the peak takes the
    fastest one, and MFU against each slower one is scaled by their speed ratio, sampled side by side each round."""
    from t2tvit.tools import benchmark
    from t2tvit.tools.benchmark import Entry, _matmul_entry, _summarise, _time_rounds
    products = []
    monkeypatch.setattr(benchmark, '_gemm_libraries', lambda device, a, b: {
        'slow': lambda: products.append('slow'), 'fast': lambda: products.append('fast')})
    times = {'slow': 0.02, 'fast': 0.01}
    monkeypatch.setattr(benchmark, '_seconds', lambda fn, device, iters=1: (fn(), times[products[-1]])[1])
    gemm = _matmul_entry(torch.device('cpu'), 'fp32', 64, 0.05)
    assert gemm.library == 'fast' and gemm.name.endswith('fast x5')
    products.clear()
    gemm.step()
    assert products == ['fast'] * 5
    model = Entry(name='m', kind='ours', flops_per_step=gemm.flops_per_step / 2, images_per_step=1,
                  step=lambda: products.append('fast'))  # the stub times every step as 0.01 s, the GEMM's too
    times['slow'] = 0.03  # the slow library gets slower still during the rounds
    _time_rounds([(model, gemm)], benchmark.BenchConfig(reps=3), torch.device('cpu'))
    assert gemm.library_times_s == {'slow': [0.02, 0.03, 0.03, 0.03], 'fast': [0.01] * 4}
    row = _summarise(model, None, gemm)
    assert row['mfu'] == pytest.approx(0.5)  # half the GEMM step's FLOPs in as long
    assert row['mfu_by_library'] == {'fast': pytest.approx(0.5), 'slow': pytest.approx(1.5)}
    peak = _summarise(gemm, None, gemm)
    assert peak['library'] == 'fast' and peak['libraries_time_ratio']['slow'] == pytest.approx(3.)


def test_a_gemm_library_far_slower_at_the_probe_is_left_out_of_the_peak(monkeypatch):
    """bf16 `torch.mm` on an AVX2-only CPU ran 14x slower than the same product in a Linear layer's layout (a minute
    a product at n=2048): a library over TOO_SLOW times the fastest on the probe product is never timed at full size
    or in the rounds, and the peak's JSON lists it with its ratio."""
    from t2tvit.tools import benchmark
    from t2tvit.tools.benchmark import TOO_SLOW, _matmul_entry, _summarise, _time_rounds
    sizes = []

    def libraries(device, a, b):
        sizes.append(a.shape[0])
        return {name: (lambda name=name: calls.append((name, a.shape[0]))) for name in ('crawl', 'fast', 'near')}
    times = {'crawl': 0.01 * (TOO_SLOW + 1), 'fast': 0.01, 'near': 0.01 * TOO_SLOW}
    calls = []
    monkeypatch.setattr(benchmark, '_gemm_libraries', libraries)
    monkeypatch.setattr(benchmark, '_seconds', lambda fn, device, iters=1: (fn(), times[calls[-1][0]])[1])
    gemm = _matmul_entry(torch.device('cpu'), 'bf16', 1024, 0.05)
    assert sizes == [benchmark.PROBE_SIZE, 1024]
    assert ('crawl', 1024) not in calls and ('near', 1024) in calls  # at the limit: still timed
    assert set(gemm.library_times_s) == set(gemm.library_products) == {'fast', 'near'}
    calls.clear()
    _time_rounds([(benchmark.Entry(name='m', kind='ours', step=lambda: calls.append(('fast', 0))), gemm)],
                 benchmark.BenchConfig(reps=2), torch.device('cpu'))
    assert not [c for c in calls if c[0] == 'crawl']
    peak = _summarise(gemm, None, gemm)
    assert peak['libraries_left_out'] == {'crawl': pytest.approx(TOO_SLOW + 1)}


def test_int8_run_times_fp32_and_int8_onnx_at_batch_1_and_16_in_both_runtimes(tmp_path, capsys):
    import onnxruntime
    import openvino
    threads = torch.get_num_threads()
    try:
        code = main(['benchmark', '--models', 't2t_vit_mini', '--peers', 'none', '--img-size', '28', '--reps', '2',
                     '--runs', 'infer:int8', '--no-variants-table', '--threads', '1', '--smoke',
                     '--agreement-images', '8', '--output', str(tmp_path), '--name', 'int8'])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    out = capsys.readouterr().out
    assert 'int8 / fp32' in out and 'speed only' in out
    result = json.loads((tmp_path / 'int8.json').read_text())
    int8 = result['int8']
    assert int8['onnxruntime'] == onnxruntime.__version__ and int8['openvino'] == openvino.__version__
    assert int8['session_options']['intra_op_num_threads'] == 1 and int8['img_size'] == 28
    assert int8['openvino_config']['INFERENCE_NUM_THREADS'] == 1
    assert int8['openvino_config']['INFERENCE_PRECISION_HINT'] == 'f32'  # not bf16 on an AMX host
    assert 'random' in int8['quantization']['calibration'] and int8['quantization']['activations'] == 'QUInt8'
    by_runtime = int8['quantization_by_runtime']
    assert (by_runtime['openvino']['activations'], by_runtime['openvino']['activation_symmetric']) == ('QInt8', True)
    assert [(r['name'], r['runtime'], r['batch']) for r in int8['models']] == [
        ('t2t_vit_mini', 'onnxruntime', 1), ('t2t_vit_mini', 'onnxruntime', 16),
        ('t2t_vit_mini', 'openvino', 1), ('t2t_vit_mini', 'openvino', 16)]
    assert 'OpenVINO' in out and 'ONNX Runtime' in out
    for row in int8['models']:
        fp32, q = row['fp32'], row['int8']
        assert len(fp32['times_s']) == len(q['times_s']) == 2
        assert row['int8_speedup'] == pytest.approx(statistics.median(
            f / i for f, i in zip(fp32['times_s'], q['times_s'])))
        assert q['images_per_s'] == pytest.approx(row['batch'] / statistics.median(q['times_s']))
        assert q['file_bytes'] < fp32['file_bytes']  # int8 weights
    assert result['runs'] == [] and not (tmp_path / 'int8.png').exists()  # no torch runs: nothing to plot


def test_int8_run_without_openvino_times_onnx_runtime_and_says_so(monkeypatch):
    import timm
    from t2tvit.tools import int8_benchmark
    monkeypatch.setattr(int8_benchmark, 'openvino_version', lambda: None)
    said = []
    result = int8_benchmark.int8_latency(
        [('t2t_vit_mini', 'ours')], lambda name: timm.create_model(name, img_size=28, in_chans=1, depth=1), 28,
        lambda in_chans: torch.rand(8, in_chans, 28, 28), threads=1, reps=1, log=said.append,
        batch_iters={1: 1, 16: 1})
    assert result['runtimes'] == ['onnxruntime'] and result['openvino'] == 'not installed'
    assert {row['runtime'] for row in result['models']} == {'onnxruntime'}
    assert any('OpenVINO is not installed (pip install "t2tvit[export]")' in line for line in said)
