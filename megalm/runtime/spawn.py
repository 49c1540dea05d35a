"""Run a function on N gloo processes on this host: used by the multi-process tests and by benchmarks."""
from __future__ import annotations

import datetime
import os
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megalm.runtime.env import export_launch_env


def _worker(rank, world_size, store_path, fn, args, errors):
    """One rank. It leaves with ``os._exit`` once its result is reported and the group destroyed: a CI run saw a
    rank that had finished and passed abort during interpreter teardown ("terminate called without an active
    exception", exit -6: a C++ thread of the DeepSpeed/gloo stack destroyed while joinable), which turned a
    passing test into a failure. Nothing of the test's is left to flush at that point, so skipping the
    finalisers loses nothing and keeps the exit code the test's own."""
    export_launch_env(deepspeed=True)
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=180))
    code = 0
    try:
        fn(rank, world_size, *args)
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        errors.put((rank, traceback.format_exc()))
        code = 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_distributed(fn, world_size: int, *args, timeout_s: float = 300.0):
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` processes joined by gloo; re-raise any failure.

    ``fn`` must be a module-level function (it is pickled to the children). Results travel back through files
    or queues that the caller passes in ``args``.
    """
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(r, world_size, store_path, fn, args, errors))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout_s)
        alive = [i for i, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
        failures = []
        while not errors.empty():
            failures.append(errors.get())
        if failures:
            rank, tb = sorted(failures)[0]
            raise RuntimeError(f"rank {rank} of {world_size} failed:\n{tb}")
        if alive:
            raise TimeoutError(f"ranks {alive} of {world_size} did not finish within {timeout_s:.0f}s")
        bad = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode != 0]
        if bad:
            raise RuntimeError(f"processes exited abnormally (rank, exit code): {bad}")
