"""CPU kernels for T2T-ViT: the same numbers as the model's own forward (bit for bit, or within fp32 rounding), faster
on x86 CPUs, applied to a built model on purpose by `use_cpu_kernels(model)`.

The model that `timm.create_model` returns runs one computation whatever runs it (eager, traced, scripted, compiled,
exported, FLOP-counted). This module swaps its layers for subclasses with the same parameters and state-dict keys
whose forward takes a CPU kernel where one applies (on CPU, in eager mode, outside dispatch modes such as the FLOP
counter) and otherwise runs the model's own forward, so a model with these kernels still traces and exports to the
plain computation. Under `torch.compile` on CPU two kinds stay: `compiled_splits`, the soft splits as an op the
graph calls, with the values of the plain model's unfold; and the explicit bf16 attention products (`bf16_cpu_attn`,
`bf16_cpu_attn_train`), plain PyTorch ops that the graph holds instead of the fused kernel. `t2tvit` commands and
`t2tvit benchmark` apply them on CPU unless told not to.

Which kernels a model gets depends on the host (`host_kernel_plan()`): the CPU's flags pick a profile of
`CPU_PROFILES` ('amd-avx512', 'intel-amx', 'generic'), and each profile turns each kernel on or off with a stated
reason. `T2TVIT_CPU_PROFILE=NAME` (or `use_cpu_kernels(model, profile=NAME)`) forces another host's choice, so
tests run every profile's kernels on any machine. `t2tvit benchmark` records the plan in its JSON.

Each kernel, the device and precision it serves, and the test that holds it to the plain forward:

| kernel | serves | what it does | tested by (tests/test_cpu_kernels.py) |
|---|---|---|---|
| strided_unfold | CPU, any dtype, train and eval | soft splits as a strided view of the padded map gathered in one copy (bit for bit `nn.Unfold`); in training the gradient goes back by col2im (`F.fold`) | `test_strided_soft_split_is_unfold_bit_for_bit`, `test_soft_split_gradient_is_unfold_gradient` |
| patch_major | CPU, with strided_unfold | the second soft split gathered (row, column, channel) from the channels-last map, the next layer's LayerNorm affine and first weights permuted to match | `test_kernels_keep_outputs_and_gradients` |
| batch_chunks | CPU eager | the T2T module in batch chunks of about 16k first-stage tokens, so its 3136-token intermediates stay in cache and on reused pages | `test_kernels_keep_outputs_and_gradients`, `test_official.py::test_outputs_equal_official_with_cpu_kernels` (one image per chunk) |
| page_chunks | CPU eager inference (no autograd) | the T2T module in as few batch chunks as keep its first stage's widest tensor under glibc's 32 MiB mmap threshold, so that it is served from reused heap pages, not freshly mapped ones | `test_kernels_keep_outputs_and_gradients`, `test_page_chunks_*`, `test_official.py::test_outputs_equal_official_with_cpu_kernels` |
| split_chunks | CPU bf16 autocast inference | the first soft split and its LayerNorm a few images at a time, each cast into one bf16 tensor for the whole batch's first product: their float32 tensors stay small and in cache | `test_split_chunks_*` |
| compiled_splits | CPU under `torch.compile`, any dtype, train and eval | the T2T module's CPU path with each soft split as the op `t2tvit::soft_split` (the strided gather; col2im backward), so that inductor does not fuse the gather into the LayerNorm after it, whose CPU code then computes every element's index by division | `test_compiled_splits_*` |
| performer_fusion | CPU, fp32 math (also under autocast) | Performer kernel math in fewer passes: the row term as the GEMM's bias, exp in place, the normaliser applied to the m-wide features | `test_kernels_keep_outputs_and_gradients` |
| onednn_linear | CPU fp32 and bf16 autocast inference (bf16 where oneDNN has bf16 products: AVX-512 and later) | Linear products through oneDNN (`torch.ops.mkldnn._linear_pointwise`, faster than MKL on AMD), with the bias, the MLP's GELU and the residual add inside the product | `test_onednn_linear_*` |
| onednn_linear_train | CPU fp32 training, with onednn_linear | the Linear layers' forward and input-gradient products through oneDNN too (the weight gradient stays with MKL); without it fp32 training takes PyTorch's own products (MKL's) | `test_onednn_linear_*`, `test_fp32_training_products_follow_onednn_linear_train` |
| packed_weights | CPU inference with onednn_linear (fp32 and bf16 autocast) | each product's weight cast and reordered once into oneDNN's blocked layout, kept until the weight changes (its version counter) | `test_packed_weights_*` |
| bf16_gelu_apart | CPU bf16 autocast inference, with onednn_linear | the MLP's GELU as its own op on the product's bf16 output, as autocast computes it, rather than as oneDNN's GELU post-op, which is slower in bf16 on an Intel AMX host | `test_bf16_gelu_apart_*` |
| bf16_cpu_attn | CPU bf16 autocast, eager or compiled | the blocks' attention as explicit bf16 products (q k^T, softmax, then v), which beat the fused kernel on AVX-512 BF16 without AMX | `test_bf16_cpu_attention_*` |
| bf16_cpu_attn_train | CPU bf16 autocast with gradients on (training), eager or compiled | the same explicit products only where a backward follows: their backward is a few bf16 products, where the fused kernel's CPU backward was 28% of a T2T-ViT-14 bf16 training step on an Intel AMX host | `test_bf16_cpu_attention_*` |
| short_attn | CPU eager, any dtype, train and eval | the blocks' attention as explicit products when a sequence has at most `SHORT_ATTN_TOKENS` (129) tokens (T2T-ViT up to 176 px), where the fused kernel's work per (image, head) outweighs its products | `test_short_attention_*` |
"""
import copy
import functools
import math
import os
import platform
from typing import Any, ClassVar, Dict, Iterable, List, Optional, Set, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Attention, Block
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import is_in_torch_dispatch_mode
from torch.utils.weak import WeakIdKeyDictionary

from .cpu_heap import keep_heap_pages
from .models.blocks import GhostAttention, SEAttention
from .models.layers import (
    TokenAttention, TokenPerformer, TokenTransformer, attention, performer_attention, token_grid_size)
from .models.t2t_vit import T2TModule
from .errors import InputError

__all__ = ['CPU_KERNELS', 'CPU_PROFILES', 'CPU_PROFILE_ENV', 'CPUKernelError', 'use_cpu_kernels', 'host_kernel_plan',
           'planned_kernels', 'host_cpu', 'detect_profile', 'onednn_available', 'fused_linear', 'packed_weight',
           'soft_split', 'patch_major_order', 'OneDNNLinear']

