"""`t2tvit benchmark --runs infer:int8`: latency of each model's fp32 ONNX graph and its static int8 (QDQ) graph,
at batch 1 and batch 16, in ONNX Runtime and (where it is installed) OpenVINO, timed side by side in one process.
Each runtime runs the int8 file made for it (`quantize.INT8_RUNTIMES`) and the same fp32 file.

Each round runs every (model, precision, batch) once, in an order that rotates from round to round, so that a
machine that gets busier or quieter moves every figure alike; the int8 speed-up is the median of per-round ratios.
The int8 graphs are calibrated on random smooth patterns unless a checkpoint is given: their speed does not depend
on the ranges, but their accuracy does, so these files measure speed only (`t2tvit export --format onnx-int8`
calibrates on real images and measures accuracy).
"""
from __future__ import annotations

import statistics
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..engine.precision import cpu_flags
from .export import _onnx_bytes
from .quantize import (CALIBRATION_METHOD, CALIBRATION_PERCENTILE, INT8_RUNTIMES, OPENVINO_CONFIG, QUANTIZED_OPS,
                       RUNTIME_NAMES, WEIGHT_TYPE, openvino_version, quantize_onnx, runner)

__all__ = ['INT8_BATCHES', 'int8_latency', 'format_int8']

INT8_BATCHES = (1, 16)
INT8_FLAGS = ('amx', 'avx512_vnni', 'avx_vnni', 'avx512_bf16')  # /proc/cpuinfo flags that decide int8 speed
RANDOM_CALIBRATION = ('random smooth patterns (the benchmark\'s agreement images), not real images: these int8 '
                      'graphs measure speed only; their accuracy is not meaningful')


def _graphs(model: nn.Module, calibration: torch.Tensor, runtimes: Sequence[str],
            opset: int = 18) -> Tuple[bytes, Dict[str, bytes]]:
    """(fp32 ONNX, {runtime: int8 QDQ ONNX made for it}) of `model` at its own size, any batch."""
    model = model.cpu().eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter('ignore')  # exporter chatter about constant shapes
        fp32 = _onnx_bytes(model, calibration[:2], False, 0, 'dynamo', opset, '{}')
    batches = [b.numpy() for b in calibration.split(8)]
    return fp32, {runtime: quantize_onnx(fp32, batches, runtime=runtime) for runtime in runtimes}


