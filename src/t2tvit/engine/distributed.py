"""Process-group set-up for `torchrun`: one process per device, NCCL on GPUs, gloo on CPUs.

Single-process runs need nothing: every helper here degrades to the obvious one-process answer.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator

import torch
import torch.distributed as dist

from ..errors import InputError, PeerLost, T2TViTError

__all__ = ['DistInfo', 'DeviceUnavailable', 'PeerLost', 'pick_device', 'init_distributed', 'collectives', 'barrier',
           'all_reduce_sum', 'all_reduce_max', 'broadcast_flag', 'cleanup']


class DeviceUnavailable(InputError, RuntimeError):
    """The device asked for is not there (`--device cuda` without a visible GPU)."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device('cpu')

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == 'cuda' or (requested == 'auto' and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise DeviceUnavailable('device=cuda asked for, but no CUDA GPU is visible; use --device cpu')
        return torch.device('cuda', local_rank)
    return torch.device('cpu')


def init_distributed(requested_device: str = 'auto') -> DistInfo:
    """Join the process group that torchrun describes in RANK/WORLD_SIZE/LOCAL_RANK, if any."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    device = pick_device(requested_device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == 'cuda':
            torch.cuda.set_device(device)
        dist.init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo',
                                **_restart_store(rank, world_size))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def _restart_store(rank: int, world_size: int) -> Dict[str, Any]:
    """On one machine under torchrun, the store of torchrun's agent with a prefix of its own for each restart.

    torchrun keeps the same store across restarts of the group, so a restarted process could read the addresses the
    processes before the restart left there, and wait for a peer that is gone. The restart count tells the rounds
    apart where one agent starts every process; with several machines each agent counts its own restarts, so
    torch's own set-up is kept there.
    """
    env = os.environ
    if env.get('TORCHELASTIC_USE_AGENT_STORE') != 'True' or env.get('GROUP_WORLD_SIZE') != '1':
        return {}
    store = dist.TCPStore(env['MASTER_ADDR'], int(env['MASTER_PORT']), world_size, is_master=False,
                         timeout=dist.default_pg_timeout)
    restart = env.get('TORCHELASTIC_RESTART_COUNT', '0')
    return {'store': dist.PrefixStore(f't2tvit/restart-{restart}', store), 'rank': rank, 'world_size': world_size}


@contextlib.contextmanager
def collectives(info: DistInfo, what: str) -> Iterator[None]:
    """Code that communicates with the other processes (DDP's gradient and buffer exchange, the helpers below):
    under torchrun, its RuntimeError becomes `PeerLost`.

    gloo and NCCL report a peer that stopped mid-collective ("Connection reset by peer", a closed pair, a timeout)
    as a RuntimeError with no finer class, so the place it comes from is what says it is a lost peer. Our own
    errors and running out of memory pass unchanged.
    """
    try:
        yield
    except RuntimeError as e:
        if not info.distributed or isinstance(e, (T2TViTError, torch.OutOfMemoryError)):
            raise
        cause = ' '.join(str(e).split())[:160]
        raise PeerLost(
            f'rank {info.rank}: a peer process of the torchrun group stopped during {what} ({type(e).__name__}: '
            f'{cause}); under torchrun --max-restarts N the group restarts and resumes from the last checkpoint '
            f'(RUN_DIR/last.pth); without it, run the same command again to resume') from e


def barrier(info: DistInfo) -> None:
    if info.distributed:
        with collectives(info, 'a barrier'):
            dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum over processes, in place; a no-op in a single process."""
    if info.distributed:
        with collectives(info, 'an all-reduce'):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Maximum over processes, in place; a no-op in a single process."""
    if info.distributed:
        with collectives(info, 'an all-reduce'):
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_flag(flag: bool, info: DistInfo) -> bool:
    """True on every process when any process says True (e.g. a stop request or a bad loss)."""
    if not info.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    with collectives(info, 'an all-reduce'):
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def cleanup(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
