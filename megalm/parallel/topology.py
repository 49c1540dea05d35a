"""The rank grid and its process groups, built once and passed to whatever needs them.

Ranks are laid out as ``arange(world).view(pp, dp, tp)``: tensor-parallel ranks are neighbours (same node,
fastest links), data-parallel replicas next, pipeline stages outermost, as in Megatron-LM. Nothing here is a
module-level global: code receives a ``Topology`` (or the small ``TensorParallel`` handle cut from it).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megalm.config.rules import data_parallel_size


@dataclass
class TensorParallel:
    """What model code may know about tensor parallelism: its group, size and rank, and the SP flag."""
    group: object = None
    size: int = 1
    rank: int = 0
    sequence_parallel: bool = False
    comm: object = None  # a megalm.parallel.tensor.comm.CommStats counting elements moved; None = not counting
    phases: object = None  # a megalm.runtime.phases.PhaseClock timing the collectives; None = not timing

    @property
    def enabled(self) -> bool:
        return self.size > 1


@dataclass
class Topology:
    """This rank's place in the (pp, dp, tp) grid and the groups along each axis.

    Groups are ``None`` along an axis of size 1; every collective helper treats ``None`` with size 1 as
    "do nothing", so a single process never touches torch.distributed.
    """
    tp: int = 1
    pp: int = 1
    dp: int = 1
    rank: int = 0
    grid: torch.Tensor = field(default_factory=lambda: torch.zeros(1, 1, 1, dtype=torch.long))
    tp_group: object = None
    pp_group: object = None
    dp_group: object = None
    mp_group: object = None       # tp x pp: DeepSpeed's "model parallel" group
    embed_group: object = None    # first and last stage of this (dp, tp) column: tied embeddings
    sequence_parallel: bool = False

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def coords(self) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, tp_rank) of this rank."""
        where = (self.grid == self.rank).nonzero()[0]
        return int(where[0]), int(where[1]), int(where[2])

    @property
    def pp_rank(self) -> int:
        return self.coords[0]

    @property
    def dp_rank(self) -> int:
        return self.coords[1]

    @property
    def tp_rank(self) -> int:
        return self.coords[2]

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def stage_rank(self, pp_rank: int) -> int:
        """Global rank of pipeline stage ``pp_rank`` in this rank's (dp, tp) column."""
        _, d, t = self.coords
        return int(self.grid[pp_rank, d, t])

    @property
    def tensor_parallel(self) -> TensorParallel:
        return TensorParallel(self.tp_group, self.tp, self.tp_rank, self.sequence_parallel and self.tp > 1)

    def describe(self) -> str:
        pp_rank, dp_rank, tp_rank = self.coords
        return (f"rank {self.rank}/{self.world_size}: pp {pp_rank}/{self.pp} dp {dp_rank}/{self.dp} "
                f"tp {tp_rank}/{self.tp}")


def build_topology(tp: int = 1, pp: int = 1, dp: int | None = None, sequence_parallel: bool = False) -> Topology:
    """Make the rank grid and every process group. All ranks must call this together (new_group is collective)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    dp = data_parallel_size(world, tp, pp, dp)
    grid = torch.arange(world).view(pp, dp, tp)
    topo = Topology(tp=tp, pp=pp, dp=dp, rank=rank, grid=grid, sequence_parallel=sequence_parallel)
    if world == 1:
        return topo
    # Every rank creates every group, in the same order; it keeps the ones it belongs to.
    axes = {
        "tp_group": [grid[p, d, :] for p in range(pp) for d in range(dp)],
        "dp_group": [grid[p, :, t] for p in range(pp) for t in range(tp)],
        "pp_group": [grid[:, d, t] for d in range(dp) for t in range(tp)],
        "mp_group": [grid[:, d, :].flatten() for d in range(dp)],
        "embed_group": [grid[[0, pp - 1], d, t].unique() for d in range(dp) for t in range(tp)],
    }
    for attr, rank_lists in axes.items():
        for ranks in rank_lists:
            ranks = sorted(int(r) for r in ranks)
            group = dist.new_group(ranks) if len(ranks) > 1 else None
            if rank in ranks:
                setattr(topo, attr, group)
    return topo
