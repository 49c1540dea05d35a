"""Stopping on purpose: preemption (SIGTERM, SIGUSR1), Ctrl-C (SIGINT) and a wall-clock budget.

A handler only sets a flag; at the next step boundary all ranks agree to stop with one small all-reduce (a
signal may reach some ranks and not others), save a checkpoint, and leave with a distinct exit status, so a
batch script can requeue the job and the requeued job resumes by itself. A second Ctrl-C leaves at once.
Saving inside a handler would deadlock (the interrupted rank may hold a collective the others wait in).
"""
from __future__ import annotations

import os
import signal
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


def agree_to_stop(wants: bool, device: torch.device) -> bool:
    """True on every rank when any rank wants to stop (one all-reduce of one element)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return wants
    flag = torch.tensor([1.0 if wants else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)
