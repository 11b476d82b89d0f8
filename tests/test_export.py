"""`t2tvit export`: every format reproduces the eager model, at other batch sizes (and image sizes for ONNX)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch

import t2tvit
from t2tvit.cli.main import main as cli
from t2tvit.engine.restore import restore_model
from t2tvit.tools.export import ExportError, export_model, min_dynamic_side
from t2tvit.tools.predict import predict_images

REPO = Path(__file__).resolve().parents[1]
TINY = dict(embed_dim=32, depth=2, num_heads=2, token_dim=8, img_size=32, num_classes=5)
TOLERANCE = 1e-4


def _restored(tokens_type: str):
    torch.manual_seed(0)
    restored = restore_model(None, 't2t_vit_7', dict(TINY, tokens_type=tokens_type))
    # weights far from init: outputs are O(1), so a wrong graph cannot hide, and the Performer's normaliser falls to
    # ~1e-29, where its official 1e-8 epsilon decides the output (an ONNX optimizer pass once deleted it)
    with torch.no_grad():
        for p in restored.model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return restored


@pytest.fixture(scope='module', params=['performer', 'transformer'])
def exported(request, tmp_path_factory):
    """One tiny model per token type, exported once in each format."""
    restored = _restored(request.param)
    out = tmp_path_factory.mktemp(f'export_{request.param}')
    results = {fmt: export_model(restored, fmt, out) for fmt in
               ('onnx', 'torchscript', 'exported-program', 'safetensors')}
    return restored, results


def _eager(restored, x, dynamic=False):
    model = restored.model
    model.dynamic_img_size = dynamic
    try:
        with torch.no_grad():
            return model(x)
    finally:
        model.dynamic_img_size = False


def test_min_dynamic_side_leaves_two_tokens_per_side():
    assert min_dynamic_side(((7, 4, 2), (3, 2, 1), (3, 2, 1))) == 19  # 19 px -> 5, 3, 2 tokens per side
    assert min_dynamic_side(((7, 2, 3), (3, 2, 1), (3, 1, 1))) == 5  # 5 px -> 3, 2, 2; 4 px -> 2, 1


def test_onnx_runs_any_batch_and_image_size_in_onnxruntime(exported):
    restored, results = exported
    result = results['onnx']
    assert result.dynamic_batch and result.dynamic_hw and result.max_abs_diff < TOLERANCE
    session = ort.InferenceSession(str(result.path), providers=['CPUExecutionProvider'])
    assert session.get_inputs()[0].shape == ['batch', 3, 'height', 'width']
    for shape in ((4, 3, 32, 32), (1, 3, 32, 32), (2, 3, 48, 40), (1, 3, 19, 64)):
        x = torch.randn(*shape)
        expected = _eager(restored, x, dynamic=shape[2:] != (32, 32))
        assert expected.std() > 0.1  # a real signal to compare
        got = session.run(None, {'input': x.numpy()})[0]
        assert np.abs(got - expected.numpy()).max() < TOLERANCE, shape
    meta = {p.key: p.value for p in onnx.load(str(result.path)).metadata_props}
    inside = json.loads(meta['t2tvit'])
    sidecar = json.loads(result.sidecar.read_text())
    assert inside['preprocess'] == sidecar['preprocess'] and sidecar['min_side'] == 19
    assert sidecar['preprocess']['mean'] == [0.485, 0.456, 0.406] and sidecar['preprocess']['resize'] == 35
    assert [c['input_shape'][0] for c in sidecar['checks']][:2] == [1, 3]


def test_torchscript_runs_any_batch(exported):
    restored, results = exported
    result = results['torchscript']
    assert result.dynamic_batch and not result.dynamic_hw and result.max_abs_diff < TOLERANCE
    extra = {'t2tvit.json': ''}
    module = torch.jit.load(str(result.path), _extra_files=extra)
    assert json.loads(extra['t2tvit.json'])['classes'] == ['0', '1', '2', '3', '4']
    for batch in (5, 1):
        x = torch.randn(batch, 3, 32, 32)
        assert (module(x) - _eager(restored, x)).abs().max() < TOLERANCE


def test_exported_program_runs_any_batch(exported):
    restored, results = exported
    result = results['exported-program']
    assert result.max_abs_diff < TOLERANCE
    extra = {'t2tvit.json': ''}
    program = torch.export.load(str(result.path), extra_files=extra)
    assert json.loads(extra['t2tvit.json'])['model'] == 't2t_vit_7'
    for batch in (5, 1):
        x = torch.randn(batch, 3, 32, 32)
        assert (program.module()(x) - _eager(restored, x)).abs().max() < TOLERANCE


def test_safetensors_round_trips_into_create_model(exported):
    restored, results = exported
    path = str(results['safetensors'].path)
    kwargs = dict(TINY, tokens_type=restored.model.tokens_to_token.tokens_type)
    ours = t2tvit.create_model('t2t_vit_7', checkpoint_path=path, **kwargs)  # through load_checkpoint
    # timm keeps a pretrained head only when the cfg's class count matches
    timms = timm.create_model('t2t_vit_7', pretrained=True, **kwargs,
                              pretrained_cfg_overlay=dict(file=path, num_classes=TINY['num_classes']))
    again = restore_model(path)  # no --model: the file's metadata says what it is
    assert again.name == 't2t_vit_7' and again.model_kwargs == restored.model_kwargs
    expected = restored.model.state_dict()
    for model in (ours, timms, again.model):
        state = model.state_dict()
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)


def test_legacy_onnx_exporter_has_a_dynamic_batch_but_fixed_size(tmp_path):
    restored = _restored('performer')
    result = export_model(restored, 'onnx', tmp_path / 'legacy.onnx', onnx_exporter='legacy')
    assert not result.dynamic_hw and result.max_abs_diff < TOLERANCE
    session = ort.InferenceSession(str(result.path), providers=['CPUExecutionProvider'])
    x = torch.randn(6, 3, 32, 32)
    assert np.abs(session.run(None, {'input': x.numpy()})[0] - _eager(restored, x).numpy()).max() < TOLERANCE
    with pytest.raises(ExportError, match='keeps height and width fixed'):
        export_model(restored, 'onnx', tmp_path / 'x.onnx', onnx_exporter='legacy', dynamic_hw=True)
    with pytest.raises(ExportError, match='torchscript keeps height and width fixed'):
        export_model(restored, 'torchscript', tmp_path / 'x.pt', dynamic_hw=True)


def test_a_failed_check_writes_nothing_and_keeps_the_old_file(tmp_path):
    target = tmp_path / 'model.safetensors'
    target.write_bytes(b'the previous export')
    with pytest.raises(ExportError, match='differs from the eager model.*nothing was written'):
        export_model(_restored('performer'), 'safetensors', target, tolerance=-1.0, force=True)
    assert target.read_bytes() == b'the previous export'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model.safetensors']


def test_export_command_and_its_errors(tiny_run, tmp_path, capsys):
    assert cli(['export', '--format', 'safetensors', '--checkpoint', str(tiny_run), '-o', str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert 't2t_vit_mini.safetensors' in out and 'max |exported - eager|' in out
    assert (tmp_path / 't2t_vit_mini.safetensors.json').is_file()
    assert cli(['export', '--format', 'safetensors', '--checkpoint', str(tiny_run), '-o', f'{tmp_path}/new/']) == 0
    assert (tmp_path / 'new' / 't2t_vit_mini.safetensors').is_file()  # a trailing slash names a folder
    capsys.readouterr()
    assert cli(['export', '--format', 'onnx', '--checkpoint', str(tiny_run), '-o',
                str(tmp_path / 'no' / 'such' / 'm.onnx')]) == 2
    assert 'no/such does not exist' in capsys.readouterr().err
    assert cli(['export', '--format', 'torchscript', '--checkpoint', str(tiny_run), '--model', 't2t_vit_14']) == 2
    assert 'does not fit t2t_vit_14' in capsys.readouterr().err
    assert cli(['export', '--format', 'tflite', '--checkpoint', str(tiny_run)]) == 2
    assert '--format tflite: give one of onnx, torchscript' in capsys.readouterr().err


def test_the_readme_onnx_example_runs_without_torch_and_agrees_with_predict(tiny_run, tmp_path):
    from PIL import Image
    restored = restore_model(tiny_run)
    result = export_model(restored, 'onnx', tmp_path / 'tiny.onnx', onnx_exporter='legacy')
    rng = np.random.default_rng(1)
    image = tmp_path / 'photo.png'
    Image.fromarray(rng.integers(0, 255, (45, 70, 3), dtype=np.uint8)).save(image)
    script = REPO / 'examples' / 'onnx_predict.py'
    blocked = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
               "runpy.run_path(sys.argv[0], run_name='__main__')")
    run = subprocess.run([sys.executable, '-c', blocked, str(script), str(result.path), str(image)],
                         capture_output=True, text=True, check=True)
    lines = [line.split(maxsplit=1) for line in run.stdout.splitlines()]
    top = predict_images(restored, [image], topk=4, progress=False).predictions[0].top
    assert [name for _, name in lines] == [name for _, name, _ in top]
    assert [float(p) for p, _ in lines] == pytest.approx([p for _, _, p in top], abs=1e-4)
    shown = (REPO / 'docs' / 'export.md').read_text()
    assert script.read_text().split('\n', 1)[1].strip() in shown  # the export guide shows it



# --- int8 ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def int8_export(tiny_run, tmp_path_factory):
    """The tiny trained checkpoint quantized through the command line, calibrated on fake training images."""
    out = tmp_path_factory.mktemp('int8')
    code = cli(['export', '--format', 'onnx-int8', '--checkpoint', str(tiny_run), '--dataset', 'fake',
                '--calibration-images', '40', '--onnx-exporter', 'legacy', '-o', f'{out}/'])
    return code, out


def test_int8_export_writes_a_quantized_graph_and_its_measured_agreement(int8_export, tiny_run, capsys):
    code, out = int8_export
    assert code == 0
    path = out / 't2t_vit_mini.int8.onnx'
    proto = onnx.load(str(path))
    ops = {node.op_type for node in proto.graph.node}
    assert {'QuantizeLinear', 'DequantizeLinear', 'MatMul'} <= ops
    int8_weights = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    assert int8_weights  # weights stored as int8, not only activations
    sidecar = json.loads((out / 't2t_vit_mini.int8.onnx.json').read_text())
    report = sidecar['int8']
    assert report['calibration_images'] == 40 and report['calibration_split'] == 'train'
    assert json.loads({p.key: p.value for p in proto.metadata_props}['t2tvit'])['classes'] == sidecar['classes']

    # the reported figures are what the written file and the eager model give on the evaluation split
    from t2tvit.data import build_dataset
    restored = restore_model(str(tiny_run))
    eval_set = build_dataset('fake', None, 'val', transform=restored.transform(), in_chans=3, fake_num_samples=16,
                             fake_num_classes=4, fake_image_size=32, seed=restored.facts['seed'])
    x = torch.stack([eval_set[i][0] for i in range(len(eval_set))])
    labels = np.array([eval_set[i][1] for i in range(len(eval_set))])
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    int8 = session.run(None, {'input': x.numpy()})[0].argmax(1)
    with torch.no_grad():
        fp32 = restored.model(x).argmax(1).numpy()
    assert report['images'] == len(eval_set) == 16
    assert report['int8_top1'] == pytest.approx(100 * (int8 == labels).mean())
    assert report['fp32_top1'] == pytest.approx(100 * (fp32 == labels).mean())
    assert report['top1_agreement'] == pytest.approx(100 * (int8 == fp32).mean())
    assert report['top1_drop'] == pytest.approx(report['fp32_top1'] - report['int8_top1'])


def test_int8_for_openvino_has_symmetric_int8_activations_and_reports_openvino_figures(tiny_run, tmp_path):
    import openvino
    assert cli(['export', '--format', 'onnx-int8', '--checkpoint', str(tiny_run), '--dataset', 'fake',
                '--calibration-images', '40', '--int8-runtime', 'openvino', '-o', f'{tmp_path}/']) == 0
    path = tmp_path / 't2t_vit_mini.int8.onnx'
    proto = onnx.load(str(path))
    init = {t.name: t for t in proto.graph.initializer}
    activation_zero_points = [init[n.input[2]] for n in proto.graph.node if n.op_type == 'QuantizeLinear'
                              and n.input[0] not in init]
    assert activation_zero_points
    for zp in activation_zero_points:  # symmetric int8: OpenVINO folds these into its int8 products
        assert zp.data_type == onnx.TensorProto.INT8 and not onnx.numpy_helper.to_array(zp).any()
    report = json.loads((tmp_path / 't2t_vit_mini.int8.onnx.json').read_text())['int8']
    assert (report['runtime'], report['activation_type'], report['activation_symmetric']) == ('openvino', 'QInt8',
                                                                                                True)
    assert len(report['float_products']) == 3 * 2  # the two Performers' products
    # the reported int8 top-1 is what OpenVINO gives on the written file
    from t2tvit.data import build_dataset
    restored = restore_model(str(tiny_run))
    eval_set = build_dataset('fake', None, 'val', transform=restored.transform(), in_chans=3, fake_num_samples=16,
                             fake_num_classes=4, fake_image_size=32, seed=restored.facts['seed'])
    x = torch.stack([eval_set[i][0] for i in range(len(eval_set))]).numpy()
    labels = np.array([eval_set[i][1] for i in range(len(eval_set))])
    from t2tvit.tools.quantize import _own_signal_stack
    with _own_signal_stack():  # OpenVINO leaves the thread a signal stack that it frees (see the test below)
        core = openvino.Core()
        compiled = core.compile_model(core.read_model(str(path)), 'CPU', {'INFERENCE_PRECISION_HINT': 'f32'})
        int8 = compiled.create_infer_request().infer({0: x})[0].argmax(1)
        del compiled
    assert report['int8_top1'] == pytest.approx(100 * (int8 == labels).mean())


def test_an_openvino_session_leaves_the_threads_signal_stack_as_it_was():
    """OpenVINO's CPU plugin gives the thread that compiles or runs a model an alternate signal stack of its own and
    frees it later; left in place, the next signal (a SIGTERM that `train` turns into a saved stop) crashes the
    process. The runner puts the thread's own stack back after every call."""
    import ctypes
    from t2tvit.tools.export import _onnx_bytes
    from t2tvit.tools.quantize import _SignalStack, _sigaltstack, runner
    sigaltstack = _sigaltstack()

    def current():
        stack = _SignalStack()
        assert sigaltstack(None, ctypes.byref(stack)) == 0
        return stack.ss_sp, stack.ss_flags, stack.ss_size
    model = timm.create_model('t2t_vit_mini', img_size=28, in_chans=1, depth=1).eval()
    with torch.no_grad():
        data = _onnx_bytes(model, torch.randn(2, 1, 28, 28), False, 0, 'legacy', 18, '{}')
    before = current()
    run = runner('openvino', data)
    assert current() == before
    logits = run(np.zeros((2, 1, 28, 28), np.float32))
    assert logits.shape == (2, model.num_classes) and current() == before


