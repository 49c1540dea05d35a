"""Find this process's rank and the world from whichever launcher started it, and join the process group.

Understood launchers: torchrun and the ``deepspeed`` launcher (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT),
SLURM's srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODELIST) and OpenMPI's mpirun
(OMPI_COMM_WORLD_*). A bare ``python -m megalm`` is a world of one and never touches torch.distributed.
"""
from __future__ import annotations

import datetime
import os
import re
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=10, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # "node[01-04],other" -> "node01" without scontrol
    m = re.match(r"([^\[,]+)(?:\[(\d+))?", nodelist)
    return (m.group(1) + (m.group(2) or "")) if m else "127.0.0.1"


def discover(env: dict | None = None) -> LaunchInfo:
    """Read rank and world from the environment the launcher left."""
    env = os.environ if env is None else env
    port = int(env.get("MASTER_PORT", 29500))
    if dist.is_initialized():   # the caller (a test harness, a notebook) already joined a group: use it
        return LaunchInfo(dist.get_rank(), dist.get_world_size(), int(env.get("LOCAL_RANK", dist.get_rank())),
                          env.get("MASTER_ADDR", "127.0.0.1"), port, "preinitialized")
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                          env.get("MASTER_ADDR", "127.0.0.1"), port, "torchrun/deepspeed")
    # mpirun's own variables first: an mpirun inside an sbatch allocation inherits the batch step's SLURM_*
    if "OMPI_COMM_WORLD_RANK" in env:
        return LaunchInfo(int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                          int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)), env.get("MASTER_ADDR", "127.0.0.1"),
                          port, "mpirun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_NODELIST", "127.0.0.1"))
        return LaunchInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                          addr, port, "slurm")
    return LaunchInfo(0, 1, 0, "127.0.0.1", port, "single")


def device_for(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(timeout_s: float = 600.0) -> tuple[LaunchInfo, torch.device]:
    """Join the default process group (NCCL on CUDA, gloo on CPU) unless this is a world of one."""
    info = discover()
    device = device_for(info.local_rank)
    if info.world_size > 1 and not dist.is_initialized():
        # Exported so that DeepSpeed and torch's env:// agree with what we found (SLURM and mpirun set none).
        for key, value in (("RANK", info.rank), ("WORLD_SIZE", info.world_size), ("LOCAL_RANK", info.local_rank),
                           ("MASTER_ADDR", info.master_addr), ("MASTER_PORT", info.master_port)):
            os.environ.setdefault(key, str(value))
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=info.rank, world_size=info.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return info, device
