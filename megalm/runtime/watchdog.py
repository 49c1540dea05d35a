"""A heartbeat outside the collectives, so that every rank learns within seconds that another died or stopped.

gloo cannot abort a pending collective, and NCCL's own watchdog waits minutes: when a rank is killed, stopped
(SIGSTOP) or loses its host, the others would hang in the next collective. Here every rank's daemon thread
writes a heartbeat (a counter, its last completed step, what it is doing) to the process group's store every
``interval`` seconds and watches one neighbour (rank + 1 mod world), so each rank makes three store operations
per interval whatever the world size. A neighbour whose counter has not moved for ``timeout`` seconds (measured
on the watcher's own clock: no clocks are compared across hosts) is reported under one key that every rank
polls; every surviving rank then prints which rank it was (number, host, local rank), its last completed step
and the operation it was in, and leaves with ``EXIT_PEER_LOST``. A rank that keeps beating but makes no progress
for ``stall_timeout`` seconds is reported the same way.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

import torch.distributed as dist

EXIT_PEER_LOST = 14
FAILED_KEY = "megalm/watchdog/failed"


def _beat_key(rank: int) -> str:
    return f"megalm/watchdog/beat/{rank}"


def default_store():
    """The store the default process group rendezvoused through (TCPStore under torchrun/srun/mpirun, the
    FileStore of the test harness); None where torch keeps it out of reach."""
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


class Watchdog:
    def __init__(self, store, rank: int, world: int, local_rank: int, timeout: float, interval: float | None = None,
                 stall_timeout: float = 0.0, exit=os._exit):
        self.store, self.rank, self.world = store, rank, world
        self.timeout, self.stall_timeout = timeout, stall_timeout
        self.interval = interval or max(0.1, min(1.0, timeout / 5))
        self.me = {"host": socket.gethostname(), "local_rank": local_rank}
        self.step, self.op, self.beats = 0, "starting", 0
        self.bounded, self.slowest_step = False, 0.0
        self._exit, self._stop = exit, threading.Event()
        self._thread = threading.Thread(target=self._run, name="megalm-watchdog", daemon=True)

    def note(self, op: str, step: int | None = None, bounded: bool = False, slowest_step: float | None = None) -> None:
        """What this rank is doing now (and, when given, the last step it completed); cheap, no I/O. ``bounded``:
        the operation takes about one training step (a step, the stop agreement), so a rank in it for ten times
        its slowest step (at least three heartbeat timeouts) is reported as stuck, before ``stall_timeout``."""
        self.op, self.bounded = op, bounded
        if step is not None:
            self.step = step
        if slowest_step is not None:
            self.slowest_step = slowest_step

    def start(self) -> "Watchdog":
        self._publish()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Leave cleanly: the neighbour's watcher sees "finished" and stops watching this rank."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5 * self.interval)
        self.op = "finished"
        try:
            self._publish()
        except (RuntimeError, OSError, ValueError):
            pass

    def explain(self, error: BaseException) -> None:
        """A collective failed (gloo notices a closed connection at once): give the heartbeat up to twice its
        timeout to name the rank that is gone, and leave with that message; returns if no rank is missing."""
        deadline = time.monotonic() + 2 * self.timeout + 2 * self.interval
        self.op = f"{self.op} (failed: {type(error).__name__})"
        while time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(self.interval)

    def _publish(self) -> None:
        self.beats += 1
        record = {"beat": self.beats, "step": self.step, "op": self.op, "bounded": self.bounded,
                  "slowest": self.slowest_step, **self.me}
        self.store.set(_beat_key(self.rank), json.dumps(record))

    def _run(self) -> None:
        neighbour = (self.rank + 1) % self.world
        seen, seen_at, progress, progress_at = None, time.monotonic(), None, time.monotonic()
        while not self._stop.wait(self.interval):
            try:
                self._publish()
                if self.store.check([FAILED_KEY]):
                    return self._leave(self.store.get(FAILED_KEY).decode())
                now = time.monotonic()
                record = self._read(neighbour)
                if record is not None and record["op"] == "finished":
                    continue                                      # it left cleanly; nothing to watch
                if record is not None and record["beat"] != seen:
                    seen, seen_at = record["beat"], now
                if record is not None and (record["step"], record["op"]) != progress:
                    progress, progress_at = (record["step"], record["op"]), now
                if now - seen_at > self.timeout:
                    self._report(neighbour, record, f"stopped responding {now - seen_at:.1f}s ago")
                elif record is not None and now - progress_at > self._allowance(record):
                    self._report_stall(neighbour, record, now - progress_at)
            except (RuntimeError, OSError, ValueError) as e:          # the store itself is gone
                if self._stop.is_set():
                    return
                return self._leave(f"the rendezvous store stopped answering ({type(e).__name__}: {e}); the rank "
                                   f"hosting it (rank 0, or the launcher's agent) has probably died")

    def _allowance(self, record: dict) -> float:
        limit = self.stall_timeout or float("inf")
        if record.get("bounded") and record.get("slowest"):
            limit = min(limit, max(3 * self.timeout, 10 * record["slowest"]))
        return limit

    def _report_stall(self, rank: int, record: dict, seconds: float) -> None:
        """Every rank may be stuck when one skipped a collective: read every rank's record (once, on failure) and
        name the ranks in a different operation from the rest, when there are such."""
        records = {r: self._read(r) for r in range(self.world)}
        groups: dict = {}
        for r, rec in records.items():
            groups.setdefault((rec["step"], rec["op"]) if rec else None, []).append(r)
        what = f"made no progress for {seconds:.0f}s"
        if len(groups) > 1:
            odd = min(groups.values(), key=len)
            rest = max(groups.items(), key=lambda kv: len(kv[1]))
            rank, record = odd[0], records[odd[0]]
            what += (f"; {len(odd)} rank(s) ({', '.join(map(str, odd[:8]))}) were in a different operation from "
                     f"the {len(rest[1])} in '{rest[0][1] if rest[0] else '?'}' after step "
                     f"{rest[0][0] if rest[0] else '?'}: a rank that skipped or repeated a collective")
        self._report(rank, record, what)

    def _read(self, rank: int) -> dict | None:
        if not self.store.check([_beat_key(rank)]):
            return None
        return json.loads(self.store.get(_beat_key(rank)))

    def _report(self, rank: int, record: dict | None, what: str) -> None:
        where = (f"host {record['host']}, local rank {record['local_rank']}; its last completed step was "
                 f"{record['step']}, last in: {record['op']}") if record else "it never sent a heartbeat"
        message = f"rank {rank} ({where}) {what}"
        self.store.set(FAILED_KEY, message)
        self._leave(message)

    def _leave(self, message: str) -> None:
        print(f"megalm: error (rank {self.rank} on {self.me['host']}, step {self.step}, in: {self.op}): {message}; "
              f"stopping this rank (the last committed checkpoint is intact)", file=sys.stderr, flush=True)
        self._exit(EXIT_PEER_LOST)


def start_watchdog(info, timeout: float, stall_timeout: float = 0.0) -> Watchdog | None:
    """A started watchdog for this rank, or None (a world of one, the watchdog off, or no store in reach)."""
    store = default_store() if dist.is_initialized() else None
    if info.world_size == 1 or timeout <= 0 or store is None:
        return None
    return Watchdog(store, info.rank, info.world_size, info.local_rank, timeout, stall_timeout=stall_timeout).start()
