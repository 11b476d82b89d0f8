"""int8 ONNX: static QDQ quantization with ONNX Runtime, calibrated on training images, checked on evaluation images.

`quantize_onnx` turns an fp32 ONNX graph into a QDQ int8 one (weights int8 per output channel, activations 8-bit per
tensor, ranges from the 99.999th percentile of a calibration pass). Only the matrix products are quantized (MatMul,
Gemm, Conv): LayerNorm, Softmax, GELU and the Performer's exp stay in float, where int8 loses the most and saves the
least.

The file is made for one runtime, because the two CPU runtimes run different activation types fast
(`INT8_RUNTIMES`): ONNX Runtime's x86 kernels want uint8 activations, OpenVINO's want symmetric int8 ones (with
uint8 it leaves the zero-point arithmetic as separate float passes). Both read either file; `runner` runs one.

`export_int8` is `t2tvit export --format onnx-int8`: it exports the model as fp32 ONNX (checked against the eager
model as every ONNX export is), calibrates on a few hundred images of the data set's training split through the
checkpoint's own evaluation transform, and then measures on the evaluation split the top-1 of the fp32 and the int8
graphs and how often their top-1 classes agree. The file and its sidecar JSON (with those figures) are written
atomically, and only after the measurement.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import io
import json
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..data import build_dataset
from ..engine.preflight import check_outputs
from ..engine.restore import RestoredModel
from ..engine.build import fake_split_size
from .export import (INPUT_NAME, ExportError, _max_diff, _onnx_bytes, _onnx_runner, _require, _sidecar,
                     _suffix_path, _write_export)

__all__ = ['QUANTIZED_OPS', 'INT8_RUNTIMES', 'Int8Report', 'quantize_onnx', 'token_stage_activation_products',
           'ort_session', 'runner', 'export_int8', 'calibration_batches', 'check_calibration_source', 'format_report']

QUANTIZED_OPS = ('MatMul', 'Gemm', 'Conv')
WEIGHT_TYPE = 'QInt8'
# runtime: (activation type, symmetric activations). onnxruntime: uint8 activations with int8 weights (U8S8) are the
# product its x86 kernels (VNNI, AMX) run fast; int8 activations (S8S8) fall back to a generic kernel there that is
# slower than fp32. openvino: symmetric int8 activations fold into its int8 products (oneDNN's VNNI/AMX kernels); with
# asymmetric uint8 ones it subtracts the zero points in separate float passes, and T2T-ViT-7's graph ran 1.5x its
# fp32 graph instead of 2.0x at batch 16 (benchmarks/xeon-amx-int8-openvino-2026-12-06-ab.json)
INT8_RUNTIMES = {'onnxruntime': ('QUInt8', False), 'openvino': ('QInt8', True)}
ACTIVATION_TYPE = INT8_RUNTIMES['onnxruntime'][0]
RUNTIME_NAMES = {'onnxruntime': 'ONNX Runtime', 'openvino': 'OpenVINO'}
# OpenVINO runs the float parts of both graphs in fp32: by default it would run them in bf16 on a CPU with AMX
OPENVINO_CONFIG = {'PERFORMANCE_HINT': 'LATENCY', 'INFERENCE_PRECISION_HINT': 'f32'}
# activation ranges from the 99.999th percentile of each tensor's calibration values: a few outliers (the Performer's
# exp, the residual stream) would otherwise stretch the min-max range and coarsen every other value's step
CALIBRATION_METHOD, CALIBRATION_PERCENTILE = 'Percentile', 99.999


@dataclass
class Int8Report:
    """What an int8 export measured on the evaluation split (top-1 in percent)."""
    images: int
    fp32_top1: float
    int8_top1: float
    top1_agreement: float
    calibration_images: int
    calibration_split: str
    dataset: str
    data: Optional[str]
    per_channel: bool
    quantized_ops: List[str]
    runtime: str = 'onnxruntime'
    activation_type: str = ACTIVATION_TYPE
    activation_symmetric: bool = False
    float_products: List[str] = field(default_factory=list)  # products of two activations left in float
    weight_type: str = WEIGHT_TYPE
    calibration_method: str = f'{CALIBRATION_METHOD} {CALIBRATION_PERCENTILE}'

    @property
    def top1_drop(self) -> float:
        return self.fp32_top1 - self.int8_top1


def ort_session(data: Union[bytes, str, Path], threads: Optional[int] = None):
    """A CPU ONNX Runtime session; `threads` fixes the intra-op pool (None: ONNX Runtime's default)."""
    ort = _require('onnxruntime', 'onnx-int8')
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(data if isinstance(data, bytes) else str(data), options,
                                providers=['CPUExecutionProvider'])


def openvino_version() -> Optional[str]:
    """OpenVINO's version, or None where it is not installed."""
    try:
        import openvino
    except ImportError:
        return None
    return openvino.__version__


class _SignalStack(ctypes.Structure):
    _fields_ = [('ss_sp', ctypes.c_void_p), ('ss_flags', ctypes.c_int), ('ss_size', ctypes.c_size_t)]


@functools.lru_cache(maxsize=None)
def _sigaltstack() -> Optional[Callable]:
    """The C library's `sigaltstack`, looked up once; None without a POSIX C library."""
    try:
        return ctypes.CDLL(None, use_errno=True).sigaltstack
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def _own_signal_stack():
    """Give the calling thread back its alternate signal stack (`sigaltstack`) after the block.

    OpenVINO's CPU plugin sets one of its own on the thread that compiles or runs a model and frees it with the
    model; a signal that arrives later (Ctrl-C, a SIGTERM that `t2tvit train` turns into a saved stop) would then be
    delivered on freed memory and crash the process instead of reaching Python's handler.
    """
    sigaltstack = _sigaltstack()
    if sigaltstack is None:  # nothing to keep
        yield
        return
    old = _SignalStack()
    saved = sigaltstack(None, ctypes.byref(old)) == 0
    try:
        yield
    finally:
        if saved:
            sigaltstack(ctypes.byref(old), None)


def runner(runtime: str, data: bytes, threads: Optional[int] = None) -> Callable[[np.ndarray], np.ndarray]:
    """A CPU session of the ONNX graph `data` in `runtime` (one of INT8_RUNTIMES): images (N, C, H, W) -> logits."""
    if runtime == 'onnxruntime':
        session = ort_session(data, threads)
        return lambda x: session.run(None, {INPUT_NAME: x})[0]
    ov = _require('openvino', 'onnx-int8 --int8-runtime openvino')
    core = ov.Core()
    with tempfile.TemporaryDirectory(prefix='t2tvit-ov-') as tmp, _own_signal_stack():
        path = Path(tmp) / 'model.onnx'  # the ONNX reader takes a file
        path.write_bytes(data)
        config = dict(OPENVINO_CONFIG, **({'INFERENCE_NUM_THREADS': threads} if threads is not None else {}))
        compiled = core.compile_model(core.read_model(str(path)), 'CPU', config)
        request = compiled.create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        with _own_signal_stack():
            return request.infer({0: x})[0].copy()
    return run


class _Batches:
    """`onnxruntime.quantization.CalibrationDataReader` over arrays (N, C, H, W), a few images per call."""

    def __init__(self, batches: Sequence[np.ndarray]):
        self._batches = list(batches)
        self._next: Iterator[np.ndarray] = iter(self._batches)

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        batch = next(self._next, None)
        return None if batch is None else {INPUT_NAME: batch}

    def rewind(self) -> None:
        self._next = iter(self._batches)


def token_stage_activation_products(source, prepared) -> List[str]:
    """Names of the MatMuls in `prepared` (a graph after `quant_pre_process`) that multiply two activations inside
    the T2T module, read from the exporter's module scopes in `source` (the fp32 graph, whose node names the
    preparation keeps). These are the Performer's linear-attention products: their values span four orders of
    magnitude (up to ~1e4 on the demo model), which 8 bits cannot hold, and OpenVINO computed them wrongly in
    symmetric int8 (the demo model fell to 59% top-1). They stay in float; the backbone's attention products do not.
    A graph without module scopes (the legacy exporter's) keeps every product of two activations in float.
    """
    scopes = {n.name: p.value for n in source.graph.node for p in n.metadata_props
              if p.key == 'pkg.torch.onnx.name_scopes'}
    weights = {t.name for t in prepared.graph.initializer}
    return [n.name for n in prepared.graph.node
            if n.op_type == 'MatMul' and not set(n.input[:2]) & weights
            and (not scopes or "'tokens_to_token" in scopes.get(n.name, ''))]


def quantize_onnx(fp32: bytes, calibration: Sequence[np.ndarray], per_channel: bool = True,
                  op_types: Sequence[str] = QUANTIZED_OPS, runtime: str = 'onnxruntime') -> bytes:
    """Static QDQ int8 quantization of an fp32 ONNX graph for `runtime` (its activation type, `INT8_RUNTIMES`);
    `calibration` is a list of input batches."""
    return _quantize(fp32, calibration, per_channel, op_types, runtime)[0]


def _quantize(fp32: bytes, calibration: Sequence[np.ndarray], per_channel: bool, op_types: Sequence[str],
              runtime: str) -> Tuple[bytes, List[str]]:
    """`quantize_onnx`, and the names of the products left in float (`token_stage_activation_products`)."""
    activation_type, symmetric = INT8_RUNTIMES[runtime]
    _require('onnxruntime', 'onnx-int8')
    onnx = _require('onnx', 'onnx-int8')
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    reader = type('CalibrationBatches', (_Batches, CalibrationDataReader), {})(calibration)
    with tempfile.TemporaryDirectory(prefix='t2tvit-int8-') as tmp:
        source, prepared, target = (Path(tmp) / name for name in ('fp32.onnx', 'prepared.onnx', 'int8.onnx'))
        source.write_bytes(fp32)
        # ONNX shape inference and ONNX Runtime's graph optimizations first, so the quantizer sees fused,
        # constant-folded products (the symbolic shape pass cannot read the dynamo graph's int-list Constants)
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        source_proto = onnx.load_from_string(fp32)
        float_products = token_stage_activation_products(source_proto, onnx.load(str(prepared)))
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrator prints its progress
            quantize_static(str(prepared), str(target), reader, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(op_types), per_channel=per_channel,
                            nodes_to_exclude=float_products,
                            activation_type=getattr(QuantType, activation_type),
                            weight_type=getattr(QuantType, WEIGHT_TYPE),
                            calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHOD),
                            extra_options={'CalibPercentile': CALIBRATION_PERCENTILE,
                                           'ActivationSymmetric': symmetric})
        proto = onnx.load(str(target))
    source_meta = {p.key: p.value for p in source_proto.metadata_props}
    del proto.metadata_props[:]
    for key, value in source_meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString(), float_products