CPU_KERNELS: Dict[str, str] = {
    'strided_unfold': 'soft splits as a strided view of the padded map and one copy (not im2col + transpose copy); '
                      'F.fold backward in training',
    'patch_major': 'second soft split gathered (row, column, channel) from the channels-last map, the next layer\'s '
                   'first weights permuted to match (with strided_unfold)',
    'batch_chunks': 'T2T module in batch chunks of about 16k first-stage tokens, so that its 3136-token '
                    'intermediates stay in cache and on reused pages',
    'page_chunks': 'in inference, the T2T module in as few batch chunks as keep its first stage\'s widest tensor '
                   'under glibc\'s 32 MiB mmap threshold, so that it reuses heap pages rather than mapping and '
                   'zeroing fresh ones each call',
    'split_chunks': 'under CPU bf16 autocast in inference, the first soft split and its LayerNorm a few images at a '
                    'time, each cast into one bf16 tensor for the whole batch\'s first product, rather than the '
                    'whole batch\'s float32 split and LayerNorm output at once',
    'compiled_splits': 'under torch.compile on CPU, the T2T module\'s CPU path with its soft splits as one op that '
                       'the compiled graph calls (the strided gather; col2im backward), not inductor\'s own gather '
                       'fused into the LayerNorm after it, which indexes element by element',
    'performer_fusion': 'Performer kernel math in fewer passes: row terms as the GEMM bias, exp in place',
    'onednn_linear': 'Linear layers as oneDNN products rather than MKL\'s, which are slower on AMD: in inference '
                     '(fp32 or bf16 autocast) with the bias, the GELU or the fp32 residual add done inside the '
                     'product',
    'onednn_linear_train': 'in fp32 training, the Linear layers\' forward and input-gradient products by oneDNN too '
                           '(with onednn_linear), rather than MKL\'s',
    'packed_weights': 'in inference, each oneDNN product\'s weight cast and reordered once into oneDNN\'s blocked '
                      'layout and kept until the weight changes, not cast and reordered on every call (with '
                      'onednn_linear)',
    'bf16_gelu_apart': 'under CPU bf16 autocast in inference, the MLP\'s GELU as its own op on the bf16 product, '
                       'as autocast computes it, rather than as oneDNN\'s GELU post-op (with onednn_linear)',
    'bf16_cpu_attn': 'under CPU bf16 autocast, the blocks\' attention as explicit bf16 products (q k^T, softmax, '
                     'then v), which beat the fused kernel on AVX-512 BF16 without AMX',
    'bf16_cpu_attn_train': 'the explicit bf16 attention products of bf16_cpu_attn only with gradients on (training), '
                           'where the fused kernel\'s CPU backward is slow',
    'short_attn': 'in eager CPU runs, the blocks\' attention as explicit products (q k^T, softmax, then v) when a '
                  'sequence has at most SHORT_ATTN_TOKENS tokens, where the fused kernel\'s work per image and head '
                  'outweighs its products',
}

# `short_attn`: the longest sequence that takes explicit attention products. On an AVX2-only AMD EPYC they were
# faster at 17-129 tokens and slower in inference at 145 and 197 (docs/speed-log.md, "Short sequences"). T2T-ViT's
# blocks see 122 tokens at 176 px, 145 at 192 and 197 at 224; the 28 px demo model's see 17
SHORT_ATTN_TOKENS = 129

# kernels that are choices within oneDNN's products: without onednn_linear they have nothing to act on
ONEDNN_CHOICES = frozenset({'onednn_linear_train', 'packed_weights', 'bf16_gelu_apart'})


class CPUKernelError(InputError, ValueError):
    """A CPU kernel name that does not exist."""


def _check_names(names: Iterable[str]) -> Tuple[str, ...]:
    names = tuple(names)
    unknown = [n for n in names if n not in CPU_KERNELS]
    if unknown:
        raise CPUKernelError(f'unknown CPU kernels {unknown}; known: {", ".join(CPU_KERNELS)}')
    return names


# --- which kernels this host takes -------------------------------------------------------------------------------

# The environment variable that forces a host profile (e.g. in tests, to run another host's kernel choice here).
CPU_PROFILE_ENV = 'T2TVIT_CPU_PROFILE'

CPU_PROFILES: Dict[str, str] = {
    'amd-avx512': 'AMD CPU with AVX-512 (EPYC Zen 4 and later): the host every kernel was written and measured on',
    'intel-amx': 'Intel Xeon with AMX tiles (Sapphire Rapids and later): bf16 products run on AMX',
    'generic': 'any other CPU: only the kernels whose gain does not come from one instruction set',
}

# the /proc/cpuinfo flags the choice reads
ISA_FLAGS = ('avx2', 'avx512f', 'avx512_bf16', 'avx512_vnni', 'avx_vnni', 'amx_tile', 'amx_bf16', 'amx_int8')

_LAYOUT = 'memory layout and passes only: the same products, so the gain does not depend on the instruction set'
_COMPILED_SPLITS = ('torch.compile only: the eager kernels\' exact gather, where inductor\'s CPU code for the fused '
                    'gather and LayerNorm computes each element\'s index by division, whatever the instruction set')
