"""Joining the world, with a deadline that names who never came, through a store that outlives any one rank.

torch's env:// rendezvous waits for a missing rank until the process-group timeout and then says only how many
joined. Here every rank connects to one TCPStore, announces itself under its own key and counts itself in; the
last to arrive opens the gate every rank waits at (three store operations per rank, whatever the world size).
When ``parallel.join_timeout`` passes first, rank 0 reads which keys are missing (once, on failure) and every
rank stops with one line saying what is known.

The store is hosted by torchrun's agent when there is one; otherwise by a small process forked from rank 0, so
that a rank 0 that is stopped (SIGSTOP) or killed does not take the store, and with it every other rank's
heartbeat, down. That process ignores the signals meant for training (a preempted job still saves), leaves with
rank 0 when rank 0 ends normally, and otherwise lingers long enough for the heartbeat to name rank 0.
"""
from __future__ import annotations

import atexit
import datetime
import os
import signal
import socket
import sys
import time

import torch.distributed as dist

from megalm.runtime.env import LaunchInfo
from megalm.runtime.watchdog import EXIT_PEER_LOST


def join(info: LaunchInfo, timeout_s: float, linger_s: float = 30.0):
    """The store every rank of this attempt shares, once all ``info.world_size`` ranks have joined it."""
    timeout = datetime.timedelta(seconds=timeout_s)
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    where = f"{info.master_addr}:{info.master_port}"
    if info.rank == 0 and not agent:
        _host_store(info, timeout, linger_s)
    try:
        store = dist.TCPStore(info.master_addr, info.master_port, None, False, timeout, multi_tenant=True)
    except (RuntimeError, OSError, ValueError) as error:
        host = "torchrun's agent" if agent else "rank 0"
        _fail(info, f"could not reach the rendezvous at {where} (hosted by {host}) within {timeout_s:g}s "
                    f"(parallel.join_timeout): {host} never started, or {info.master_addr} does not resolve or "
                    f"cannot be reached from here ({type(error).__name__}: {str(error).splitlines()[0][:200]})")
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"megalm/join/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{attempt}", store)
    store.set(f"rank/{info.rank}", socket.gethostname())
    if store.add("count", 1) == info.world_size:
        store.set("all", "1")
    try:
        store.wait(["all"], timeout)
    except (RuntimeError, OSError, ValueError):
        joined = store.add("count", 0)
        missing = "; rank 0 names the missing ranks"
        if info.rank == 0:
            absent = [r for r in range(info.world_size) if not store.check([f"rank/{r}"])]
            shown = ", ".join(map(str, absent[:20])) + (f" and {len(absent) - 20} more" if len(absent) > 20 else "")
            missing = f"; missing: rank{'s' if len(absent) > 1 else ''} {shown}"
        _fail(info, f"only {joined} of {info.world_size} ranks joined the rendezvous at {where} within "
                    f"{timeout_s:g}s (parallel.join_timeout){missing}. Check that the launcher started "
                    f"{info.world_size} processes (its task or process count) and that each can reach {where}")
    return store


def _host_store(info: LaunchInfo, timeout: datetime.timedelta, linger_s: float) -> None:
    """Fork the process that hosts the TCPStore; return once it listens (or stop, naming the port)."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:                                            # the store's process: no torch work, no threads
        try:
            os.close(ready_r)
            null = os.open(os.devnull, os.O_RDWR)           # hold no launcher's pipe open while lingering
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP):
                signal.signal(signum, signal.SIG_IGN)
            store = dist.TCPStore(info.master_addr, info.master_port, None, True, timeout,
                                  wait_for_workers=False, multi_tenant=True)
            os.write(ready_w, b"1")
            os.close(ready_w)
            parent = os.getppid()
            while os.getppid() == parent:
                time.sleep(0.5)
            time.sleep(linger_s)                            # rank 0 died: let the heartbeat name it first
            del store
        finally:
            os._exit(0)
    os.close(ready_w)
    ready = os.read(ready_r, 1)
    os.close(ready_r)
    if not ready:
        os.waitpid(pid, 0)
        _fail(info, f"could not host the rendezvous on port {info.master_port} of {socket.gethostname()}: the "
                    f"port is probably in use (another job?); set MASTER_PORT to a free port")
    atexit.register(_end_store, pid)


def _end_store(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def _fail(info: LaunchInfo, message: str) -> None:
    print(f"megalm: error ({info.where()}, step 0, in: joining): {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_PEER_LOST)
