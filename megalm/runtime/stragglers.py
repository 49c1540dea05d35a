"""A rank consistently slower than the others, named in the log.

Each rank sums the seconds it spends on its own work in a step (data, then the schedule's forward and backward,
before the first data-parallel collective) over a log interval. Three one-element all-reduces (sum, max, and the
rank holding the max) then compare the slowest rank with the mean of the others: the cost per rank does not grow
with the world. A window shorter than a second of work is extended to the next interval, and a rank is named
only when it is the slowest by ``factor`` in two windows in a row (one slow window is noise). Waits inside
tensor- and pipeline-parallel groups are counted as work (a group slows together), so a straggler is found
among ranks that do not wait for each other within a step: data-parallel peers.
"""
from __future__ import annotations

import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Straggler:
    rank: int
    seconds: float           # its work time over the window
    ratio: float             # against the mean of the other ranks


MIN_WINDOW_S = 1.0           # windows shorter than this (of the slowest rank's work) are extended: noise


def find_straggler(busy_s: float, factor: float, device: torch.device) -> tuple[Straggler | None, bool]:
    """On every rank: (the rank whose work time is at least ``factor`` times the mean of the others', or None;
    whether the window was long enough to judge, else the caller keeps accumulating)."""
    if factor <= 0 or not dist.is_initialized() or dist.get_world_size() < 2:
        return None, True
    world, rank = dist.get_world_size(), dist.get_rank()
    total = torch.tensor([busy_s], dtype=torch.float64, device=device)
    slowest = total.clone()
    dist.all_reduce(total)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    if slowest.item() < MIN_WINDOW_S:
        return None, False
    holder = torch.tensor([rank if busy_s >= slowest.item() else -1], dtype=torch.float64, device=device)
    dist.all_reduce(holder, op=dist.ReduceOp.MAX)
    others = (total.item() - slowest.item()) / (world - 1)
    ratio = slowest.item() / others if others > 0 else float("inf")
    return (Straggler(int(holder.item()), slowest.item(), ratio) if ratio >= factor else None), True


def report(straggler: Straggler, rank: int, local_rank: int, first_step: int, last_step: int, factor: float) -> None:
    """Printed by the straggler itself (only it knows its host)."""
    if straggler.rank != rank:
        return
    steps = last_step - first_step + 1
    print(f"megalm: straggler: rank {rank} (host {socket.gethostname()}, local rank {local_rank}) spent "
          f"{straggler.seconds / steps:.3f}s per step on its own work over steps {first_step}-{last_step}, "
          f"{straggler.ratio:.1f}x the other ranks' mean (parallel.straggler_factor={factor:g})",
          file=sys.stderr, flush=True)