def _dataset(restored: RestoredModel, dataset: str, data: Optional[str], split: str):
    """A split of the data set through the checkpoint's evaluation transform (`fake`: as the checkpoint made it)."""
    model = restored.model
    fake_samples = fake_split_size(restored.facts.get('fake_num_samples', 256), split)
    return build_dataset(dataset, data, split, transform=restored.transform(), in_chans=model.in_chans,
                         fake_num_samples=fake_samples, fake_num_classes=model.num_classes,
                         fake_image_size=restored.preprocess['img_size'], seed=restored.facts.get('seed', 0))


def calibration_batches(restored: RestoredModel, dataset: str, data: Optional[str], images: int = 256,
                        batch_size: int = 32, seed: int = 0) -> List[np.ndarray]:
    """`images` training images, drawn by `seed`, through the checkpoint's evaluation transform, in batches of
    one size (at most `batch_size`)."""
    train_set = _dataset(restored, dataset, data, 'train')
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))[:images].tolist()
    if not order:
        raise ExportError(f'the training split of {data or dataset} holds no images to calibrate on')
    tensors = [train_set[i][0] for i in order]
    # batches of one size: the percentile calibrator stacks each tensor's values over batches and fails on a ragged one
    size = max(d for d in range(1, min(batch_size, len(tensors)) + 1) if len(tensors) % d == 0)
    return [torch.stack(tensors[i:i + size]).numpy() for i in range(0, len(tensors), size)]