# profile -> kernel -> (on, why); every kernel of CPU_KERNELS appears in every profile (a test holds it)
_PLANS: Dict[str, Dict[str, Tuple[bool, str]]] = {
    'amd-avx512': {
        'strided_unfold': (True, _LAYOUT),
        'patch_major': (True, _LAYOUT),
        'batch_chunks': (True, 'keeps the T2T module\'s widest intermediates in cache; measured on AMD EPYC'),
        'page_chunks': (False, 'written after the AMD host\'s measurements; batch_chunks (on) already cuts finer'),
        'split_chunks': (False, 'written after the AMD host\'s measurements and not measured there'),
        'compiled_splits': (False, 'written after the AMD host\'s measurements and not measured there'),
        'performer_fusion': (True, _LAYOUT),
        'onednn_linear': (True, 'oneDNN\'s fp32 products beat MKL\'s on AMD, where MKL takes a generic path'),
        'onednn_linear_train': (True, 'measured with onednn_linear on AMD EPYC, fp32 training included: there MKL '
                                      'takes a generic path'),
        'packed_weights': (False, 'written after the AMD host\'s measurements and not measured there; its kernels '
                                  'stay as measured'),
        'bf16_gelu_apart': (False, 'written after the AMD host\'s measurements and not measured there; its kernels '
                                   'stay as measured'),
        'bf16_cpu_attn': (True, 'AVX-512 BF16 without AMX: explicit bf16 products beat the fused SDPA kernel'),
        'bf16_cpu_attn_train': (True, 'adds nothing here: bf16_cpu_attn already takes the explicit products in '
                                      'training as in inference'),
        'short_attn': (False, 'written after the AMD host\'s measurements and not measured there'),
    },
    'intel-amx': {
        'strided_unfold': (True, _LAYOUT),
        'patch_major': (True, _LAYOUT),
        'batch_chunks': (False, 'the chunk size was fitted to the AMD host\'s caches; on a quiet Intel AMX host '
                                'T2T-ViT-14 ran as fast without it in inference (1.03x bf16, 0.99x fp32) and faster '
                                'in training (1.06x fp32, 1.02x bf16) (benchmarks/'
                                'intel-xeon-amx-2026-12-07-batch-chunks-ab*.json)'),
        'page_chunks': (True, 'at batch 16 the first stage\'s fp32 product output (38.5 MB) passes glibc\'s mmap '
                              'threshold; in two chunks fp32 inference ran 1.04x as fast on a quiet Intel AMX host, '
                              'training 0.95x, so it chunks only without autograd (benchmarks/'
                              'intel-xeon-amx-2026-12-06-page-chunks-ab.json)'),
        'split_chunks': (True, 'in bf16 inference the first stage\'s float32 split and LayerNorm output take 29.5 MB '
                               'each at batch 16; a few images at a time, T2T-ViT-14 took 21% less peak memory at the '
                               'same speed within noise (1.01x) on an Intel AMX host (benchmarks/'
                               'intel-xeon-amx-2026-12-06-split-chunks-ab.json)'),
        'compiled_splits': (True, _COMPILED_SPLITS + '; compiled T2T-ViT-14 inference ran 1.04x and 1.08x (fp32), '
                                  '1.10x and 1.21x (bf16) as fast with it in two A/Bs on an Intel AMX host, a '
                                  'training step 0.99x (fp32) and 1.08x (bf16) (benchmarks/'
                                  'intel-xeon-amx-2026-12-07-compiled-splits-ab*.json)'),
        'performer_fusion': (True, _LAYOUT),
        'onednn_linear': (True, 'fuses bias, GELU and residual into the product, and oneDNN runs bf16 on AMX; '
                                'faster than without it on an Intel AMX host too (same A/B)'),
        'onednn_linear_train': (False, 'MKL\'s own fp32 products are native here and faster: a T2T-ViT-14 fp32 '
                                       'training step ran 1.07x and 1.04x as fast with them as with oneDNN\'s in two '
                                       'quiet A/Bs on an Intel AMX host (benchmarks/'
                                       'intel-xeon-amx-2026-12-07-onednn-train-ab*.json)'),
        'packed_weights': (True, 'oneDNN reorders a plain weight on every product; reordered once and kept, T2T-ViT-14 '
                                 'inference ran faster on an Intel AMX host (benchmarks/'
                                 'intel-xeon-amx-2026-12-06-packed-ab.json)'),
        'bf16_gelu_apart': (True, 'oneDNN\'s bf16 GELU post-op added 1.0 ms to a 1.2 ms product, F.gelu after it '
                                  '0.7; T2T-ViT-14 bf16 inference ran 1.015-1.038x as fast with it in three paired '
                                  'runs on an Intel AMX host, 1.01x and 0.98x in two benchmark A/Bs, within their '
                                  'noise (benchmarks/intel-xeon-amx-2026-12-06-gelu-apart-paired.json, '
                                  '-gelu-apart-ab*.json)'),
        'bf16_cpu_attn': (False, 'with AMX the fused SDPA kernel runs its bf16 products on AMX tiles; explicit '
                                 'products did not beat it in inference on an Intel AMX host (same A/B)'),
        'bf16_cpu_attn_train': (True, 'in training the fused kernel\'s CPU backward dominates: explicit products '
                                      'made a T2T-ViT-14 bf16 training step 1.19x as fast on an Intel AMX host '
                                      '(benchmarks/intel-xeon-amx-2026-12-06-quiet-attn-ab.json), and 1.23x under '
                                      'torch.compile (benchmarks/intel-xeon-amx-2026-12-07-compiled-attn-ab.json)'),
        'short_attn': (False, 'measured only on an AVX2-only AMD EPYC; not measured on an Intel AMX host'),
    },
    'generic': {
        'strided_unfold': (True, _LAYOUT),
        'patch_major': (True, _LAYOUT),
        'batch_chunks': (True, 'keeps the T2T module\'s widest intermediates in cache, on any CPU; on an AVX2-only '
                               'AMD EPYC (Zen 3) its fp32 inference forward took 106 ms in chunks against 138 ms '
                               'whole (benchmarks/amd-epyc-avx2-2026-12-07-pieces.json)'),
        'page_chunks': (False, 'batch_chunks (on here) already cuts finer: 110 ms against its 106 on the same host'),
        'split_chunks': (False, 'measured only on an Intel AMX host'),
        'compiled_splits': (True, _COMPILED_SPLITS + '; compiled T2T-ViT-14 ran 1.06x as fast with it in fp32 '
                                  'inference and 1.02x in training, within noise, on an AVX2-only AMD EPYC (benchmarks/'
                                  'amd-epyc-avx2-2026-12-07-compiled-splits-ab.json)'),
        'performer_fusion': (True, _LAYOUT),
        'onednn_linear': (False, 'which of oneDNN and MKL is faster depends on the CPU; the default library is kept: '
                                 'on an AVX2-only AMD EPYC MKL\'s fp32 products beat oneDNN\'s on every product of '
                                 'the blocks (85-87 against 68-75 GMAC/s forward; same pieces file)'),
        'onednn_linear_train': (False, 'a choice within oneDNN\'s products, which onednn_linear (off here) would take'),
        'packed_weights': (False, 'a layout for oneDNN\'s products, which onednn_linear (off here) would take'),
        'bf16_gelu_apart': (False, 'a choice within oneDNN\'s products, which onednn_linear (off here) would take'),
        'bf16_cpu_attn': (False, 'explicit bf16 products pay only with AVX-512 BF16 and no AMX; SDPA is kept'),
        'bf16_cpu_attn_train': (False, 'measured only on AVX-512 BF16 and AMX hosts; SDPA is kept'),
        'short_attn': (True, 'on an AVX2-only AMD EPYC (Zen 3), fp32, explicit products ran 1.03-2.78x as fast as '
                             'the fused kernel in inference and 1.15-2.34x in training at 17-129 tokens, and 0.81-0.97x '
                             'in inference at 145; the demo\'s training step (17 tokens) 1.12x as fast '
                             '(benchmarks/amd-epyc-avx2-2026-12-07-short-attn.json)'),
    },
}


def host_cpu(cpuinfo: str = '/proc/cpuinfo') -> Dict[str, Any]:
    """This CPU as the kernel choice sees it: vendor, model name, which of `ISA_FLAGS` it has, and PyTorch's own
    reading of it (`torch.backends.cpu.get_cpu_capability()`, e.g. 'AVX512')."""
    return copy.deepcopy(_read_cpu(cpuinfo))


@functools.lru_cache(maxsize=4)
def _read_cpu(cpuinfo: str) -> Dict[str, Any]:
    fields: Dict[str, str] = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(':')
                key = key.strip()
                if key in ('vendor_id', 'model name', 'flags') and key not in fields:
                    fields[key] = value.strip()
                if len(fields) == 3:
                    break
    except OSError:  # not Linux: no flags, so the generic profile
        pass
    flags = set(fields.get('flags', '').split())
    return dict(vendor=fields.get('vendor_id', platform.machine()),
                model=fields.get('model name', platform.processor()), flags=[f for f in ISA_FLAGS if f in flags],
                torch_capability=torch.backends.cpu.get_cpu_capability())


