"""Data parallelism for iDEM training: which rank this is, each rank's share of the work, and
the collectives the loop needs (sums, means, a weight check, gathering per-rank state).

Under ``torchrun`` (or ``python -m boltzlab train ... --procs P``, which starts it) the
process group is initialised by the command line; everywhere else these functions see one
process and do nothing collective.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def rank_and_world() -> tuple[int, int]:
    """(rank, number of processes): (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_share(total: int, rank: int, world: int) -> int:
    """Rank ``rank``'s part of ``total`` items split over ``world`` ranks as evenly as possible
    (the first ``total % world`` ranks take one more)."""
    return total // world + (1 if rank < total % world else 0)


def gather_rank_states(state: Any) -> list[dict[str, Any]] | None:
    """Every rank's buffer and generator state, gathered on rank 0 (a collective: all ranks
    call it); None on other ranks and in single-process runs."""
    rank, world = rank_and_world()
    if world == 1:
        return None
    mine = {"buffer": state.buffer.state_dict(), "generator": state.generator.get_state()}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    return gathered if rank == 0 else None


def all_sum(value: float) -> float:
    """The sum of ``value`` over ranks (``value`` itself in one process), in float64."""
    _, world = rank_and_world()
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def all_mean(value: float) -> float:
    """The mean of ``value`` over ranks (the loss of the global batch when shares are equal)."""
    return all_sum(value) / rank_and_world()[1]


def check_ranks_in_sync(model: nn.Module) -> None:
    """Under DistributedDataParallel every rank must hold the same weights after each step;
    compare a checksum of the parameters across ranks and fail loudly if they drifted."""
    _, world = rank_and_world()
    if world == 1:
        return
    flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    mine = torch.stack([flat.sum(), flat.pow(2).sum()])
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    if any(not torch.allclose(g, gathered[0], rtol=1e-10, atol=0.0) for g in gathered):
        raise RuntimeError(f"DDP ranks hold different weights: checksums {[g.tolist() for g in gathered]}")