def _timed(run: Callable[[np.ndarray], Any], x: np.ndarray, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        run(x)
    return (time.perf_counter() - start) / iters


def _time_rounds(cells: List[Dict[str, Any]], reps: int) -> None:
    for cell in cells:  # warm-up: the runtimes plan their buffers on the first call of each shape
        _timed(cell['run'], cell['x'], 1)
    for r in range(reps):
        shift = r % len(cells)
        for cell in cells[shift:] + cells[:shift]:
            cell['times_s'].append(_timed(cell['run'], cell['x'], cell['iters']))


def _row(name: str, kind: str, runtime: str, batch: int, fp32: Dict[str, Any],
         int8: Dict[str, Any]) -> Dict[str, Any]:
    row: Dict[str, Any] = dict(name=name, kind=kind, runtime=runtime, batch=batch)
    for label, cell in (('fp32', fp32), ('int8', int8)):
        times = cell['times_s']
        row[label] = dict(latency_ms=1e3 * statistics.median(times), latency_ms_min=1e3 * min(times),
                          latency_ms_max=1e3 * max(times), images_per_s=batch / statistics.median(times),
                          times_s=times, file_bytes=cell['bytes'])
    row['int8_speedup'] = statistics.median(f / i for f, i in zip(fp32['times_s'], int8['times_s']))
    return row


def int8_latency(names: Sequence[Tuple[str, str]], build: Callable[[str], nn.Module], img_size: int,
                 calibration: Callable[[int], torch.Tensor], threads: int, reps: int,
                 log: Callable[[str], None] = print, batch_iters: Optional[Dict[int, int]] = None) -> Dict[str, Any]:
    """Time fp32 and int8 sessions of every (name, kind) at batch 1 and 16 in ONNX Runtime and, where it is
    installed, OpenVINO; returns the JSON part."""
    import onnxruntime as ort
    batch_iters = batch_iters or {1: 5, 16: 1}
    openvino = openvino_version()
    runtimes = ['onnxruntime'] + (['openvino'] if openvino else [])
    if not openvino:
        log('  infer:int8: OpenVINO is not installed (pip install "t2tvit[export]"): ONNX Runtime only')
    cells: List[Dict[str, Any]] = []
    built: Dict[str, Any] = {}
    for name, kind in names:
        model = build(name)
        in_chans = getattr(model, 'in_chans', 3)
        started = time.perf_counter()
        fp32, int8 = _graphs(model, calibration(in_chans), runtimes)
        built[name] = dict(kind=kind, export_and_quantize_s=time.perf_counter() - started)
        log(f'  infer:int8: {name} exported and quantized in {built[name]["export_and_quantize_s"]:.1f} s')
        g = torch.Generator().manual_seed(0)
        for batch in INT8_BATCHES:
            x = torch.randn(batch, in_chans, img_size, img_size, generator=g).numpy()
            for runtime in runtimes:
                for precision, data in (('fp32', fp32), ('int8', int8[runtime])):
                    cells.append(dict(name=name, runtime=runtime, precision=precision, batch=batch, x=x,
                                      iters=batch_iters[batch], run=runner(runtime, data, threads), bytes=len(data),
                                      times_s=[]))
    _time_rounds(cells, reps)
    rows = []
    for name, info in built.items():
        for runtime in runtimes:
            for batch in INT8_BATCHES:
                pair = {c['precision']: c for c in cells
                        if (c['name'], c['runtime'], c['batch']) == (name, runtime, batch)}
                rows.append(_row(name, info['kind'], runtime, batch, pair['fp32'], pair['int8']))

    def quantization(runtime: str) -> Dict[str, Any]:
        activations, symmetric = INT8_RUNTIMES[runtime]
        return dict(format='QDQ', ops=list(QUANTIZED_OPS), activations=activations, activation_symmetric=symmetric,
                    weights=WEIGHT_TYPE, per_channel=True, calibration=RANDOM_CALIBRATION,
                    calibration_method=f'{CALIBRATION_METHOD} {CALIBRATION_PERCENTILE}',
                    float_products="the T2T module's products of two activations (the Performer's)")
    return dict(
        onnxruntime=ort.__version__, openvino=openvino or 'not installed', runtimes=runtimes,
        cpu_int8_flags=sorted(f for f in cpu_flags() if f.startswith(INT8_FLAGS)),
        img_size=img_size, reps=reps, batch_iters=batch_iters,
        session_options=dict(intra_op_num_threads=threads, inter_op_num_threads=1,
                             graph_optimization_level='ORT_ENABLE_ALL (default)',
                             providers=['CPUExecutionProvider']),
        openvino_config=dict(OPENVINO_CONFIG, INFERENCE_NUM_THREADS=threads, device='CPU'),
        quantization=quantization('onnxruntime'),
        quantization_by_runtime={runtime: quantization(runtime) for runtime in runtimes},
        export_and_quantize_s={n: i['export_and_quantize_s'] for n, i in built.items()},
        models=rows)


def format_int8(result: Dict[str, Any]) -> str:
    header = (f"{'infer:int8':<28}{'runtime':<14}{'batch':>6}{'fp32 ms':>10}{'int8 ms':>10}{'fp32 img/s':>12}"
              f"{'int8 img/s':>12}{'int8 / fp32':>13}")
    versions = f"ONNX Runtime {result['onnxruntime']}, OpenVINO {result.get('openvino', 'not installed')}"
    lines = [f"{versions}, {result['session_options']['intra_op_num_threads']} threads, {result['img_size']} px, "
             f"median of {result['reps']} rounds; int8 calibrated on random images (speed only)",
             header, '-' * len(header)]
    for r in result['models']:
        runtime = RUNTIME_NAMES[r.get('runtime', 'onnxruntime')]
        lines.append(f"{r['name']:<28}{runtime:<14}{r['batch']:>6}{r['fp32']['latency_ms']:>10.1f}"
                     f"{r['int8']['latency_ms']:>10.1f}{r['fp32']['images_per_s']:>12.1f}"
                     f"{r['int8']['images_per_s']:>12.1f}{r['int8_speedup']:>12.2f}x")
    return '\n'.join(lines)