def detect_profile(cpu: Dict[str, Any]) -> str:
    """The profile of a `host_cpu` reading: AMX (amx_bf16) -> 'intel-amx'; an AMD CPU with AVX-512 ->
    'amd-avx512'; anything else -> 'generic'."""
    flags = set(cpu['flags'])
    if 'amx_bf16' in flags and 'amx_tile' in flags:
        return 'intel-amx'
    if cpu['vendor'] == 'AuthenticAMD' and 'avx512f' in flags:
        return 'amd-avx512'
    return 'generic'


def _profile(profile: Optional[str], cpu: Dict[str, Any]) -> Tuple[str, str]:
    """(profile, where it came from): the argument, else `T2TVIT_CPU_PROFILE`, else this host's flags."""
    source = 'argument'
    if profile is None:
        profile, source = os.environ.get(CPU_PROFILE_ENV) or None, CPU_PROFILE_ENV
    if profile is None:
        return detect_profile(cpu), 'detected from the CPU flags'
    if profile not in CPU_PROFILES:
        raise CPUKernelError(f'CPU profile {profile!r} ({source}) is not one of {", ".join(CPU_PROFILES)}')
    return profile, source


def host_kernel_plan(profile: Optional[str] = None) -> Dict[str, Any]:
    """Which CPU kernels `use_cpu_kernels(model)` gives a model on this host, and why, as a JSON-able dict.

    `profile` (or the environment variable `T2TVIT_CPU_PROFILE`) forces one of `CPU_PROFILES`; by default the host's
    flags decide (`detect_profile`). `onednn_linear` is off wherever this PyTorch has no oneDNN fused linear.
    """
    cpu = host_cpu()
    name, source = _profile(profile, cpu)
    kernels = {kernel: dict(on=on, reason=reason) for kernel, (on, reason) in _PLANS[name].items()}
    if kernels['onednn_linear']['on'] and not _ONEDNN_LINEAR:
        kernels['onednn_linear'] = dict(on=False, reason='this PyTorch has no oneDNN fused linear')
    return dict(profile=name, profile_source=source, cpu=cpu, kernels=kernels)


def planned_kernels(profile: Optional[str] = None) -> Tuple[str, ...]:
    """The names `host_kernel_plan(profile)` turns on."""
    return tuple(k for k, choice in host_kernel_plan(profile)['kernels'].items() if choice['on'])


# --- when a kernel may run ----------------------------------------------------------------------------------------

def _eager_cpu(x: torch.Tensor) -> bool:
    """`x` is on CPU in plain eager mode: not traced, scripted, compiled or under a dispatch mode (FLOP counter)."""
    return (x.device.type == 'cpu' and not torch.jit.is_tracing() and not torch.jit.is_scripting()
            and not torch.compiler.is_compiling() and not is_in_torch_dispatch_mode())


def _compiling() -> bool:
    """Under `torch.compile` (not `torch.export`, whose graph holds the plain computation)."""
    return torch.compiler.is_compiling() and not torch.compiler.is_exporting()


def _compiled_cpu(x: torch.Tensor) -> bool:
    """`x` is on CPU under `torch.compile`."""
    return x.device.type == 'cpu' and _compiling()


def _has_onednn_linear() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, '_linear_pointwise')
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


_ONEDNN_LINEAR = _has_onednn_linear()


def _has_onednn_bf16() -> bool:
    try:
        return _ONEDNN_LINEAR and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


_ONEDNN_BF16 = _has_onednn_bf16()


def onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this PyTorch has oneDNN's fused linear product (x86 and Arm wheels do) for `dtype` on this CPU: its
    bf16 products need AVX-512 (oneDNN has none for AVX2-only CPUs such as AMD EPYC Zen 3)."""
    return _ONEDNN_BF16 if dtype == torch.bfloat16 else _ONEDNN_LINEAR


def _onednn_eager(x: torch.Tensor) -> bool:
    return _ONEDNN_LINEAR and torch.backends.mkldnn.enabled and _eager_cpu(x)


def _has_hooks(module: nn.Module) -> bool:
    """Whether a layer inside `module` (not `module` itself, whose call still runs its hooks) has forward hooks."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules() if m is not module)


def onednn_inference(x: torch.Tensor, module: Optional[nn.Module] = None) -> bool:
    """Whether `fused_linear` may stand in for `module`'s layers on `x`: float32 (or under CPU bf16 autocast, where
    oneDNN has bf16 products on this CPU), no autograd (the fused op has no backward), eager on CPU, and no hooks on
    the layers inside `module` (they would not be called)."""
    if torch.is_autocast_enabled('cpu'):
        dtypes = (torch.float32, torch.bfloat16) if _bf16_autocast() and _ONEDNN_BF16 else ()
    else:
        dtypes = (torch.float32,)
    return (x.dtype in dtypes and not torch.is_grad_enabled() and _onednn_eager(x)
            and (module is None or not _has_hooks(module)))


def _bf16_autocast() -> bool:
    return torch.is_autocast_enabled('cpu') and torch.get_autocast_dtype('cpu') == torch.bfloat16


def cpu_bf16_autocast(x: torch.Tensor) -> bool:
    """Whether `x` is on CPU, eager, inside a bf16 autocast region."""
    return _eager_cpu(x) and _bf16_autocast()


# --- what every swapped-in layer shares ---------------------------------------------------------------------------

class _CPUKernelLayer:
    """What every layer class `use_cpu_kernels` swaps in shares: `KERNELS`, the kernels it takes, each declared on
    the class as a bool attribute that is off until `_init_cpu_kernels` sets it."""

    KERNELS: ClassVar[Tuple[str, ...]] = ()

    def _init_cpu_kernels(self, chosen: Set[str]) -> None:
        """Turn on the kernels of `KERNELS` that are in `chosen`, and off the others."""
        for name in self.KERNELS:
            setattr(self, name, name in chosen)



# --- oneDNN products ----------------------------------------------------------------------------------------------

def product_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a CPU product of `x` runs in: autocast's where it is on, else `x`'s own."""
    return torch.get_autocast_dtype('cpu') if torch.is_autocast_enabled('cpu') else x.dtype


# weight -> (what it was packed from and for, the packed weight): weak keys, so a model's packed weights go with it
_PACKED = WeakIdKeyDictionary()


def packed_weight(weight: torch.Tensor, x: torch.Tensor, order: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`weight` (its input columns permuted by `order`) cast to the dtype of `x`'s product and reordered into the
    blocked layout oneDNN chooses for `x`'s number of rows, for `fused_linear` (kernel `packed_weights`).

    Done once and kept until the weight changes, which its version counter tells: optimizer steps, `load_state_dict`
    and other in-place updates count. Writes through `.data` are not seen; call `use_cpu_kernels(model)` again after
    them, which drops the kept weights. One layout is kept per weight: a batch of another size packs it again.
    """
    dtype = product_dtype(x)
    if weight.is_inference() or weight.requires_grad and torch.is_grad_enabled():
        # no version counter to watch, or a product autograd must see: not kept
        return (weight if order is None else weight[:, order]).to(dtype)
    rows = x.numel() // x.shape[-1]
    key = (weight._version, weight.data_ptr(), dtype, rows, None if order is None else order.cpu().numpy().tobytes())
    kept = _PACKED.get(weight)
    if kept is None or kept[0] != key:  # permuted, cast and reordered only here, not on every call
        with torch.no_grad():
            permuted = weight if order is None else weight[:, order]
            kept = key, torch.ops.mkldnn._reorder_linear_weight(permuted.detach().to(dtype), rows)
        _PACKED[weight] = kept
    return kept[1]


