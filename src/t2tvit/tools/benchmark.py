"""Measured speed: throughput, peak memory and model FLOP utilisation of T2T-ViT beside timm peers, in one process.

Every timed round runs each model once (the order rotates from round to round) and also times the machine's own
matmul peak (a large square GEMM in the run's precision, by the fastest library here), so a machine that gets busier or quieter during the run
moves every figure alike: read the results as ratios measured side by side. Per run and model the benchmark reports
images/s (median over rounds, with min and max), the ratio to a reference model taken round by round, model FLOP
utilisation (MFU = model FLOPs per second / measured GEMM peak, model FLOPs from the paper's convention, see
`complexity.py`, a training step counted as 3 x the forward pass) and peak memory.

A run is MODE:PRECISION[:COMPILE]: `infer` (no_grad forward) or `train` (forward, cross-entropy, backward, AdamW
step, `zero_grad(set_to_none=True)`, no host sync), `fp32` or `bf16` (autocast), `eager` or `compiled`
(`torch.compile(model)`).
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine.checkpointing import atomic_write
from ..engine.precision import emulated_bf16_warning
from ..models import list_variants, load_checkpoint
from ..cpu_heap import KEEP_HEAP_ENV, heap_state, keep_heap_pages
from ..cpu_kernels import (
    CPU_KERNELS, CPU_PROFILE_ENV, fused_linear, host_kernel_plan, onednn_available, use_cpu_kernels)
from ..errors import InputError
from ..outputs import claim_all, free_stem
from .complexity import (
    TRAIN_STEP_FACTOR, ComplexityRow, complexity_rows, create_at_size, format_complexity_table, model_complexity)

PEERS = ('deit_tiny_patch16_224', 'deit_small_patch16_224', 'resnet50', 'mobilenetv2_100')
DEFAULT_REFERENCE = 'deit_small_patch16_224'
MODES = ('infer', 'train')
PRECISIONS = ('fp32', 'bf16', 'int8')  # int8: ONNX Runtime inference of a statically quantized graph
COMPILES = ('eager', 'compiled')


class BenchmarkError(InputError, ValueError):
    """A benchmark option that cannot work, named with what would."""


@dataclass(frozen=True)
class Run:
    mode: str
    precision: str
    compile: str = 'eager'

    @property
    def label(self) -> str:
        return f'{self.mode}:{self.precision}:{self.compile}'


def parse_runs(text: str) -> List[Run]:
    """'infer:fp32,train:bf16:compiled' -> runs; the compile part defaults to eager."""
    runs = []
    for item in (t.strip() for t in text.split(',')):
        if not item:
            continue
        parts = item.split(':')
        if len(parts) not in (2, 3):
            raise BenchmarkError(
                f'run {item!r} is not MODE:PRECISION[:COMPILE], e.g. infer:fp32 or train:bf16:compiled')
        mode, precision, compile_ = parts + ['eager'] * (3 - len(parts))
        for value, allowed, what in ((mode, MODES, 'mode'), (precision, PRECISIONS, 'precision'),
                                     (compile_, COMPILES, 'compile')):
            if value not in allowed:
                raise BenchmarkError(f'run {item!r}: {what} {value!r} is not one of {", ".join(allowed)}')
        if precision == 'int8' and (mode, compile_) != ('infer', 'eager'):
            raise BenchmarkError(f'run {item!r}: int8 is timed as inference in ONNX Runtime; use infer:int8')
        run = Run(mode, precision, compile_)
        if run not in runs:
            runs.append(run)
    if not runs:
        raise BenchmarkError('no runs given; e.g. --runs infer:fp32,infer:bf16,train:fp32')
    return runs


@dataclass
class BenchConfig:
    """Every option; the defaults are the `cpu` preset (`make bench`: a few minutes on 2 cores)."""
    models: List[str] = field(default_factory=lambda: ['t2t_vit_7', 't2t_vit_14', 't2t_vit_t_14'])
    peers: List[str] = field(default_factory=lambda: list(PEERS))
    runs: List[Run] = field(default_factory=lambda: parse_runs('infer:fp32,infer:bf16,train:fp32'))
    # models and peers that train runs time; None: all of them
    train_models: Optional[List[str]] = field(default_factory=lambda: ['t2t_vit_14', DEFAULT_REFERENCE])
    batch_size: int = 16
    img_size: int = 224
    device: str = 'cpu'
    threads: Optional[int] = None  # CPU threads; None: torch's default (one per core)
    warmup: int = 2  # untimed steps per model before the rounds; the first one (compilation) is reported
    reps: int = 7  # timed rounds
    iters: int = 1  # steps per model per round
    ab: Tuple[str, ...] = ()  # CPU kernels left out in a B copy of each of our models, timed beside A
    agreement_images: int = 64  # images for the bf16-vs-fp32 top-1 agreement (0: skip)
    checkpoints: Dict[str, str] = field(default_factory=dict)  # model name -> weights file
    peak_size: int = 2048  # side of the square GEMM that measures the matmul peak
    reference: Optional[str] = None  # the model every other is divided by, round by round; None: deit_small if timed
    variants_table: bool = True  # print (and store) the complexity of every variant at 224 and 384
    output: Optional[Path] = Path('benchmarks')  # folder for JSON and PNG; None: write nothing
    stem: Optional[str] = None  # file name without suffix; default DEVICE-DATE (-smoke)
    plot: bool = True
    smoke: bool = False  # toy sizes: a check of the code path, not figures


PRESETS: Dict[str, Dict[str, Any]] = {
    'cpu': {},  # the defaults
    # `make bench-gpu`: within 5 minutes on one H100
    'gpu': dict(
        models=['t2t_vit_14', 't2t_vit_t_14'], peers=['deit_small_patch16_224'],
        runs=parse_runs('infer:bf16,train:bf16,infer:bf16:compiled,train:bf16:compiled'), train_models=None,
        batch_size=128, img_size=224, device='cuda', warmup=3, reps=10, iters=5, agreement_images=256,
        peak_size=8192, variants_table=False),
}

# --smoke: the same code path at toy sizes, to check a preset on a machine it was not made for
SMOKE = dict(batch_size=2, img_size=64, warmup=1, reps=2, iters=1, agreement_images=4, peak_size=256, smoke=True)


def _fail(message: str) -> None:
    raise BenchmarkError(message)


def validate(config: BenchConfig) -> BenchConfig:
    """Check what the option table cannot (names against the registries, options against each other, files)
    before anything is built, so a typo fails in a second with the fix. Ranges and choices are the table's."""
    ours = set(list_variants())
    for name in config.models:
        if name not in ours:
            _fail(f'--models: {name!r} is not a T2T-ViT variant; one of {", ".join(sorted(ours))}')
    for name in config.peers:
        if not timm.is_model(name):
            _fail(f'--peers: {name!r} is not a timm model name (timm.list_models() lists them)')
    everyone = list(config.models) + list(config.peers)
    if not everyone:
        _fail('nothing to time: give --models and/or --peers')
    if config.train_models is not None:
        for name in config.train_models:
            if name not in everyone:
                _fail(f'--train-models: {name!r} is not among --models/--peers ({", ".join(everyone)})')
    if config.reference is not None and config.reference not in everyone:
        _fail(f'--reference {config.reference!r} is not among --models/--peers ({", ".join(everyone)})')
    for name in config.checkpoints:
        if name not in everyone:
            _fail(f'--checkpoint {name}=...: {name!r} is not among --models/--peers')
    for name, path in config.checkpoints.items():
        if not Path(path).is_file():
            _fail(f'--checkpoint {name}={path}: no such file')
    for name in config.ab:
        if name not in CPU_KERNELS:
            _fail(f'--ab: {name!r} is not a CPU kernel; one of {", ".join(CPU_KERNELS)} (or all)')
    if config.ab and not config.models:
        _fail('--ab compares our models with CPU kernels on and off: give --models')
    if config.device == 'cpu' and config.ab and set(config.ab) != set(CPU_KERNELS):
        plan = host_kernel_plan()
        off = [name for name in config.ab if not plan['kernels'][name]['on']]
        if off:
            is_, it = ('is', 'it') if len(off) == 1 else ('are', 'them')
            _fail(f'--ab: {", ".join(off)} {is_} off in this host\'s plan (profile {plan["profile"]}), so the copy '
                  f'without {it} would be the same model; name kernels the plan has on, or force a profile that has '
                  f'{it} on with {CPU_PROFILE_ENV}=PROFILE')
    if config.device == 'cuda' and not torch.cuda.is_available():
        _fail('--device cuda: no CUDA device is visible here; use --device cpu (with --smoke for a quick check)')
    return config


