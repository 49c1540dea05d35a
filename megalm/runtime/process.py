"""Bring a process up for a run from a resolved config: process group, device, seed, topology."""
from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megalm.config import Config
from megalm.parallel.topology import Topology, build_topology
from megalm.runtime.env import LaunchInfo, export_launch_env, pick_device
from megalm.runtime.rendezvous import join
from megalm.runtime.watchdog import Watchdog, start_watchdog


@dataclass
class Runtime:
    cfg: Config
    info: LaunchInfo
    device: torch.device
    topo: Topology
    watchdog: Watchdog | None = None

    @property
    def is_logging_rank(self) -> bool:
        return self.info.rank == 0

    def note(self, op: str, step: int | None = None, bounded: bool = False, slowest_step: float | None = None) -> None:
        """Tell the watchdog what this rank is doing (named in other ranks' messages if this one dies or sticks)."""
        if self.watchdog is not None:
            self.watchdog.note(op, step, bounded, slowest_step)


def init_process_group(info: LaunchInfo, device: torch.device, timeout_s: float, join_timeout_s: float,
                       heartbeat_timeout_s: float = 0.0) -> None:
    """Join the default group (NCCL on CUDA, gloo on CPU) unless this is a world of one or one exists. Every rank
    first joins megalm's own rendezvous (``join``), which names the ranks that never came."""
    if info.world_size == 1 or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    export_launch_env(info, nccl=backend == "nccl")
    store = join(info, join_timeout_s, linger_s=2 * heartbeat_timeout_s + 10)
    dist.init_process_group(backend, store=dist.PrefixStore("megalm/pg", store), rank=info.rank,
                            world_size=info.world_size, timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)


def start(cfg: Config, info: LaunchInfo) -> Runtime:
    """``cfg`` is resolved (validated on every rank, so every rank failed together before this point)."""
    export_launch_env(deepspeed=info.world_size > 1 or cfg.uses_deepspeed)
    device = pick_device(cfg.train.device, info.local_rank)
    init_process_group(info, device, cfg.parallel.timeout_s, cfg.parallel.join_timeout,
                       cfg.parallel.heartbeat_timeout)
    torch.manual_seed(cfg.train.seed)
    topo = build_topology(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dp, cfg.parallel.sequence_parallel)
    watchdog = start_watchdog(info, cfg.parallel.heartbeat_timeout, cfg.parallel.stall_timeout)
    return Runtime(cfg, info, device, topo, watchdog)


def finish(rt: Runtime) -> None:
    """Leave the process group, unless someone else (a test harness, a notebook) created it."""
    if rt.watchdog is not None:
        rt.watchdog.stop()
    if dist.is_initialized():
        dist.barrier()
        if rt.info.launcher != "preinitialized":
            dist.destroy_process_group()