def drop_packed_weights(model: nn.Module) -> None:
    """Forget the weights `packed_weight` kept for `model`'s parameters."""
    for p in model.parameters():
        _PACKED.pop(p, None)


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, gelu: bool = False,
                 add: Optional[torch.Tensor] = None, packed: bool = False) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, then exact GELU or `+ add`, as one oneDNN product (check `onednn_inference`).

    Under CPU bf16 autocast the product runs in bf16, as autocast's `linear` would, and `add` is added outside it
    in its own precision (the float32 residual stream stays float32, as under autocast). `packed` (kernel
    `packed_weights`) takes the weight as `packed_weight` keeps it; `weight` may also be one it returned.
    """
    op = torch.ops.mkldnn._linear_pointwise
    if packed and not weight.is_mkldnn:
        weight = packed_weight(weight, x)
    if torch.is_autocast_enabled('cpu'):
        dtype = torch.get_autocast_dtype('cpu')
        x, weight = x.to(dtype), weight if weight.is_mkldnn else weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        if add is not None:
            return add + op(x, weight, bias, 'none', [], '')
    if add is not None:
        return op.binary(x, add, weight, bias, 'add')
    return op(x, weight, bias, 'gelu' if gelu else 'none', [], 'none' if gelu else '')


class _OneDNNLinearFunction(torch.autograd.Function):
    """`F.linear` with its forward and input-gradient products by oneDNN, both faster than MKL's on AMD CPUs; the
    weight gradient (a product over the tokens of two transposed operands) stays with MKL, which is faster there."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """x: (rows, in_features)."""
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, 'none', [], '')

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.mkldnn._linear_pointwise(grad, weight.t(), None, 'none', [], '')  # grad @ weight
        if ctx.needs_input_grad[1]:
            grad_weight = grad.t() @ x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        return grad_x, grad_weight, grad_bias


class OneDNNLinear(_CPUKernelLayer, nn.Linear):
    """`nn.Linear` (same parameters, same keys) whose CPU products go through oneDNN (kernel `onednn_linear`):
    in inference as `fused_linear` (its weight kept packed with `packed_weights`), in float32 training forward and
    backward by `_OneDNNLinearFunction` with `onednn_linear_train`, by `F.linear` without it."""

    KERNELS = ('packed_weights', 'onednn_linear_train')
    packed_weights: bool = False
    onednn_linear_train: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.product(x)

    def product(self, x: torch.Tensor, order: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`F.linear(x[..., inverse of order], self.weight, self.bias)`: the product of input features permuted by
        `order`, by oneDNN where it can."""
        if onednn_inference(x):
            if self.packed_weights:
                return fused_linear(x, packed_weight(self.weight, x, order), self.bias)
            return fused_linear(x, self.weight if order is None else self.weight[:, order], self.bias)
        weight = self.weight if order is None else self.weight[:, order]
        if (self.onednn_linear_train and x.dtype == torch.float32 and weight.dtype == torch.float32
                and torch.is_grad_enabled() and not torch.is_autocast_enabled('cpu') and _onednn_eager(x)):
            # on rows: a 2-D product's output is its own tensor, so its 3-D view may be changed in place
            rows = _OneDNNLinearFunction.apply(x.reshape(-1, x.shape[-1]), weight, self.bias)
            return rows.view(*x.shape[:-1], rows.shape[-1])
        return F.linear(x, weight, self.bias)


def _mlp_fusable(mlp: nn.Module) -> bool:
    """Whether `mlp` is Linear, exact GELU, (dropout, identity norm,) Linear: what `_fused_mlp_residual` computes."""
    if isinstance(mlp, Mlp):
        return (isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear) and isinstance(mlp.act, nn.GELU)
                and mlp.act.approximate == 'none' and isinstance(mlp.norm, nn.Identity))
    return (isinstance(mlp, nn.Sequential) and len(mlp) == 4 and isinstance(mlp[0], nn.Linear)
            and isinstance(mlp[1], nn.GELU) and mlp[1].approximate == 'none' and isinstance(mlp[2], nn.Linear)
            and isinstance(mlp[3], nn.Dropout))


def _fused_mlp_residual(mlp: nn.Module, x: torch.Tensor, residual: torch.Tensor, packed: bool,
                        gelu_apart: bool = False) -> torch.Tensor:
    """`residual + mlp(x)` in inference (dropout off) as two oneDNN products, for an `_mlp_fusable` MLP; the GELU
    inside the first, or with `gelu_apart` (kernel `bf16_gelu_apart`) under CPU bf16 autocast after it, on its bf16
    output as autocast computes it."""
    fc1, fc2 = (mlp.fc1, mlp.fc2) if isinstance(mlp, Mlp) else (mlp[0], mlp[2])
    if gelu_apart and cpu_bf16_autocast(x):
        hidden = F.gelu(fused_linear(x, fc1.weight, fc1.bias, packed=packed))
    else:
        hidden = fused_linear(x, fc1.weight, fc1.bias, gelu=True, packed=packed)
    return fused_linear(hidden, fc2.weight, fc2.bias, add=residual, packed=packed)


# --- soft splits --------------------------------------------------------------------------------------------------

def _gather_patches(x: torch.Tensor, kernel: int, stride: int, padding: int, patch_major: bool) -> torch.Tensor:
    x = F.pad(x, (padding, padding, padding, padding))
    patches = x.unfold(2, kernel, stride).unfold(3, kernel, stride)  # (B, C, h, w, k, k), a view
    if patch_major:
        return patches.permute(0, 2, 3, 4, 5, 1).flatten(3).flatten(1, 2)  # (B, h*w, k*k*C)
    return patches.permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)  # (B, h, w, C*k*k) copy -> (B, h*w, C*k*k)


def _fold_patches(grad: torch.Tensor, size: List[int], channels: int, kernel: int, stride: int, padding: int,
                  patch_major: bool) -> torch.Tensor:
    """The gradient of a soft split by col2im (`F.fold`), which sums the overlapping patches' gradients in one pass:
    on CPU several times faster than the backward of two nested `unfold` views."""
    B, L, _ = grad.shape
    if patch_major:  # (row, column, channel) -> Unfold's (channel, row, column)
        cols = grad.view(B, L, kernel, kernel, channels).permute(0, 4, 2, 3, 1).reshape(B, -1, L)
    else:
        cols = grad.transpose(1, 2)
    return F.fold(cols, size, kernel, padding=padding, stride=stride)


def _fold_geometry(x: torch.Tensor, kernel: int, stride: int, padding: int, patch_major: bool) -> tuple:
    """What `_fold_patches` needs besides the gradient, from a soft split's input and arguments."""
    return list(x.shape[-2:]), x.shape[1], kernel, stride, padding, patch_major