# --- measuring ----------------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str):
    if precision == 'bf16':
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _resident_bytes(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> int:
    """Weights, buffers and optimizer state: what a model keeps between steps."""
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    if optimizer is not None:
        for state in optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    return total


class _CpuPeakRss:
    """Peak resident memory of this process during a block, on Linux by resetting the kernel's high-water mark
    (/proc/self/clear_refs), elsewhere by sampling with psutil."""

    def __init__(self):
        self._libc = None
        try:
            self._libc = ctypes.CDLL('libc.so.6')
        except OSError:
            pass
        self.method = 'VmHWM' if self._can_reset() else 'psutil sampling'

    @staticmethod
    def _can_reset() -> bool:
        try:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')
            return True
        except OSError:
            return False

    @staticmethod
    def _status(key: str) -> int:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(key + ':'):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f'{key} not in /proc/self/status')

    @staticmethod
    def _rss() -> int:
        import psutil
        return psutil.Process().memory_info().rss

    def measure(self, fn: Callable[[], None]) -> Tuple[int, int]:
        """(resident bytes before, peak resident bytes during `fn`)."""
        gc.collect()
        if self._libc is not None and hasattr(self._libc, 'malloc_trim'):
            self._libc.malloc_trim(0)  # hand freed memory back, so the peak is this step's and not a leftover
        if self.method == 'VmHWM':
            self._can_reset()
            before = self._status('VmRSS')
            fn()
            return before, self._status('VmHWM')
        before = peak = self._rss()
        done = threading.Event()

        def sample():
            nonlocal peak
            while not done.is_set():
                peak = max(peak, self._rss())
                time.sleep(0.002)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            fn()
        finally:
            done.set()
            sampler.join()
        return before, max(peak, self._rss())