def _evaluate(run_fp32: Callable, run_int8: Callable, eval_set, images: Optional[int], batch_size: int = 64):
    """(images, fp32 top-1 %, int8 top-1 %, agreement %) over the first `images` (None: all) of `eval_set`."""
    count = len(eval_set) if images is None else min(images, len(eval_set))
    hits_fp32 = hits_int8 = agree = 0
    for start in range(0, count, batch_size):
        samples = [eval_set[i] for i in range(start, min(start + batch_size, count))]
        x = torch.stack([s[0] for s in samples]).numpy()
        labels = np.array([int(s[1]) for s in samples])
        fp32, int8 = run_fp32(x).argmax(1), run_int8(x).argmax(1)
        hits_fp32 += int((fp32 == labels).sum())
        hits_int8 += int((int8 == labels).sum())
        agree += int((fp32 == int8).sum())
    if count == 0:
        raise ExportError('the evaluation split holds no images to measure the int8 model on')
    return count, 100. * hits_fp32 / count, 100. * hits_int8 / count, 100. * agree / count


def _fp32_onnx(restored: RestoredModel, path: Path, onnx_exporter: str, opset: int, tolerance: float, seed: int):
    """fp32 ONNX bytes at the model's own height/width (any batch), checked against the eager model."""
    model = copy.deepcopy(restored.model).cpu().eval()
    sidecar = _sidecar(restored, 'onnx-int8', path, False, None)
    generator = torch.Generator().manual_seed(seed)
    shape = (model.in_chans, *model.img_size)
    example = torch.randn(2, *shape, generator=generator)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter('ignore')
        try:
            data = _onnx_bytes(model, example, False, 0, onnx_exporter, opset, json.dumps(sidecar))
        except Exception as e:  # exporters raise many types; the user needs the message, not the stack
            raise ExportError(f'exporting {restored.name} as ONNX failed: {type(e).__name__}: '
                              f'{str(e).splitlines()[0] if str(e) else ""}') from e
        run = _onnx_runner(data)
        checks = []
        for batch in (1, 3):
            x = torch.randn(batch, *shape, generator=generator)
            checks.append({'input_shape': list(x.shape), 'max_abs_diff': _max_diff(run(x), model(x))})
    worst = max(c['max_abs_diff'] for c in checks)
    if worst > tolerance:
        raise ExportError(f'the fp32 ONNX graph differs from the eager model by {worst:.2e} > {tolerance:.0e}; '
                          f'nothing was written. Report this with the model name and torch version')
    return data, sidecar, checks