class _SoftSplitWithFoldBackward(torch.autograd.Function):
    """The strided gather forward; backward by `_fold_patches`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel: int, stride: int, padding: int, patch_major: bool) -> torch.Tensor:
        ctx.geometry = _fold_geometry(x, kernel, stride, padding, patch_major)
        return _gather_patches(x, kernel, stride, padding, patch_major)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _fold_patches(grad, *ctx.geometry), None, None, None, None


# Under torch.compile the soft split is one op the compiled graph calls (kernel `compiled_splits`): traced, the gather
# would be fused into the LayerNorm after it, whose CPU code then computes every element's index by division.
@torch.library.custom_op('t2tvit::soft_split', mutates_args=())
def _soft_split_op(x: torch.Tensor, kernel: int, stride: int, padding: int, patch_major: bool) -> torch.Tensor:
    out = _gather_patches(x, kernel, stride, padding, patch_major)
    return out.clone() if out._is_view() else out  # an op's output is its own tensor


@_soft_split_op.register_fake
def _(x: torch.Tensor, kernel: int, stride: int, padding: int, patch_major: bool) -> torch.Tensor:
    B, C, H, W = x.shape
    h, w = token_grid_size((H, W), 1, ((kernel, stride, padding),))
    return x.new_empty(B, h * w, C * kernel * kernel)


@torch.library.custom_op('t2tvit::soft_split_backward', mutates_args=())
def _soft_split_backward_op(grad: torch.Tensor, size: List[int], channels: int, kernel: int, stride: int,
                            padding: int, patch_major: bool) -> torch.Tensor:
    return _fold_patches(grad, size, channels, kernel, stride, padding, patch_major)


@_soft_split_backward_op.register_fake
def _(grad: torch.Tensor, size: List[int], channels: int, kernel: int, stride: int, padding: int,
      patch_major: bool) -> torch.Tensor:
    return grad.new_empty(grad.shape[0], channels, *size)


def _soft_split_op_context(ctx, inputs, output) -> None:
    ctx.geometry = _fold_geometry(*inputs)


def _soft_split_op_backward(ctx, grad: torch.Tensor):
    return _soft_split_backward_op(grad, *ctx.geometry), None, None, None, None


_soft_split_op.register_autograd(_soft_split_op_backward, setup_context=_soft_split_op_context)


def soft_split(x: torch.Tensor, kernel: int, stride: int, padding: int, patch_major: bool = False) -> torch.Tensor:
    """`nn.Unfold(kernel, stride=stride, padding=padding)(x).transpose(1, 2)`, bit for bit, in one copy.

    (B, C, H, W) -> (B, h*w, C*k*k), features ordered (channel, row, column) as Unfold orders them, or with
    `patch_major` (row, column, channel): a copy of whole channel vectors, much faster from a channels-last map
    (features permuted by `patch_major_order`). With a gradient the backward runs by `F.fold`. Under
    `torch.compile` (not `torch.export`) it is the op `torch.ops.t2tvit.soft_split`, which the graph calls.
    """
    if _compiling():
        return torch.ops.t2tvit.soft_split(x, kernel, stride, padding, patch_major)
    if torch.is_grad_enabled() and x.requires_grad:
        return _SoftSplitWithFoldBackward.apply(x, kernel, stride, padding, patch_major)
    return _gather_patches(x, kernel, stride, padding, patch_major)


def patch_major_order(channels: int, kernel: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Feature j of a `patch_major` soft split is feature order[j] of the Unfold layout."""
    order = torch.arange(channels * kernel * kernel, device=device)
    return order.view(channels, kernel, kernel).permute(1, 2, 0).flatten()


def _norm(norm: nn.LayerNorm, x: torch.Tensor, order: Optional[torch.Tensor]) -> torch.Tensor:
    """LayerNorm of features permuted by `order`: the statistics do not depend on the order, the affine does."""
    if order is None:
        return norm(x)
    return F.layer_norm(x, norm.normalized_shape, norm.weight[order], norm.bias[order], norm.eps)


def _linear(linear: nn.Linear, x: torch.Tensor, order: Optional[torch.Tensor]) -> torch.Tensor:
    """`linear` of input features permuted by `order`: its weight columns permuted alike."""
    if order is None:
        return linear(x)
    if isinstance(linear, OneDNNLinear):
        return linear.product(x, order)
    return F.linear(x, linear.weight[:, order], linear.bias)


# --- the T2T module -----------------------------------------------------------------------------------------------