@dataclass
class Entry:
    """One model in one run: what is timed and what was measured."""
    name: str
    kind: str  # 'ours' or 'peer' or 'gemm'
    slow_paths: Tuple[str, ...] = ()
    macs_all: int = 0
    macs_layers: int = 0
    flops_per_step: float = 0.
    images_per_step: int = 0
    first_call_s: float = 0.
    times_s: List[float] = field(default_factory=list)  # per step, one value per round
    # models: seconds of one step of their precision's GEMM around each timed step (mean of just before and after)
    peak_times_s: List[float] = field(default_factory=list)
    resident_bytes: int = 0
    step_peak_bytes: int = 0  # transient peak of one step above what was allocated before it
    process_peak_bytes: int = 0
    # gemm: seconds of one n^3 product by each library, at set-up (best of 5) and then once at the start of each round
    library_times_s: Dict[str, List[float]] = field(default_factory=dict)
    library_products: Dict[str, Callable[[], Any]] = field(default_factory=dict, repr=False)
    # gemm: libraries left out of its timing, with their time over the fastest one's at the probe size
    libraries_left_out: Dict[str, float] = field(default_factory=dict)
    product_flops: float = 0.
    library: str = ''  # gemm: the library whose product is the peak
    step: Optional[Callable[[], None]] = field(default=None, repr=False)
    model: Optional[nn.Module] = field(default=None, repr=False)
    optimizer: Optional[torch.optim.Optimizer] = field(default=None, repr=False)

    @property
    def label(self) -> str:
        if not self.slow_paths:
            return self.name
        off = 'plain' if set(self.slow_paths) == set(CPU_KERNELS) else '-' + ',-'.join(self.slow_paths)
        return f'{self.name} [{off}]'


def _seconds(fn: Callable[[], Any], device: torch.device, iters: int = 1) -> float:
    """Seconds per call of `iters` calls of `fn`, the device synchronised before and after."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def _gemm_libraries(device: torch.device, a: torch.Tensor, b: torch.Tensor) -> Dict[str, Callable[[], Any]]:
    """The n^3 products this PyTorch can run: `torch.mm` (MKL or OpenBLAS on CPU, cuBLAS on CUDA); `F.linear`, the
    same library with `b` stored transposed as a Linear layer keeps its weight (in bf16 on an AVX2-only CPU, where
    no library has bf16 products, PyTorch's own loops run 14x faster in that layout); and, on CPU, oneDNN's where it
    has products of `a`'s dtype here (its bf16 ones need AVX-512), which the `onednn_linear` CPU kernel uses and
    which on AMD CPUs with AVX-512 is much faster than MKL's."""
    weight = b.t().contiguous()  # linear(a, W) = a @ W^T = a @ b
    libraries: Dict[str, Callable[[], Any]] = {'torch.mm': lambda: torch.mm(a, b),
                                               'F.linear': lambda: F.linear(a, weight)}
    if device.type == 'cpu' and onednn_available(a.dtype):
        libraries['oneDNN'] = lambda: fused_linear(a, weight)
    return libraries


PROBE_SIZE = 512  # side of the square product that finds which GEMM libraries are worth timing at full size
TOO_SLOW = 4.  # a library this many times slower than the fastest at the probe is left out of the peak's timing


def _probe_libraries(device: torch.device, dtype: torch.dtype, n: int) -> Dict[str, float]:
    """Per library: seconds of an `n`-sided product over the fastest library's, each timed after a set-up call."""
    g = torch.Generator(device='cpu').manual_seed(1)
    a, b = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))
    libraries = _gemm_libraries(device, a, b)
    seconds = {}
    for name, product in libraries.items():
        _seconds(product, device)  # first call: library set-up
        seconds[name] = _seconds(product, device)
    fastest = max(min(seconds.values()), 1e-9)
    return {name: t / fastest for name, t in seconds.items()}


def _matmul_entry(device: torch.device, precision: str, n: int, min_seconds: float) -> Entry:
    """The peak: an n^3 GEMM by the fastest library here, repeated so that one step lasts about `min_seconds`.

    A single product (90 ms for n=2048 on 2 cores) samples the machine at one moment; a sample as long as a model's
    averages the same speed changes a model step sees, so that per-round MFU compares like with like. Every library
    is timed first (interleaved, best of 5): the peak is the fastest one's, so that no model can beat the "peak" by
    calling a faster library than the GEMM did. Where there are several, each round also times one product of each,
    for MFU against the slower ones. A library `TOO_SLOW` times slower than the fastest on a small probe product is
    left out (bf16 `torch.mm` on an AVX2-only CPU took a minute a product at n=2048) and listed in the JSON.
    """
    dtype = torch.bfloat16 if precision == 'bf16' else torch.float32
    probe = _probe_libraries(device, dtype, min(n, PROBE_SIZE))
    g = torch.Generator(device='cpu').manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    libraries = {name: product for name, product in _gemm_libraries(device, a, b).items()
                 if probe[name] <= TOO_SLOW}
    for product in libraries.values():
        _seconds(product, device)  # first call: library set-up
    best = {name: math.inf for name in libraries}
    for _ in range(5):
        for name, product in libraries.items():
            best[name] = min(best[name], _seconds(product, device))
    fastest = min(best, key=best.get)
    product = libraries[fastest]
    repeats = max(1, math.ceil(min_seconds / max(best[fastest], 1e-6)))

    def step():
        for _ in range(repeats):
            product()

    entry = Entry(name=f'gemm {n}x{n}x{n} {precision} {fastest} x{repeats}', kind='gemm',
                  flops_per_step=2. * n ** 3 * repeats, step=step, product_flops=2. * n ** 3, library=fastest)
    entry.library_times_s = {name: [seconds] for name, seconds in best.items()}
    entry.libraries_left_out = {name: ratio for name, ratio in probe.items() if ratio > TOO_SLOW}
    if len(libraries) > 1:
        entry.library_products = libraries
    return entry


def _library_ratios(gemm: Entry) -> Dict[str, float]:
    """Per library: seconds of its product over the peak library's, median over the samples taken side by side."""
    times = gemm.library_times_s
    return {name: statistics.median(t / f for t, f in zip(samples, times[gemm.library]))
            for name, samples in times.items()}


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    params = list(model.parameters())
    try:
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device or torch
        return torch.optim.AdamW(params, lr=1e-4, foreach=True)


