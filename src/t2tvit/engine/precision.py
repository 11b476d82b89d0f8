"""`amp: auto`: bf16 autocast where the hardware computes in bf16 natively, else full fp32.

On a CPU without native bf16, autocast converts to bf16 and back around emulated products, which is slower than
fp32; with AMX or AVX-512 BF16 the same products run at two or more times the fp32 rate. On CUDA, bf16 needs a
GPU that supports it (Ampere and later). fp16 is never chosen automatically: it needs a gradient scaler and can
overflow where bf16 cannot.
"""
from __future__ import annotations

from typing import FrozenSet, Optional

import torch

__all__ = ['AMP_CHOICES', 'NATIVE_BF16_FLAGS', 'cpu_flags', 'emulated_bf16_warning', 'native_bf16_cpu', 'resolve_amp']

AMP_CHOICES = ('none', 'bf16', 'fp16', 'auto')
# /proc/cpuinfo flags of x86 units that multiply bf16 in hardware
NATIVE_BF16_FLAGS = ('amx_bf16', 'avx512_bf16')


def cpu_flags() -> FrozenSet[str]:
    """The CPU's feature flags as Linux reports them; empty where /proc/cpuinfo does not exist."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith(('flags', 'Features')):
                    return frozenset(line.split(':', 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16_cpu(flags: Optional[FrozenSet[str]] = None) -> bool:
    """Whether this CPU multiplies bf16 natively (AMX or AVX-512 BF16)."""
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def resolve_amp(amp: str, device: torch.device) -> str:
    """The precision `amp` means on `device`: 'auto' becomes 'bf16' where bf16 is native there, else 'none'; any
    other value is returned as it is."""
    if amp != 'auto':
        return amp
    if device.type == 'cuda':
        return 'bf16' if torch.cuda.is_bf16_supported(including_emulation=False) else 'none'
    if device.type == 'cpu':
        return 'bf16' if native_bf16_cpu() else 'none'
    return 'none'


def emulated_bf16_warning(amp: str, device: torch.device) -> Optional[str]:
    """A one-line warning when bf16 is asked for on a CPU without native bf16 (e.g. AVX2 only), else None."""
    if amp != 'bf16' or device.type != 'cpu' or native_bf16_cpu():
        return None
    return ('warning: bf16 on this CPU is emulated (no AMX or AVX-512 BF16): on an AVX2-only AMD EPYC, T2T-ViT-14 '
            'inference ran 7x slower than in fp32 and a training step\'s first call 22x; amp auto (or none) runs '
            'fp32 here')