class CPUT2TModule(_CPUKernelLayer, T2TModule):
    """`T2TModule` with kernels `strided_unfold`, `patch_major`, `batch_chunks`, `page_chunks` and `split_chunks`
    on CPU in eager mode, and `compiled_splits` under `torch.compile` on CPU."""

    KERNELS = ('strided_unfold', 'patch_major', 'batch_chunks', 'page_chunks', 'split_chunks', 'compiled_splits')
    strided_unfold: bool = False
    patch_major: bool = False
    batch_chunks: bool = False
    page_chunks: bool = False
    split_chunks: bool = False
    compiled_splits: bool = False

    # first-stage tokens per batch chunk (`batch_chunks`): a batch of 16 at 224 px runs as 4 chunks of 4 images,
    # whose widest intermediate (12544 x 192 floats, 9.6 MB) stays below glibc's 32 MB mmap threshold and so on
    # reused pages rather than fresh ones
    chunk_tokens: int = 16384

    # `page_chunks`: glibc maps every block of this size or more afresh (its largest mmap threshold), so a tensor
    # that large is faulted in and zeroed page by page on every call; below it, blocks are reused from the heap
    page_bytes: int = 32 * 2 ** 20

    def _num_chunks(self, x: torch.Tensor) -> int:
        if not (self.batch_chunks or self.page_chunks):
            return 1
        B = x.shape[0]
        h1, w1 = token_grid_size(tuple(x.shape[-2:]), 1, self.soft_splits)
        chunks = math.ceil(B * h1 * w1 / self.chunk_tokens) if self.batch_chunks else 1
        if self.page_chunks and not torch.is_grad_enabled():  # with autograd every chunk's tensors stay for backward
            chunks = max(chunks, math.ceil(B / max(1, (self.page_bytes - 1) // self._stage1_bytes(x, h1 * w1))))
        return max(1, min(B, chunks))

    def _stage1_bytes(self, x: torch.Tensor, tokens: int) -> int:
        """Bytes of the first stage's widest tensor per image: its soft split, or its first product's output."""
        layer = self.attention1
        first = layer.kqv if isinstance(layer, TokenPerformer) else layer.attn.qkv
        product = torch.finfo(product_dtype(x)).bits // 8
        return tokens * max(first.in_features * x.element_size(), first.out_features * product)

    def forward_stages(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        if self.compiled_splits and not self.grad_checkpointing and _compiled_cpu(x):
            return self._cpu_stages(x)  # the splits as ops the graph calls; the eager-only kernels step aside
        if not _eager_cpu(x) or self.grad_checkpointing:
            return super().forward_stages(x)
        chunks = self._num_chunks(x)
        if chunks == 1:
            return self._cpu_stages(x)
        parts = [self._cpu_stages(part) for part in x.chunk(chunks)]  # every op is per image
        maps = [torch.cat(stage) for stage in zip(*(part_maps for _, part_maps in parts))]
        return torch.cat([tokens for tokens, _ in parts]), maps

    def _split(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if self.strided_unfold or _compiled_cpu(x):
            return soft_split(x, *self.soft_splits[index])
        return (self.soft_split0, self.soft_split1)[index](x).transpose(1, 2)

    def _cpu_stages(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        B, _, H, W = x.shape
        h1, w1 = token_grid_size((H, W), 1, self.soft_splits)
        h2, w2 = token_grid_size((H, W), 2, self.soft_splits)
        layer = self.attention1
        if (self.split_chunks and cpu_bf16_autocast(x) and not torch.is_grad_enabled()
                and hasattr(layer, 'forward_normed') and not layer._forward_hooks and not layer._forward_pre_hooks
                and not _has_hooks(layer)):
            x1 = layer.forward_normed(self._normed_split(x, h1 * w1), None)
        else:
            x1 = layer(self._split(0, x))
        map1 = x1.transpose(1, 2).reshape(B, -1, h1, w1)
        layer = self.attention2
        if ((self.strided_unfold or _compiled_cpu(x)) and self.patch_major and hasattr(layer, 'forward_permuted')
                and not layer._forward_hooks and not layer._forward_pre_hooks):
            # features (row, column, channel): whole channel vectors copied from the channels-last map
            x = soft_split(map1, *self.soft_splits[1], patch_major=True)  # (B, h2*w2, 3*3*token_dim)
            x = layer.forward_permuted(x, patch_major_order(self.token_dim, self.soft_splits[1][0], x.device))
        else:
            x = layer(self._split(1, map1))
        map2 = x.transpose(1, 2).reshape(B, -1, h2, w2)
        return self.split_and_project(map2), [map1, map2]

    def _normed_split(self, x: torch.Tensor, tokens: int) -> torch.Tensor:
        """`split_chunks`: the first layer's LayerNorm of the first soft split, cast to the autocast dtype as its
        product would, computed a few images (about `chunk_tokens` tokens) at a time into one tensor."""
        norm = self.attention1.norm1
        out = torch.empty(x.shape[0], tokens, norm.normalized_shape[0], dtype=torch.get_autocast_dtype('cpu'))
        step = max(1, self.chunk_tokens // tokens)
        for start in range(0, x.shape[0], step):
            out[start:start + step] = norm(self._split(0, x[start:start + step]))  # float32, rounded on the copy
        return out


# --- token layers -------------------------------------------------------------------------------------------------

class CPUTokenAttention(_CPUKernelLayer, TokenAttention):
    """`TokenAttention` taking permuted input features, and in CPU inference the residual add inside `proj`."""

    KERNELS = ('onednn_linear', 'packed_weights')
    onednn_linear: bool = False
    packed_weights: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_permuted(x, None)

    def forward_permuted(self, x: torch.Tensor, order: Optional[torch.Tensor]) -> torch.Tensor:
        if order is None and not _eager_cpu(x):
            return super().forward(x)
        x, v = self.attend(_linear(self.qkv, x, order))
        if self.onednn_linear and not self.training and onednn_inference(x, self):  # (dropout is off)
            return fused_linear(x, self.proj.weight, self.proj.bias, add=v, packed=self.packed_weights)
        return self.project(x, v)


class CPUTokenTransformer(_CPUKernelLayer, TokenTransformer):
    """`TokenTransformer` taking permuted input features, its MLP fused in CPU inference."""

    KERNELS = ('onednn_linear', 'packed_weights', 'bf16_gelu_apart')
    onednn_linear: bool = False
    packed_weights: bool = False
    bf16_gelu_apart: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_permuted(x, None)

    def forward_permuted(self, x: torch.Tensor, order: Optional[torch.Tensor]) -> torch.Tensor:
        if order is None and not _eager_cpu(x):
            return super().forward(x)
        return self.forward_normed(_norm(self.norm1, x, order), order)

    def forward_normed(self, x: torch.Tensor, order: Optional[torch.Tensor]) -> torch.Tensor:
        """The layer after `norm1`: `x` is `norm1` of its input (features permuted by `order`)."""
        x = self.attn.forward_permuted(x, order)
        if self.onednn_linear and not self.training and onednn_inference(x, self) and _mlp_fusable(self.mlp):
            return _fused_mlp_residual(self.mlp, self.norm2(x), x, self.packed_weights, self.bf16_gelu_apart)
        return x + self.mlp(self.norm2(x))


class CPUTokenPerformer(_CPUKernelLayer, TokenPerformer):
    """`TokenPerformer` taking permuted input features, with `performer_fusion` and its MLP fused in inference."""

    KERNELS = ('onednn_linear', 'performer_fusion', 'packed_weights', 'bf16_gelu_apart')
    onednn_linear: bool = False
    performer_fusion: bool = False
    packed_weights: bool = False
    bf16_gelu_apart: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_permuted(x, None)

    def forward_permuted(self, x: torch.Tensor, order: Optional[torch.Tensor]) -> torch.Tensor:
        if order is None and not _eager_cpu(x):
            return super().forward(x)
        return self.forward_normed(_norm(self.norm1, x, order), order)

    def forward_normed(self, x: torch.Tensor, order: Optional[torch.Tensor]) -> torch.Tensor:
        """The layer after `norm1`: `x` is `norm1` of its input (features permuted by `order`)."""
        onednn = self.onednn_linear and not self.training and onednn_inference(x, self)
        k, q, v = _linear(self.kqv, x, order).split(self.out_dim, dim=-1)
        y = performer_attention(k, q, v, self.w, self.eps, fused=self.performer_fusion)  # (B, T, d), float32
        if onednn:  # (dropout is off)
            x = fused_linear(y, self.proj.weight, self.proj.bias, add=v, packed=self.packed_weights)
        else:
            x = self.project(y, v)
        if onednn and _mlp_fusable(self.mlp):
            return _fused_mlp_residual(self.mlp, self.norm2(x), x, self.packed_weights, self.bf16_gelu_apart)
        return x + self.mlp(self.norm2(x))


# --- backbone blocks ----------------------------------------------------------------------------------------------

def _explicit_attention(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale) v as explicit products, with `attn`'s scale and dropout."""
    return attention(q, k, v, attn.scale, attn.attn_drop.p if attn.training else 0., fused=False)


def _explicit_bf16(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether `layer` takes explicit bf16 attention products for `x`: `bf16_cpu_attn` under CPU bf16 autocast, or
    `bf16_cpu_attn_train` there with gradients on; eager or under `torch.compile`, whose graph calls the same fused
    kernel and its slow CPU backward."""
    wanted = layer.bf16_cpu_attn or (layer.bf16_cpu_attn_train and torch.is_grad_enabled())
    return wanted and _bf16_autocast() and (_eager_cpu(x) or _compiled_cpu(x))


def _explicit(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether `layer` takes explicit attention products for `x` (its input or queries, tokens on dim -2): a short
    sequence in an eager CPU run (`short_attn`), or the bf16 kernels' choice (`_explicit_bf16`)."""
    if layer.short_attn and _eager_cpu(x) and x.shape[-2] <= SHORT_ATTN_TOKENS:
        return True
    return _explicit_bf16(layer, x)


class CPUAttention(_CPUKernelLayer, Attention):
    """timm's `Attention` with explicit products where they are faster (`short_attn`, `bf16_cpu_attn`,
    `bf16_cpu_attn_train`), and `forward_add` for the oneDNN block."""

    KERNELS = ('bf16_cpu_attn', 'bf16_cpu_attn_train', 'short_attn', 'packed_weights')
    bf16_cpu_attn: bool = False
    bf16_cpu_attn_train: bool = False
    short_attn: bool = False
    packed_weights: bool = False

    def _heads(self, x: torch.Tensor, explicit: bool) -> torch.Tensor:
        """Attention output (B, N, attn_dim) before `proj`; `explicit`: `_explicit(self, x)`."""
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn and not explicit:  # as timm's: SDPA's own scale
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            x = _explicit_attention(self, q, k, v)
        return self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal or self.gate is not None or not _explicit(self, x):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj_drop(self.proj(self._heads(x, explicit=True)))

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """`residual + self(x)` in inference, the addition inside `proj`'s oneDNN product."""
        return fused_linear(self._heads(x, _explicit(self, x)), self.proj.weight, self.proj.bias, add=residual,
                            packed=self.packed_weights)


class _ExplicitHeadsAttention(_CPUKernelLayer):
    """For the SE and Ghost attention layers: explicit products where they are faster (`short_attn`,
    `bf16_cpu_attn`, `bf16_cpu_attn_train`)."""

    KERNELS = ('bf16_cpu_attn', 'bf16_cpu_attn_train', 'short_attn')
    bf16_cpu_attn: bool = False
    bf16_cpu_attn_train: bool = False
    short_attn: bool = False

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if _explicit(self, q):
            return _explicit_attention(self, q, k, v)
        return super().attend(q, k, v)


class CPUSEAttention(_ExplicitHeadsAttention, SEAttention):
    pass


class CPUGhostAttention(_ExplicitHeadsAttention, GhostAttention):
    pass


class CPUBlock(_CPUKernelLayer, Block):
    """timm's ViT block whose CPU inference runs its products by oneDNN, with the bias, the MLP's GELU and (in fp32)
    both residual additions done inside them (`onednn_linear`)."""

    KERNELS = ('onednn_linear', 'packed_weights', 'bf16_gelu_apart')
    onednn_linear: bool = False
    packed_weights: bool = False
    bf16_gelu_apart: bool = False

    def _fusable(self, x: torch.Tensor) -> bool:
        return (self.onednn_linear and not self.training and isinstance(self.ls1, nn.Identity)
                and isinstance(self.ls2, nn.Identity) and onednn_inference(x, self))

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal or not self._fusable(x):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if isinstance(self.attn, CPUAttention) and self.attn.gate is None:
            x = self.attn.forward_add(self.norm1(x), x)
        else:  # SE and Ghost attention; drop paths are off in inference
            x = x + self.attn(self.norm1(x))
        if _mlp_fusable(self.mlp):
            return _fused_mlp_residual(self.mlp, self.norm2(x), x, self.packed_weights, self.bf16_gelu_apart)
        return x + self.mlp(self.norm2(x))


# --- applying them ------------------------------------------------------------------------------------------------

# plain class -> the CPU class swapped in for it
_SWAPS = {
    T2TModule: CPUT2TModule,
    TokenAttention: CPUTokenAttention,
    TokenTransformer: CPUTokenTransformer,
    TokenPerformer: CPUTokenPerformer,
    Attention: CPUAttention,
    SEAttention: CPUSEAttention,
    GhostAttention: CPUGhostAttention,
    Block: CPUBlock,
}


def use_cpu_kernels(model: nn.Module, kernels: Optional[Iterable[str]] = None, exclude: Iterable[str] = (),
                    profile: Optional[str] = None) -> nn.Module:
    """Give `model` (built, weights loaded or not) the CPU kernels of `CPU_KERNELS`; returns the same model.

    `kernels`: the names to use (default: those this host's plan turns on, `host_kernel_plan(profile)`; `profile`
    or `T2TVIT_CPU_PROFILE` forces another host's); `exclude`: names to leave out (e.g. for an A/B timing). Layers
    are swapped in place for subclasses with the same parameters, buffers and state-dict keys, whose forward falls
    back to the plain one off CPU, when traced, scripted or exported, and under dispatch modes (under torch.compile
    only `compiled_splits` and the explicit bf16 attention products stay), so the model's outputs stay those of the
    plain model (within fp32 rounding). Applying it again re-selects kernels.
    """
    chosen = set(_check_names(planned_kernels(profile) if kernels is None else kernels)) - set(_check_names(exclude))
    onednn = 'onednn_linear' in chosen and _ONEDNN_LINEAR
    if not onednn:
        chosen -= ONEDNN_CHOICES
    drop_packed_weights(model)
    for module in list(model.modules()):
        plain = next((p for p in type(module).__mro__ if p in _SWAPS), None)
        if plain is None:
            continue
        cpu_cls = _SWAPS[plain]
        if type(module) is plain:
            module.__class__ = cpu_cls
        elif not isinstance(module, cpu_cls):
            continue  # a subclass of its own (e.g. the dense block): keeps its forward
        module._init_cpu_kernels(chosen)
    # the token layers' and blocks' Linear layers (not the head: one small product)
    roots = [m for m in (getattr(model, 'tokens_to_token', None), getattr(model, 'blocks', None)) if m is not None]
    for root in roots or [model]:
        for module in root.modules():
            if onednn and type(module) is nn.Linear:
                module.__class__ = OneDNNLinear
            elif not onednn and type(module) is OneDNNLinear:
                module.__class__ = nn.Linear
                for name in OneDNNLinear.KERNELS:  # the plain layer keeps none of its settings
                    vars(module).pop(name, None)
            if type(module) is OneDNNLinear:
                module._init_cpu_kernels(chosen)
    return model


def cpu_kernel_state(model: nn.Module) -> Dict[str, bool]:
    """Which kernels `model` takes: each name is on if any layer has it on."""
    state = {name: False for name in CPU_KERNELS}
    for module in model.modules():
        for name in CPU_KERNELS:
            if getattr(module, name, False) is True:
                state[name] = True
    state['onednn_linear'] = state['onednn_linear'] and any(isinstance(m, OneDNNLinear) for m in model.modules())
    return state


def for_device(model: nn.Module, device: torch.device) -> nn.Module:
    """What `t2tvit` commands run: on a CPU `use_cpu_kernels(model)`, and freed memory kept for reuse
    (`t2tvit.cpu_heap.keep_heap_pages`, once a process); elsewhere the model as it is."""
    if torch.device(device).type != 'cpu':
        return model
    keep_heap_pages()
    return use_cpu_kernels(model)