def _model_entry(name: str, kind: str, run: Run, config: BenchConfig, device: torch.device,
                 complexity: ComplexityRow, base: nn.Module, slow_paths: Tuple[str, ...] = ()) -> Entry:
    """A copy of `base` on `device` and the step that a round times. Our models on CPU take the CPU kernels
    (`t2tvit.use_cpu_kernels`) but `slow_paths`; with all of them left out, the plain model runs."""
    model = copy.deepcopy(base)
    if kind == 'ours' and device.type == 'cpu' and set(slow_paths) != set(CPU_KERNELS):
        use_cpu_kernels(model, exclude=slow_paths)
    model.to(device)
    g = torch.Generator(device='cpu').manual_seed(0)
    in_chans = getattr(model, 'in_chans', 3)
    x = torch.randn(config.batch_size, in_chans, config.img_size, config.img_size, generator=g).to(device)
    y = torch.randint(0, max(1, getattr(model, 'num_classes', 1000)), (config.batch_size,), generator=g).to(device)
    fn = torch.compile(model) if run.compile == 'compiled' else model
    optimizer = None
    if run.mode == 'infer':
        model.eval()

        def step():
            with torch.no_grad(), _autocast(device, run.precision):
                fn(x)
    else:
        model.train()
        optimizer = _adamw(model)

        def step():
            with _autocast(device, run.precision):
                loss = F.cross_entropy(fn(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    factor = TRAIN_STEP_FACTOR if run.mode == 'train' else 1
    return Entry(
        name=name, kind=kind, slow_paths=slow_paths, macs_all=complexity.macs_all,
        macs_layers=complexity.macs_layers, flops_per_step=2. * complexity.macs_all * factor * config.batch_size,
        images_per_step=config.batch_size, step=step, model=model, optimizer=optimizer)


def _build(name: str, config: BenchConfig) -> nn.Module:
    torch.manual_seed(0)
    model = create_at_size(name, config.img_size)
    path = config.checkpoints.get(name)
    if path:
        if name in set(list_variants()):
            load_checkpoint(model, path)
        else:
            timm.models.load_checkpoint(model, path)
    return model


def _time_rounds(pairs: List[Tuple[Entry, Entry]], config: BenchConfig, device: torch.device) -> None:
    """Each round times every model once, between two steps of the GEMM of its precision; the order rotates so
    that no model always follows the same one.

    The GEMM just before and just after a model step sees the same machine as the step does, so MFU stays a
    like-for-like ratio on a machine whose speed drifts (shared or frequency-scaled cores).
    """
    gemms = list({id(gemm): gemm for _, gemm in pairs}.values())
    for r in range(config.reps):
        for gemm in gemms:  # one product of each library, side by side: their speed ratio at this moment
            for name, product in gemm.library_products.items():
                gemm.library_times_s[name].append(_seconds(product, device))
        shift = r % len(pairs)
        for entry, gemm in pairs[shift:] + pairs[:shift]:
            before = _seconds(gemm.step, device)
            entry.times_s.append(_seconds(entry.step, device, config.iters))
            after = _seconds(gemm.step, device)
            gemm.times_s += [before, after]
            entry.peak_times_s.append((before + after) / 2)


def _measure_memory(entry: Entry, device: torch.device, rss: Optional[_CpuPeakRss]) -> None:
    entry.resident_bytes = _resident_bytes(entry.model, entry.optimizer)
    if device.type == 'cuda':
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        entry.step()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        before, peak = rss.measure(entry.step)
        entry.process_peak_bytes = peak
    entry.step_peak_bytes = max(0, peak - before)


def _per_round(numerator: Entry, denominator: Entry) -> float:
    """Median over rounds of denominator time / numerator time: how many times faster `numerator` ran."""
    return statistics.median(d / n for n, d in zip(numerator.times_s, denominator.times_s))


def _summarise(entry: Entry, reference: Optional[Entry], gemm: Entry) -> Dict[str, Any]:
    result: Dict[str, Any] = dict(
        name=entry.name, label=entry.label, kind=entry.kind, slow_paths=list(entry.slow_paths),
        times_s=entry.times_s, first_call_s=entry.first_call_s)
    if entry.kind == 'gemm':
        flops = [entry.flops_per_step / t for t in entry.times_s]
        result.update(flops_per_s=statistics.median(flops), flops_per_s_min=min(flops), flops_per_s_max=max(flops),
                      libraries_flops_per_s={name: entry.product_flops / statistics.median(times)
                                             for name, times in entry.library_times_s.items()},
                      library=entry.library, libraries_time_ratio=_library_ratios(entry),
                      libraries_left_out=entry.libraries_left_out)
        return result
    rates = [entry.images_per_step / t for t in entry.times_s]
    peak = [gemm.flops_per_step / t for t in entry.peak_times_s]  # the GEMM around each of this model's steps
    model_flops = [entry.flops_per_step / t for t in entry.times_s]
    mfu = statistics.median(f / p for f, p in zip(model_flops, peak))  # per round, against the GEMM around the step
    result.update(
        macs_all=entry.macs_all, macs_layers=entry.macs_layers, flops_per_step=entry.flops_per_step,
        images_per_s=statistics.median(rates), images_per_s_min=min(rates), images_per_s_max=max(rates),
        mfu=mfu,
        # against each library's GEMM: scaled by how much slower its product ran than the peak's, side by side
        mfu_by_library={name: mfu * ratio for name, ratio in _library_ratios(gemm).items()},
        resident_bytes=entry.resident_bytes, step_peak_bytes=entry.step_peak_bytes,
        peak_bytes=entry.resident_bytes + entry.step_peak_bytes,
    )
    if entry.process_peak_bytes:
        result['process_peak_rss_bytes'] = entry.process_peak_bytes
    if reference is not None:
        result['x_reference'] = _per_round(entry, reference)
    return result


def _entries(run: Run, config: BenchConfig, device: torch.device,
             complexity: Dict[str, ComplexityRow]) -> List[Entry]:
    names = [(n, 'ours') for n in config.models] + [(n, 'peer') for n in config.peers]
    if run.mode == 'train' and config.train_models is not None:
        names = [(n, k) for n, k in names if n in config.train_models]
    entries: List[Entry] = []
    for name, kind in names:
        base = _build(name, config)
        entries.append(_model_entry(name, kind, run, config, device, complexity[name], base))
        if kind == 'ours' and config.ab:
            entries.append(_model_entry(name, kind, run, config, device, complexity[name], base,
                                        slow_paths=tuple(config.ab)))
    return entries


def _run_group(runs: List[Run], config: BenchConfig, device: torch.device, complexity: Dict[str, ComplexityRow],
               rss: Optional[_CpuPeakRss], log: Callable[[str], None]) -> List[Dict[str, Any]]:
    """Time runs that differ only in precision in the same rounds, so that bf16 over fp32 is side by side too."""
    started = time.perf_counter()
    gemm_seconds = 0. if config.smoke else 0.05 if device.type == 'cuda' else 0.2
    timed = [(run, _entries(run, config, device, complexity),
              _matmul_entry(device, run.precision, config.peak_size, gemm_seconds)) for run in runs]
    for run, entries, gemm in timed:
        for entry in entries + [gemm]:
            entry.first_call_s = _seconds(entry.step, device)
            for _ in range(config.warmup - 1):
                entry.step()
            log(f'  {run.label}: {entry.label} ready (first call {entry.first_call_s:.1f} s)')
        for entry in entries:
            _measure_memory(entry, device, rss)
    _time_rounds([(e, gemm) for _, entries, gemm in timed for e in entries], config, device)
    seconds = time.perf_counter() - started
    fp32 = {e.label: e for run, entries, _ in timed if run.precision == 'fp32' for e in entries}
    results = []
    for run, entries, gemm in timed:
        reference = next((e for e in entries if e.name == (config.reference or DEFAULT_REFERENCE)
                          and not e.slow_paths), None)
        rows = [_summarise(e, reference, gemm) for e in entries]
        for entry, row in zip(entries, rows):
            if entry.slow_paths:  # the B copy against its own A, round by round
                row['x_fast'] = _per_round(next(e for e in entries if e.name == entry.name and not e.slow_paths),
                                           entry)
            if run.precision == 'bf16' and entry.label in fp32:
                row['x_fp32'] = _per_round(entry, fp32[entry.label])
        results.append(dict(
            run=run.label, mode=run.mode, precision=run.precision, compile=run.compile,
            peak=_summarise(gemm, None, gemm), models=rows, reference=reference.name if reference else None,
            timed_with=[r.label for r in runs], seconds=seconds))
    return results


# --- bf16 agreement -----------------------------------------------------------------------------------------------

def _agreement_images(n: int, size: int, in_chans: int, seed: int = 0) -> torch.Tensor:
    """Smooth random patterns at several scales with per-image contrast and offset: more varied than white noise,
    so that even randomly initialised models predict more than one class."""
    g = torch.Generator().manual_seed(seed)
    images = []
    for _ in range(n):
        cells = int(torch.randint(2, 33, (1,), generator=g))
        base = torch.randn(1, in_chans, cells, cells, generator=g)
        image = F.interpolate(base, size=(size, size), mode='bicubic', align_corners=False)
        contrast, offset = 2 * torch.rand(1, in_chans, 1, 1, generator=g), torch.randn(1, in_chans, 1, 1, generator=g)
        images.append(image * contrast + offset)
    return torch.cat(images)


def bf16_agreement(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> Dict[str, Any]:
    """Top-1 of bf16 autocast against fp32 on the same images, with what makes the figure meaningful or not."""
    model.eval().to(device)
    fp32, bf16 = [], []
    with torch.no_grad():
        for chunk in images.split(batch_size):
            chunk = chunk.to(device)
            fp32.append(model(chunk).float().cpu())
            with torch.autocast(device.type, dtype=torch.bfloat16):
                bf16.append(model(chunk).float().cpu())
    fp32_logits, bf16_logits = torch.cat(fp32), torch.cat(bf16)
    top2 = fp32_logits.topk(2, dim=1).values
    return dict(
        images=len(images),
        top1_agreement=(fp32_logits.argmax(1) == bf16_logits.argmax(1)).float().mean().item(),
        fp32_classes_predicted=fp32_logits.argmax(1).unique().numel(),
        median_top1_margin=(top2[:, 0] - top2[:, 1]).median().item(),
        max_abs_logit_diff=(fp32_logits - bf16_logits).abs().max().item(),
        cosine=F.cosine_similarity(fp32_logits, bf16_logits, dim=1).mean().item(),
    )


# --- the whole benchmark ------------------------------------------------------------------------------------------

def _slug(text: str) -> str:
    return re.sub(r'[^a-z0-9]+', '-', text.lower()).strip('-')


def _cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f'{_cpu_name()}, {torch.get_num_threads()} threads'


def environment(device: torch.device) -> Dict[str, Any]:
    from .. import __version__
    env = dict(
        date=datetime.datetime.now().isoformat(timespec='seconds'), device=device_name(device),
        device_type=device.type, host=platform.node(), python=platform.python_version(), torch=torch.__version__,
        timm=timm.__version__, t2tvit=__version__, threads=torch.get_num_threads(), command=' '.join(sys.argv),
        load_average=os.getloadavg() if hasattr(os, 'getloadavg') else None,
        # what else decides CPU speed: the allocator (MALLOC_*, LD_PRELOAD) and OpenMP threads
        env={k: v for k, v in os.environ.items()
             if k.startswith(('MALLOC_', 'GLIBC_TUNABLES', 'OMP_', 'MKL_', 'KMP_', 'LD_PRELOAD', KEEP_HEAP_ENV))},
        heap=heap_state() if device.type == 'cpu' else None,  # freed memory kept for reuse, for every model timed
        cpu_kernels=host_kernel_plan() if device.type == 'cpu' else None,  # which CPU kernels our models took, why
    )
    if device.type == 'cuda':
        env.update(cuda=torch.version.cuda, tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    return env


def _results_stem(config: 'BenchConfig', device: torch.device, log: Callable[[str], None]) -> str:
    """The results' file name without suffix: --name, or DEVICE-DATE. An earlier result is never replaced: STEM-1,
    STEM-2, ... when STEM.json or STEM.png exists (a second run on the same day); the names are claimed."""
    stem = config.stem or (f'{_slug(device_name(device).split(",")[0])}-{datetime.date.today().isoformat()}'
                           + ('-smoke' if config.smoke else ''))
    if not config.output:
        return stem
    free = free_stem(config.output, stem, ('.json', '.png'))
    if free != stem:
        log(f'{Path(config.output) / stem}.json or .png exists already: this run writes {free}.json')
    claim_all([Path(config.output) / f'{free}{suffix}' for suffix in ('.json', '.png')])
    return free


def _set_up(config: BenchConfig) -> torch.device:
    """Threads, cuDNN autotuning and, for compiled runs, room for every model's graph in dynamo's caches."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    if any(r.compile == 'compiled' for r in config.runs):
        # every model (and each A/B copy) is a new graph of the same forward code; keep them all compiled
        dynamo = torch._dynamo.config
        for name, least in (('recompile_limit', 64), ('cache_size_limit', 64),
                            ('accumulated_recompile_limit', 512), ('accumulated_cache_size_limit', 512)):
            if hasattr(dynamo, name):
                setattr(dynamo, name, max(getattr(dynamo, name), least))
    return device


def _new_result(config: BenchConfig, device: torch.device, rss: Optional[_CpuPeakRss]) -> Dict[str, Any]:
    return dict(
        environment=environment(device),
        config=dict(asdict(config), runs=[r.label for r in config.runs],
                    output=str(config.output) if config.output else None),
        conventions=dict(
            macs_layers='(a) Linear/conv layers only: matrix products with a trainable weight (fvcore, mmpretrain)',
            macs_all='(b) every matrix product, attention and Performer ones included (the paper)',
            mfu='model FLOPs per second / FLOPs per second of the GEMM timed just before and after the same step '
                '(mean), median over rounds; model FLOPs = 2 x MACs (b) per image, x3 for a training step',
            peak_bytes=('CUDA max allocated' if device.type == 'cuda' else 'peak RSS (VmHWM) growth') +
                       ' during one step + the model\'s weights, buffers and optimizer state'),
        memory_method='torch.cuda.max_memory_allocated' if rss is None else rss.method,
        runs=[], agreement={}, variants=[])


_LEGEND = (
    'GMACs: convention (b), every matrix product (the paper\'s). MFU = model FLOPs (2 x GMACs, x3 for a training '
    'step) per second / FLOPs per second of the GEMM timed just before and after each step, by the fastest GEMM '
    'library here (MFU LIBRARY: against a slower library\'s GEMM instead). x ref = images/s over the '
    'reference model\'s, median of per-round ratios; off/on = images/s with the listed CPU kernels off over with '
    'them on (A/B copies). peak MiB = memory growth during one step + weights, buffers and optimizer state.\n')


def _torch_runs(config: BenchConfig, device: torch.device, complexity: Dict[str, ComplexityRow],
                rss: Optional[_CpuPeakRss], result: Dict[str, Any], log: Callable[[str], None],
                save: Callable[[], None]) -> None:
    """Every fp32/bf16 run, grouped by mode and compilation so that precisions share their rounds."""
    groups: Dict[Tuple[str, str], List[Run]] = {}
    for run in config.runs:
        if run.precision != 'int8':
            groups.setdefault((run.mode, run.compile), []).append(run)
    for (mode, compile_), runs in groups.items():
        log(f'runs {", ".join(r.label for r in runs)}: batch {config.batch_size}, {config.img_size} px, '
            f'{config.reps} rounds x {config.iters} steps')
        emulated = next(filter(None, (emulated_bf16_warning(r.precision, device) for r in runs)), None)
        if emulated:
            log(emulated)
        for run_result in _run_group(runs, config, device, complexity, rss, log):
            result['runs'].append(run_result)
            log(format_run(run_result))
            log('')
        gc.collect()
        if device.type == 'cuda':
            torch.cuda.empty_cache()
        if compile_ == 'compiled':
            torch._dynamo.reset()
        save()


def _int8_run(config: BenchConfig, result: Dict[str, Any], log: Callable[[str], None]) -> None:
    """infer:int8: fp32 and int8 latency of every model in ONNX Runtime and OpenVINO, batch 1 and 16."""
    from .int8_benchmark import format_int8, int8_latency
    names = [(n, 'ours') for n in config.models] + [(n, 'peer') for n in config.peers]
    threads = config.threads or torch.get_num_threads()
    calibration = 8 * max(1, min(4, (config.agreement_images or 32) // 8))  # whole batches of 8 (quantize_onnx)
    result['int8'] = int8_latency(
        names, lambda name: _build(name, config), config.img_size,
        lambda in_chans: _agreement_images(calibration, config.img_size, in_chans), threads, config.reps, log,
        batch_iters={1: 1, 16: 1} if config.smoke else None)
    log(format_int8(result['int8']))
    log('')


def run_benchmark(config: BenchConfig, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Time every run of `config`, write JSON (after each run) and a PNG, and return the results."""
    validate(config)
    device = _set_up(config)
    if device.type == 'cpu':
        keep_heap_pages()  # as `t2tvit` commands do on CPU; the same for every model timed
    rss = _CpuPeakRss() if device.type == 'cpu' else None
    result = _new_result(config, device, rss)
    stem = _results_stem(config, device, log)
    json_path = Path(config.output) / f'{stem}.json' if config.output else None

    def save() -> None:
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(result, indent=1, default=str).encode()
            atomic_write(json_path, lambda f: f.write(text), what='benchmark results')

    log(f'device: {result["environment"]["device"]}; torch {torch.__version__}, timm {timm.__version__}')
    heap = result['environment']['heap']
    if heap and heap['kept']:
        log(f'heap: freed memory kept for reuse (glibc: mmap threshold {heap["mmap_threshold"] >> 20} MiB, '
            f'trim threshold {heap["trim_threshold"] >> 20} MiB)')
    elif heap:
        log(f'heap: the allocator\'s own thresholds ({heap["why"]})')
    if config.variants_table:
        rows = complexity_rows()
        result['variants'] = [r.to_dict() for r in rows]
        log(format_complexity_table(rows))
        log('')
    names = list(config.models) + list(config.peers)
    complexity = {n: model_complexity(n, config.img_size) for n in names}
    result['complexity'] = {n: c.to_dict() for n, c in complexity.items()}
    if any(r.precision != 'int8' for r in config.runs):
        log(_LEGEND)
    _torch_runs(config, device, complexity, rss, result, log, save)
    if any(r.precision == 'int8' for r in config.runs):
        _int8_run(config, result, log)
        save()
    if config.agreement_images and any(r.mode == 'infer' and r.precision == 'bf16' for r in config.runs):
        for name in names:
            model = _build(name, config)
            images = _agreement_images(config.agreement_images, config.img_size, getattr(model, 'in_chans', 3))
            result['agreement'][name] = bf16_agreement(model, images, config.batch_size, device)
            del model
        log(format_agreement(result['agreement'], bool(config.checkpoints)))
        save()
    summary = format_summary(result)
    if summary:
        log(summary)
    if json_path is not None:
        if config.plot and result['runs']:
            result['plot'] = str(plot_results(result, json_path.with_suffix('.png')))
        save()
        log(f'wrote {json_path}' + (f' and {result["plot"]}' if result.get('plot') else ''))
    return result


# --- output -------------------------------------------------------------------------------------------------------

def _mib(n: Optional[int]) -> str:
    return f'{n / 2 ** 20:,.0f}' if n else '-'


def _other_libraries(peak: Dict[str, Any]) -> List[str]:
    """GEMM libraries slower than the one the peak was timed with (their MFU is printed too)."""
    return [name for name in peak.get('libraries_time_ratio') or {} if name != peak.get('library')]


def format_run(run: Dict[str, Any]) -> str:
    peak = run['peak']
    ref = run.get('reference')
    others = _other_libraries(peak)
    header = (f"{'model':<34}{'GMACs':>7}{'img/s':>9}{'min..max':>15}{'x ref':>18}"
              f"{'MFU':>7}" + ''.join(f'{"MFU " + name:>13}' for name in others) +
              f"{'peak MiB':>10}{'1st call s':>11}")
    rates = peak.get('libraries_flops_per_s') or {}
    speeds = ', '.join(f'{name} {rate / 1e9:,.0f}' for name, rate in rates.items())
    lines = [f"{run['run']}  (GEMM peak {peak['flops_per_s'] / 1e9:,.0f} GFLOP/s, "
             f"{peak['flops_per_s_min'] / 1e9:,.0f}..{peak['flops_per_s_max'] / 1e9:,.0f} over the rounds"
             + (f' by {peak["library"]}; one product each round: {speeds}' if len(rates) > 1 else '')
             + f"; ref = {ref or 'none'})",
             header, '-' * len(header)]
    for m in run['models']:
        ratio = m.get('x_fast')
        ratio_text = f"{m['x_reference']:.2f}" if 'x_reference' in m else '-'
        if ratio is not None:
            ratio_text += f' (off/on {1 / ratio:.2f})'  # images/s with the CPU kernels off over on
        by_library = m.get('mfu_by_library') or {}
        lines.append(
            f"{m['label'][:33]:<34}{m['macs_all'] / 1e9:>7.2f}{m['images_per_s']:>9.1f}"
            f"{m['images_per_s_min']:>7.1f}..{m['images_per_s_max']:<6.1f}{ratio_text:>18}{m['mfu']:>7.1%}"
            + ''.join(f'{by_library[name]:>13.1%}' if name in by_library else f'{"-":>13}' for name in others) +
            f"{_mib(m['peak_bytes']):>10}{m['first_call_s']:>11.1f}")
    return '\n'.join(lines)


def format_agreement(agreement: Dict[str, Dict[str, Any]], with_weights: bool) -> str:
    header = (f"{'bf16 autocast vs fp32':<26}{'images':>7}{'top-1 agree':>12}{'classes':>9}{'margin':>9}"
              f"{'max|dlogit|':>12}{'cosine':>9}")
    lines = [header, '-' * len(header)]
    for name, a in agreement.items():
        lines.append(f"{name:<26}{a['images']:>7}{a['top1_agreement']:>12.1%}{a['fp32_classes_predicted']:>9}"
                     f"{a['median_top1_margin']:>9.3f}{a['max_abs_logit_diff']:>12.4f}{a['cosine']:>9.5f}")
    lines.append('classes: distinct fp32 predictions; margin: median fp32 top-1 minus top-2 logit.')
    if not with_weights:
        lines.append('Random weights: logits differ by little between classes, so agreement is only informative '
                     'where margin >> max|dlogit|; --checkpoint NAME=FILE measures it with trained weights.')
    return '\n'.join(lines)


def format_summary(result: Dict[str, Any]) -> str:
    """bf16 autocast over fp32 images/s, for models timed in both in the same rounds."""
    lines = [f"  {m['label']:<34}{run['mode']}:{run['compile']}  bf16 / fp32 images/s = {m['x_fp32']:.2f}"
             for run in result['runs'] for m in run['models'] if 'x_fp32' in m]
    return ('bf16 autocast speed-up (median of per-round ratios):\n' + '\n'.join(lines)) if lines else ''


def _minor_log_labels(axis) -> Callable[[float, int], str]:
    """Minor log-axis labels: all of them on an axis spanning less than a decade, else only at 2, 3 and 5 times a
    power of ten, so that 0.6 0.7 0.8 0.9 do not collide."""
    def label(value: float, _position: int) -> str:
        low, high = sorted(axis.get_view_interval())
        if value <= 0 or low <= 0:
            return ''
        if high / low < 10:
            return f'{value:.3g}'
        leading = round(value / 10 ** math.floor(math.log10(value) + 1e-9), 6)
        return f'{value:g}' if leading in (2.0, 3.0, 5.0) else ''
    return label


def plot_results(result: Dict[str, Any], out_png: Path) -> Path:
    """Images/s against MACs (paper convention), one panel per run; ours as circles, peers as squares."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, FuncFormatter

    runs = result['runs']
    fig, axes = plt.subplots(1, max(1, len(runs)), figsize=(5 * max(1, len(runs)), 4.5), squeeze=False)
    for ax, run in zip(axes[0], runs):
        for m in run['models']:
            marker = 'o' if m['kind'] == 'ours' else 's'
            color = 'tab:blue' if m['kind'] == 'ours' else 'tab:gray'
            face = 'none' if m['slow_paths'] else color
            ax.scatter(m['macs_all'] / 1e9, m['images_per_s'], marker=marker, edgecolors=color, facecolors=face,
                       s=50)
            ax.errorbar(m['macs_all'] / 1e9, m['images_per_s'], fmt='none', ecolor=color,
                        yerr=[[m['images_per_s'] - m['images_per_s_min']], [m['images_per_s_max'] - m['images_per_s']]])
            ax.annotate(m['label'], (m['macs_all'] / 1e9, m['images_per_s']), fontsize=7,
                        xytext=(4, 3), textcoords='offset points')
        xs = [m['macs_all'] for m in run['models']]
        ys = [v for m in run['models'] for v in (m['images_per_s_min'], m['images_per_s_max'])]
        for axis, values, set_scale in ((ax.xaxis, xs, ax.set_xscale), (ax.yaxis, ys, ax.set_yscale)):
            if values and min(values) > 0 and max(values) / min(values) > 2:  # log only where it spans something
                set_scale('log')
                axis.set_major_formatter(FormatStrFormatter('%g'))
                axis.set_minor_formatter(FuncFormatter(_minor_log_labels(axis)))
        ax.set_xlabel('GMACs per image (paper convention)')
        ax.set_ylabel('images/s')
        ax.set_title(run['run'], fontsize=10)
        ax.grid(True, which='both', alpha=0.3)
    env = result['environment']
    fig.suptitle(f"{env['device']}; batch {result['config']['batch_size']}, {result['config']['img_size']} px; "
                 f"circles: T2T-ViT, squares: timm peers", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def config_from_options(preset: Optional[str] = None, smoke: bool = False, **options: Any) -> BenchConfig:
    """A preset's values, then `--smoke`'s toy sizes, then every option given explicitly (None: not given)."""
    if preset is not None and preset not in PRESETS:
        _fail(f'--preset {preset!r} is not one of {", ".join(PRESETS)}')
    config = BenchConfig(**copy.deepcopy(PRESETS[preset or 'cpu']))
    if smoke:
        config = replace(config, **SMOKE)
    given = {k: v for k, v in options.items() if v is not None}
    if 'runs' in given and isinstance(given['runs'], str):
        given['runs'] = parse_runs(given['runs'])
    if isinstance(given.get('output'), str):
        given['output'] = None if given['output'] == 'none' else Path(given['output'])
    if 'ab' in given and isinstance(given['ab'], str):
        given['ab'] = tuple(CPU_KERNELS) if given['ab'] == 'all' else tuple(
            p.strip() for p in given['ab'].split(',') if p.strip())
    config = replace(config, **given)
    if 'train_models' not in given and config.train_models is not None:
        # the preset's choice, kept for the models still named; all of them when none is left
        kept = [n for n in config.train_models if n in list(config.models) + list(config.peers)]
        config.train_models = kept or None
    return config


def parse_checkpoints(items: Sequence[str]) -> Dict[str, str]:
    checkpoints = {}
    for item in items:
        name, sep, path = item.partition('=')
        if not sep or not name or not path:
            _fail(f'--checkpoint {item!r} is not NAME=FILE, e.g. t2t_vit_14=81.5_T2T_ViT_14.pth.tar')
        checkpoints[name] = path
    return checkpoints