def check_calibration_source(dataset: Optional[str], data: Optional[str]) -> None:
    """int8 needs training images to set its ranges: refuse at once when none are named."""
    if not dataset:
        raise ExportError('--format onnx-int8 calibrates on training images: give --dataset KIND and --data PATH '
                          '(--dataset fake needs no --data)')
    if dataset != 'fake' and not data:
        raise ExportError(f'--format onnx-int8 with --dataset {dataset} needs --data PATH, the folder holding its '
                          f'training images')


def export_int8(
        restored: RestoredModel,
        dataset: Optional[str],
        data: Optional[str],
        output: Optional[Union[str, Path]] = None,
        calibration_images: int = 256,
        eval_images: Optional[int] = None,
        per_channel: bool = True,
        onnx_exporter: str = 'dynamo',
        opset: int = 18,
        tolerance: float = 1e-4,
        seed: int = 0,
        force: bool = False,
        runtime: str = 'onnxruntime',
) -> Tuple[Path, Path, Int8Report]:
    """Write NAME.int8.onnx and its sidecar; returns (path, sidecar path, Int8Report).

    Calibration reads `calibration_images` images of `dataset`'s training split (`data` its folder; none for
    'fake'); the report compares the fp32 and int8 graphs, both run in `runtime`, on the first `eval_images` (None:
    all) evaluation images.
    The graph takes any batch size at the model's own height and width, from either ONNX exporter.
    """
    check_calibration_source(dataset, data)
    if runtime == 'openvino':
        _require('openvino', 'onnx-int8 --int8-runtime openvino')  # before any work
    path = _suffix_path(output, restored.name, 'onnx-int8')
    sidecar_path = path.with_name(path.name + '.json')
    check_outputs([path, sidecar_path], [restored.checkpoint, data], force=force)
    fp32, sidecar, checks = _fp32_onnx(restored, path, onnx_exporter, opset, tolerance, seed)
    calibration = calibration_batches(restored, dataset, data, calibration_images, seed=seed)
    int8, float_products = _quantize(fp32, calibration, per_channel, QUANTIZED_OPS, runtime)
    eval_set = _dataset(restored, dataset, data, 'val')
    count, fp32_top1, int8_top1, agreement = _evaluate(runner(runtime, fp32), runner(runtime, int8), eval_set,
                                                       eval_images)
    activation_type, symmetric = INT8_RUNTIMES[runtime]
    report = Int8Report(count, fp32_top1, int8_top1, agreement, sum(len(b) for b in calibration), 'train', dataset,
                        data, per_channel, list(QUANTIZED_OPS), runtime, activation_type, symmetric, float_products)
    sidecar.update(checks_fp32_onnx=checks, int8=dict(asdict(report), top1_drop=report.top1_drop,
                                                     eval_split='val (the test images where a data set has no val)'))
    _write_export(path, int8, sidecar_path, sidecar, what='int8 ONNX export')
    return path, sidecar_path, report


def format_report(report: Int8Report) -> List[str]:
    """The lines `t2tvit export --format onnx-int8` prints about accuracy."""
    source = report.data or report.dataset
    return [f'calibrated on {report.calibration_images} {report.calibration_split} images of {source}; measured in '
            f'{RUNTIME_NAMES[report.runtime]} on {report.images} evaluation images:',
            f'  top-1 fp32 ONNX {report.fp32_top1:.2f}%, int8 {report.int8_top1:.2f}% '
            f'(drop {report.top1_drop:+.2f} points); top-1 agreement {report.top1_agreement:.2f}%']
