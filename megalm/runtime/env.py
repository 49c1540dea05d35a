"""Where this process stands: its rank and world from whichever launcher started it, and its device.

Understood launchers: torchrun and the ``deepspeed`` launcher (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT),
OpenMPI's mpirun (OMPI_COMM_WORLD_*, read before SLURM's, so that an mpirun inside an sbatch allocation is
read as mpirun), MPICH's and Intel MPI's mpiexec (PMI_RANK, PMI_SIZE, MPI_LOCALRANKID), other PMIx launchers
through mpi4py, and SLURM's srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODELIST). A bare
``python -m megalm`` is a world of one. Every environment variable megalm writes for other libraries
(torch's env://, DeepSpeed) is written by ``export_launch_env`` here.
"""
from __future__ import annotations

import os
import re
import socket
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

    def where(self) -> str:
        """'rank R (host H, local rank L)': how every message from a failing run names its origin."""
        return f"rank {self.rank} (host {socket.gethostname()}, local rank {self.local_rank})"


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
    """Read rank and world from the environment the launcher left (or from a group that already exists)."""
    env = os.environ if env is None else env
    port = int(env.get("MASTER_PORT", 29500))
    if dist.is_initialized():   # a test harness or a notebook already joined a group: use it
        return LaunchInfo(dist.get_rank(), dist.get_world_size(), int(env.get("LOCAL_RANK", dist.get_rank())),
                          env.get("MASTER_ADDR", "127.0.0.1"), port, "preinitialized")
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                          env.get("MASTER_ADDR", "127.0.0.1"), port, "torchrun/deepspeed")
    if "OMPI_COMM_WORLD_RANK" in env:
        return LaunchInfo(int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                          int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)), env.get("MASTER_ADDR", "127.0.0.1"),
                          port, "mpirun")
    if "PMI_RANK" in env and "PMI_SIZE" in env:          # MPICH's and Intel MPI's mpiexec (hydra)
        return LaunchInfo(int(env["PMI_RANK"]), int(env["PMI_SIZE"]),
                          int(env.get("MPI_LOCALRANKID", env.get("PMI_LOCAL_RANK", 0))),
                          env.get("MASTER_ADDR", "127.0.0.1"), port, "mpiexec (PMI)")
    if "PMIX_RANK" in env and "SLURM_PROCID" not in env:  # another PMIx launcher: ask MPI itself (mpi4py)
        return _from_mpi4py(env, port)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_NODELIST", "127.0.0.1"))
        return LaunchInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                          addr, port, "slurm")
    return LaunchInfo(0, 1, 0, "127.0.0.1", port, "single")


def _from_mpi4py(env, port: int) -> LaunchInfo:
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise ValueError("this process was started by a PMIx launcher (PMIX_RANK is set) that sets no rank "
                         "variable megalm reads; install mpi4py (pip install mpi4py) or launch with torchrun, "
                         "srun or mpirun") from error
    world = MPI.COMM_WORLD
    local = world.Split_type(MPI.COMM_TYPE_SHARED)
    return LaunchInfo(world.Get_rank(), world.Get_size(), local.Get_rank(), env.get("MASTER_ADDR", "127.0.0.1"),
                      port, "mpi4py")


def pick_device(requested: str, local_rank: int) -> torch.device:
    """``train.device`` (auto, cpu, cuda) for the process with this local rank."""
    from megalm.config import ConfigError

    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA GPU is visible; use train.device=auto or cpu")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def export_launch_env(info: LaunchInfo | None = None, deepspeed: bool = False, nccl: bool = False) -> None:
    """The variables torch's env:// rendezvous and DeepSpeed read, from what discovery found (SLURM and mpirun
    set none of them). Never overrides a value the launcher set. ``deepspeed``: also pick DeepSpeed's
    accelerator (CPU when there is no CUDA GPU)."""
    if info is not None:
        for key, value in (("RANK", info.rank), ("WORLD_SIZE", info.world_size), ("LOCAL_RANK", info.local_rank),
                           ("MASTER_ADDR", info.master_addr), ("MASTER_PORT", info.master_port)):
            os.environ.setdefault(key, str(value))
    if deepspeed:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    if nccl:          # NCCL's own watchdog tears a failed collective down instead of hanging (beside megalm's)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")


def take_local_rank_argument(value: str) -> None:
    """The ``deepspeed`` launcher passes --local_rank=N; megalm reads LOCAL_RANK, as torchrun sets it."""
    os.environ.setdefault("LOCAL_RANK", value)