@pytest.mark.parametrize('exporter', ['dynamo', 'legacy'])
def test_the_performers_activation_products_stay_float_and_the_backbones_do_not(exporter):
    """The T2T module's products of two activations (the Performer's linear attention, values up to ~1e4) are left
    out of int8; the backbone's attention products are quantized. A graph without module scopes (legacy) keeps
    every product of two activations in float."""
    from t2tvit.tools.export import _onnx_bytes
    from t2tvit.tools.quantize import quantize_onnx
    model = timm.create_model('t2t_vit_mini', img_size=32, in_chans=3, depth=2, num_classes=4).eval()
    assert model.tokens_to_token.attention1.__class__.__name__ == 'TokenPerformer'
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        fp32 = _onnx_bytes(model, x[:2], False, 0, exporter, 18, '{}')
    proto = onnx.load_from_string(quantize_onnx(fp32, [x.numpy()]))
    init = {t.name for t in proto.graph.initializer}
    producer = {o: n.op_type for n in proto.graph.node for o in n.output}

    def weight(name):  # an initializer, or one dequantized from an initializer
        node = next((n for n in proto.graph.node if name in n.output), None)
        return name in init or (node is not None and node.op_type == 'DequantizeLinear' and node.input[0] in init)
    products = [n for n in proto.graph.node if n.op_type == 'MatMul' and not any(weight(i) for i in n.input[:2])]
    quantized = [all(producer.get(i) == 'DequantizeLinear' for i in n.input[:2]) for n in products]
    performer = 3 * 2  # three products in each of the two Performers
    backbone = 2 * 2  # q @ k and attention @ v in each of the two blocks
    assert len(products) == performer + backbone
    if exporter == 'dynamo':
        assert quantized == [False] * performer + [True] * backbone
    else:
        assert not any(quantized)


