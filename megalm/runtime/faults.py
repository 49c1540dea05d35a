"""Planned faults, to rehearse failures and to test that none loses anything (off by default, costless when off).

Set ``MEGALM_FAULTS`` to one or more faults separated by ``;``, each ``ACTION:key=value,...``::

    MEGALM_FAULTS="kill:rank=1,step=5"              # SIGKILL rank 1 as it starts step 5
    MEGALM_FAULTS="stop:rank=2,step=3"              # SIGSTOP it there (a hung process)
    MEGALM_FAULTS="delay:rank=1,seconds=0.2"        # a straggler: sleep 0.2 s at the start of every step
    MEGALM_FAULTS="skip_collective:rank=1,step=4"   # rank 1 skips the stop agreement after step 4
    MEGALM_FAULTS="skip_collective:rank=1,step=4,at=save_gather"   # ... or the commit gather of step 4's save
    MEGALM_FAULTS="hang:rank=0,step=2"              # rank 0 stops making progress but keeps its heartbeat
    MEGALM_FAULTS="nan:rank=1,step=3"               # rank 1's loss of step 3 is NaN (and so its gradients)
    MEGALM_FAULTS="nan_grad:rank=1,step=3"          # rank 1's gradients of step 3 are NaN, its loss finite
    MEGALM_FAULTS="corrupt:rank=0,step=4"           # flip a byte of rank 0's shard of step 4 once it is on disk
    MEGALM_FAULTS="truncate:rank=1,step=4"          # cut 100 bytes off rank 1's shard of step 4 (silent damage)

    MEGALM_FAULTS="kill:rank=0,step=4,at=save_rename"   # SIGKILL rank 0 inside the save of step 4, before
                                                       # the rename (kill, stop and delay take at=POINT)

``rank`` defaults to every rank and ``step`` to every step. The points where a fault can strike are named
(``step_start``, ``stop_agreement``, ``loss``, ``gradient``, and inside a save: ``save_begin``, ``save_piece`` (with
``piece=K``: before the rank's K-th tensor), ``save_hashed``, ``save_durable``, ``save_manifest``, ``save_rename``,
``save_pointer``, ``save_marker``, ``save_prune``, and ``save_gather``: the collective gather of every rank's
report that decides the commit); each action has its own point unless ``at=`` names one (``skip_collective``: a
collective point, ``stop_agreement`` or ``save_gather``).
Unknown actions, keys or points are an error naming them, so a typo never rehearses nothing.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

ACTIONS = {"kill": "step_start", "stop": "step_start", "delay": "step_start", "hang": "step_start",
           "skip_collective": "stop_agreement", "nan": "loss", "nan_grad": "gradient", "corrupt": "save_durable",
           "truncate": "save_durable"}
KEYS = {"rank", "step", "seconds", "at", "piece"}
SAVE_POINTS = ("save_begin", "save_piece", "save_hashed", "save_durable", "save_manifest", "save_rename",
               "save_pointer", "save_marker", "save_prune")
COLLECTIVE_POINTS = ("stop_agreement", "save_gather")        # where skip_collective can strike
POINTS = ("step_start", "loss", "gradient", *COLLECTIVE_POINTS, *SAVE_POINTS)


@dataclass(frozen=True)
class Fault:
    action: str
    rank: int | None = None
    step: int | None = None
    seconds: float = 0.0
    at: str | None = None            # the point, when not the action's own (kill and stop: any point)
    piece: int | None = None         # save_piece: before the rank's piece number ``piece`` (0-based)

    def applies(self, point: str, rank: int, step: int, piece: int | None = None) -> bool:
        return ((self.at or ACTIONS[self.action]) == point and self.rank in (None, rank)
                and self.step in (None, step) and self.piece in (None, piece))


def parse(text: str | None) -> tuple[Fault, ...]:
    faults = []
    for item in filter(None, (part.strip() for part in (text or "").split(";"))):
        action, _, args = item.partition(":")
        if action not in ACTIONS:
            raise ValueError(f"MEGALM_FAULTS: unknown fault {action!r} in {item!r}; known: {', '.join(ACTIONS)}")
        values = {}
        for pair in filter(None, args.split(",")):
            key, _, value = pair.partition("=")
            if key not in KEYS:
                raise ValueError(f"MEGALM_FAULTS: unknown key {key!r} in {item!r}; known: {', '.join(sorted(KEYS))}")
            values[key] = float(value) if key == "seconds" else value if key == "at" else int(value)
        if values.get("at") not in (None, *POINTS):
            raise ValueError(f"MEGALM_FAULTS: unknown point at={values['at']} in {item!r}; known: {', '.join(POINTS)}")
        if action == "skip_collective" and values.get("at") not in (None, *COLLECTIVE_POINTS):
            raise ValueError(f"MEGALM_FAULTS: skip_collective strikes at a collective, not at={values['at']} in "
                             f"{item!r}; known: {', '.join(COLLECTIVE_POINTS)}")
        if values.get("at") and action not in ("kill", "stop", "delay", "skip_collective"):
            raise ValueError(f"MEGALM_FAULTS: {action} strikes at its own point ({ACTIONS[action]}); at= is for "
                             f"kill, stop, delay and skip_collective")
        faults.append(Fault(action, **values))
    return tuple(faults)


def _damage(path, how: str) -> None:
    """Silent disk damage after the file was written and hashed: one flipped byte, or 100 bytes cut off."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if how == "truncate":
            f.truncate(max(0, size - 100))
        elif size:
            f.seek(size // 2)
            byte = f.read(1)
            f.seek(size // 2)
            f.write(bytes([byte[0] ^ 0xFF]))


_planned: tuple[Fault, ...] | None = None          # read from the environment at the first strike


def strike(point: str, rank: int, step: int, piece: int | None = None, path=None) -> bool:
    """Carry out the faults planned for this point; returns True when the caller should skip what it was about to
    do (skip_collective) or poison it (nan). One test of an empty tuple when nothing is planned."""
    global _planned
    if _planned is None:
        _planned = parse(os.environ.get("MEGALM_FAULTS"))
    if not _planned:
        return False
    skip = False
    for fault in _planned:
        if not fault.applies(point, rank, step, piece):
            continue
        if fault.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault.action == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif fault.action == "delay":
            time.sleep(fault.seconds)
        elif fault.action == "hang":
            while True:
                time.sleep(3600)
        elif fault.action in ("skip_collective", "nan", "nan_grad"):
            skip = True
        elif fault.action in ("corrupt", "truncate") and path is not None:
            _damage(path, fault.action)
    return skip
