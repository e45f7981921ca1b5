"""DDP helpers for the loop (torchrun; gloo on CPU, nccl on CUDA): process-group start, every rank's RNG
state for checkpoints, rank 0's decisions broadcast, the loss averaged over ranks. One process (no
torchrun) is world size 1 and every helper is then a no-op.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
from torch import Tensor

log = logging.getLogger(__name__)


def _init_distributed(cfg_device: str) -> tuple[int, int, bool]:
    """(rank, world_size, we_initialised) from torchrun's environment; 1 process without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    cuda = cfg_device != "cpu" and torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), True


def _all_rng_states(world: int, device: torch.device) -> tuple[list[Tensor], list[Tensor]]:
    """Every rank's torch RNG state (CPU and CUDA), gathered so rank 0 can checkpoint them."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    if world == 1:
        return [cpu], [cuda] if cuda is not None else []
    comm = device if device.type == "cuda" else torch.device("cpu")  # nccl gathers on the GPU
    out = []
    for state in (cpu, cuda):
        if state is None:
            out.append([])
            continue
        parts = [torch.empty_like(state, device=comm) for _ in range(world)]
        dist.all_gather(parts, state.to(comm))
        out.append([p.cpu() for p in parts])
    return out[0], out[1]


def _broadcast_int(value: int, world: int, device: torch.device) -> int:
    """Rank 0's value on every rank (so all ranks agree on when to stop)."""
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device if device.type == "cuda" else "cpu")
    dist.broadcast(t, 0)
    return int(t.item())


def _mean_over_ranks(t: Tensor, world: int) -> list[float]:
    """Each rank's loss covers its rows (scaled by world / global weight): the global loss is the mean."""
    if world > 1:
        dist.all_reduce(t)
        t = t / world
    return t.tolist()
