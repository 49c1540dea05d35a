"""Stopping on purpose: preemption (SIGTERM, SIGUSR1), Ctrl-C (SIGINT) and a wall-clock budget.

A handler only sets a flag; at the next step boundary all ranks agree to stop with one small all-reduce (a
signal may reach some ranks and not others), save a checkpoint, and leave with a distinct exit status, so a
batch script can requeue the job and the requeued job resumes by itself. A second Ctrl-C leaves at once.
Saving inside a handler would deadlock (the interrupted rank may hold a collective the others wait in).
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

EXIT_RESUMABLE = 75          # EX_TEMPFAIL: stopped with a checkpoint; rerunning the same command resumes
EXIT_INTERRUPTED = 130       # Ctrl-C, after saving
REASONS = {signal.SIGTERM: "SIGTERM (preemption or time limit)", signal.SIGUSR1: "SIGUSR1 (SLURM's warning)",
           signal.SIGINT: "Ctrl-C"}


@dataclass
class StopRequest:
    """Set by the handlers (and the time budget); read at step boundaries."""
    reason: str | None = None
    signum: int | None = None
    interrupts: int = 0
    started: float = field(default_factory=time.monotonic)

    def exit_status(self) -> int:
        return EXIT_INTERRUPTED if self.signum == signal.SIGINT else EXIT_RESUMABLE


def install(request: StopRequest, rank: int) -> dict:
    """Route SIGTERM, SIGUSR1 and SIGINT to ``request``; returns the previous handlers (for ``uninstall``)."""

    def handler(signum, frame):
        if signum == signal.SIGINT:
            request.interrupts += 1
            if request.interrupts > 1:
                print(f"megalm: second Ctrl-C on rank {rank}: leaving now, without a checkpoint", file=sys.stderr,
                      flush=True)
                os._exit(EXIT_INTERRUPTED)
            if rank == 0:
                print("megalm: Ctrl-C: stopping at the end of this step with a checkpoint (Ctrl-C again to leave "
                      "at once)", file=sys.stderr, flush=True)
        if request.reason is None:
            request.reason, request.signum = REASONS.get(signum, f"signal {signum}"), signum

    previous = {}
    for signum in REASONS:
        try:
            previous[signum] = signal.signal(signum, handler)
        except ValueError:             # not the main thread (a notebook's worker): no handlers, nothing breaks
            pass
    return previous


def uninstall(previous: dict) -> None:
    for signum, old in previous.items():
        signal.signal(signum, old)


def over_budget(request: StopRequest, time_limit: float | None, margin_s: float) -> bool:
    """Whether the wall-clock budget leaves less than ``margin_s`` (enough for a step and a save)."""
    if not time_limit:
        return False
    if time.monotonic() - request.started + margin_s >= time_limit:
        if request.reason is None:
            request.reason = f"train.time_limit={time_limit:g}s nearly spent"
        return True
    return False


TIME_LIMIT_CODE = 1000.0      # beside signal numbers, in the stop agreement


def agree_to_stop(request: StopRequest | bool, device: torch.device, step: int = 0) -> bool:
    """True on every rank when any rank wants to stop (one all-reduce of three elements); a rank that had no
    reason of its own takes the other ranks' (a signal, or the time budget), so every rank says the same. The
    same all-reduce checks that every rank is at the same step: a rank that skipped or repeated a collective is
    named, and every rank stops (DesyncError) instead of training on with collectives paired wrongly."""
    wants = request if isinstance(request, bool) else request.reason is not None
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return wants
    code = 0.0
    if wants:
        code = float(request.signum) if not isinstance(request, bool) and request.signum else TIME_LIMIT_CODE
    flag = torch.tensor([code, step, -step], dtype=torch.float64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    highest, lowest = int(flag[1].item()), -int(flag[2].item())
    if highest != lowest:
        raise DesyncError(_name_the_odd_rank(step, highest, lowest, device))
    agreed = flag[0].item()
    if agreed and not isinstance(request, bool) and request.reason is None:
        signum = int(agreed) if agreed != TIME_LIMIT_CODE else None
        request.signum = signum
        request.reason = (REASONS.get(signum, f"signal {signum}") + " on another rank" if signum
                          else "train.time_limit nearly spent (on another rank)")
    return bool(agreed > 0)


class DesyncError(RuntimeError):
    pass


def _name_the_odd_rank(step: int, highest: int, lowest: int, device) -> str:
    """Every rank learns how many ranks are at the highest step, and the largest rank on the smaller side."""
    world, rank = dist.get_world_size(), dist.get_rank()
    count = torch.tensor([1.0 if step == highest else 0.0], dtype=torch.float64, device=device)
    dist.all_reduce(count)
    at_highest = int(count.item())
    odd_step = highest if at_highest <= world - at_highest else lowest
    odd = torch.tensor([rank if step == odd_step else -1], dtype=torch.float64, device=device)
    dist.all_reduce(odd, op=dist.ReduceOp.MAX)
    n_odd = at_highest if odd_step == highest else world - at_highest
    who = f"rank {int(odd.item())}" + (f" (and {n_odd - 1} more)" if n_odd > 1 else "")
    if int(odd.item()) == rank:
        who = f"rank {rank} (host {socket.gethostname()}{' and ' + str(n_odd - 1) + ' more' if n_odd > 1 else ''})"
    majority = highest if odd_step == lowest else lowest
    return (f"ranks out of step at the stop agreement: {who} at step {odd_step} while {world - n_odd} rank(s) are at "
            f"step {majority}; it skipped or repeated a collective, so collectives were being paired wrongly. "
            f"Stopping every rank; the last committed checkpoint is intact")