def test_int8_for_openvino_without_openvino_is_one_clear_error(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'openvino', None)  # import openvino now raises ImportError
    assert cli(['export', '--format', 'onnx-int8', '--checkpoint', str(tiny_run), '--dataset', 'fake',
                '--int8-runtime', 'openvino', '-o', f'{tmp_path}/']) == 2
    err = capsys.readouterr().err
    assert 'needs the openvino package: pip install "t2tvit[export]"' in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_int8_runtime_is_refused_for_a_float_format(tiny_run, tmp_path, capsys):
    assert cli(['export', '--format', 'onnx', '--checkpoint', str(tiny_run), '--int8-runtime', 'openvino', '-o',
                f'{tmp_path}/']) == 2
    assert '--int8-runtime is for --format onnx-int8' in capsys.readouterr().err


@pytest.mark.parametrize('argv,message', [
    ([], 'calibrates on training images: give --dataset KIND and --data PATH'),
    (['--dataset', 'cifar10'], '--dataset cifar10 needs --data PATH'),
])
def test_int8_without_calibration_data_is_one_clear_error(tiny_run, tmp_path, capsys, argv, message):
    assert cli(['export', '--format', 'onnx-int8', '--checkpoint', str(tiny_run), '-o', f'{tmp_path}/'] + argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_a_refused_export_into_a_new_folder_leaves_no_folder(tiny_run, tmp_path, capsys):
    """`-o new/` names a folder made only when the files are written: data that cannot be read (found after the
    output was checked) leaves nothing behind."""
    assert cli(['export', '--format', 'onnx-int8', '--checkpoint', str(tiny_run), '--dataset', 'fashion_mnist',
                '--data', str(tmp_path / 'missing'), '-o', f'{tmp_path}/new/']) == 2
    assert 'not found in' in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_calibration_data_is_refused_for_a_float_format(tiny_run, tmp_path, capsys):
    assert cli(['export', '--format', 'onnx', '--checkpoint', str(tiny_run), '--dataset', 'fake', '-o',
                f'{tmp_path}/']) == 2
    assert '--dataset and --data are for --format onnx-int8' in capsys.readouterr().err


def test_int8_calibration_reads_training_images_only(tiny_run, monkeypatch):
    from t2tvit.tools import quantize
    splits = []
    real = quantize.build_dataset
    monkeypatch.setattr(quantize, 'build_dataset', lambda *a, **k: splits.append(a[2]) or real(*a, **k))
    batches = quantize.calibration_batches(restore_model(str(tiny_run)), 'fake', None, images=20, batch_size=8)
    assert splits == ['train'] and [len(b) for b in batches] == [5, 5, 5, 5]  # one batch size: 20 = 4 x 5
    assert batches[0].shape[1:] == (3, 32, 32) and batches[0].dtype == np.float32
