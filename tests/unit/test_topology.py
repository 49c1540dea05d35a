"""The rank grid of ``build_topology`` and the launcher discovery of ``discover``, without starting processes.

``build_topology`` reads the world from torch.distributed and calls ``new_group`` for every group; here a
stand-in for torch.distributed plays rank r of a world of 8, records those calls and returns each group as its
rank list, so every rank's coordinates and groups can be checked in one process. The expected groups are
written out by hand from the layout ``arange(world).view(pp, dp, tp)``, not recomputed by the same formula.
"""
import subprocess
from types import SimpleNamespace

import pytest

from megalm.config import ConfigError
from megalm.config.rules import data_parallel_size
from megalm.parallel import topology
from megalm.parallel.topology import build_topology
from megalm.runtime import env as launch
from megalm.runtime.env import LaunchInfo, discover


class FakeDist:
    """torch.distributed as rank ``rank`` of ``world`` sees it; a group is the tuple of its ranks."""

    def __init__(self, rank: int, world: int, initialized: bool = True):
        self.rank, self.world, self.initialized = rank, world, initialized
        self.new_group_calls = []

    def is_initialized(self) -> bool:
        return self.initialized

    def get_world_size(self) -> int:
        return self.world

    def get_rank(self) -> int:
        return self.rank

    def new_group(self, ranks):
        self.new_group_calls.append(list(ranks))
        return tuple(ranks)


def topology_of(monkeypatch, rank, world, tp, pp, dp=None):
    fake = FakeDist(rank, world)
    monkeypatch.setattr(topology, "dist", fake)
    return build_topology(tp, pp, dp), fake.new_group_calls


# world 8, tp = 2, pp = 2, dp = 2: rank = 4 * pp_rank + 2 * dp_rank + tp_rank
COORDS_8 = {0: (0, 0, 0), 1: (0, 0, 1), 2: (0, 1, 0), 3: (0, 1, 1),
            4: (1, 0, 0), 5: (1, 0, 1), 6: (1, 1, 0), 7: (1, 1, 1)}
GROUPS_8 = {
    "tp_group": [(0, 1), (2, 3), (4, 5), (6, 7)],                 # neighbours: same node, fastest links
    "dp_group": [(0, 2), (1, 3), (4, 6), (5, 7)],
    "pp_group": [(0, 4), (1, 5), (2, 6), (3, 7)],
    "mp_group": [(0, 1, 4, 5), (2, 3, 6, 7)],                     # tp x pp of one data-parallel replica
    "embed_group": [(0, 4), (1, 5), (2, 6), (3, 7)],              # first and last stage (pp = 2: the pp group)
}


def group_containing(groups, rank):
    (group,) = [g for g in groups if rank in g]
    return group


@pytest.mark.parametrize("rank", range(8))
def test_world8_coordinates_and_groups(monkeypatch, rank):
    topo, _ = topology_of(monkeypatch, rank, 8, tp=2, pp=2)
    assert (topo.tp, topo.pp, topo.dp, topo.world_size) == (2, 2, 2, 8)
    assert topo.coords == COORDS_8[rank]
    assert (topo.pp_rank, topo.dp_rank, topo.tp_rank) == COORDS_8[rank]
    assert topo.is_first_stage == (rank < 4) and topo.is_last_stage == (rank >= 4)
    assert [topo.stage_rank(p) for p in range(2)] == list(group_containing(GROUPS_8["pp_group"], rank))
    for attr, groups in GROUPS_8.items():
        assert getattr(topo, attr) == group_containing(groups, rank), attr
    handle = topo.tensor_parallel
    assert (handle.group, handle.size, handle.rank) == (group_containing(GROUPS_8["tp_group"], rank), 2, rank % 2)
    assert topo.describe() == f"rank {rank}/8: pp {rank // 4}/2 dp {rank // 2 % 2}/2 tp {rank % 2}/2"


def test_world8_every_rank_creates_the_same_groups_in_the_same_order(monkeypatch):
    """new_group is collective: every rank must call it with the same ranks in the same order."""
    calls = [topology_of(monkeypatch, rank, 8, tp=2, pp=2)[1] for rank in range(8)]
    assert all(c == calls[0] for c in calls)
    assert sorted(tuple(c) for c in calls[0]) == sorted(g for groups in GROUPS_8.values() for g in groups)


def test_world8_tp2_pp4_embedding_group_joins_first_and_last_stage(monkeypatch):
    """pp = 4, dp = 1: rank = 2 * pp_rank + tp_rank; the embedding group skips the middle stages."""
    expected_embed = {0: (0, 6), 1: (1, 7), 6: (0, 6), 7: (1, 7)}
    for rank in range(8):
        topo, _ = topology_of(monkeypatch, rank, 8, tp=2, pp=4)
        assert topo.coords == (rank // 2, 0, rank % 2)
        assert topo.dp_group is None                                  # an axis of size 1 has no group
        assert topo.pp_group == (rank % 2, rank % 2 + 2, rank % 2 + 4, rank % 2 + 6)
        assert topo.mp_group == tuple(range(8))
        assert topo.embed_group == expected_embed.get(rank)           # middle stages hold no embedding


def test_world8_pp1_has_no_pipeline_or_embedding_group(monkeypatch):
    """tp = 4, pp = 1, dp = 2: rank = 4 * dp_rank + tp_rank."""
    for rank in range(8):
        topo, _ = topology_of(monkeypatch, rank, 8, tp=4, pp=1)
        assert topo.coords == (0, rank // 4, rank % 4)
        assert topo.is_first_stage and topo.is_last_stage
        assert topo.tp_group == tuple(range(4 * (rank // 4), 4 * (rank // 4) + 4))
        assert topo.dp_group == (rank % 4, rank % 4 + 4)
        assert topo.pp_group is None and topo.embed_group is None
        assert topo.mp_group == topo.tp_group


def test_single_process_never_touches_torch_distributed(monkeypatch):
    fake = FakeDist(0, 1, initialized=False)
    monkeypatch.setattr(topology, "dist", fake)
    topo = build_topology(1, 1)
    assert fake.new_group_calls == []
    assert (topo.world_size, topo.coords) == (1, (0, 0, 0))
    assert [topo.tp_group, topo.pp_group, topo.dp_group, topo.mp_group, topo.embed_group] == [None] * 5
    assert not topo.tensor_parallel.enabled


def test_bad_layouts_name_the_numbers_and_the_fix(monkeypatch):
    """The rule book's world-size rule, which build_topology applies (no copy of it lives in topology.py)."""
    assert data_parallel_size(8, 2, 2) == 2
    with pytest.raises(ConfigError, match=r"world size 8 is not divisible by tp x pp = 3 x 1 = 3; launch a "
                                          r"multiple of 3 processes"):
        data_parallel_size(8, 3, 1)
    with pytest.raises(ConfigError, match=r"world size 8 != tp x pp x dp = 2 x 2 x 4 = 16; launch 16 processes "
                                          r"or set parallel.dp=2"):
        data_parallel_size(8, 2, 2, 4)
    with pytest.raises(ConfigError, match=r"world size 8 is not divisible by tp x pp = 3 x 1"):
        topology_of(monkeypatch, 0, 8, 3, 1)


# ---- Launcher discovery --------------------------------------------------------------------------------------

@pytest.fixture
def no_process_group(monkeypatch):
    """discover() prefers a process group already joined; these tests read the environment alone."""
    monkeypatch.setattr(launch.dist, "is_initialized", lambda: False)


def no_scontrol(*args, **kwargs):
    raise FileNotFoundError("scontrol")


def scontrol_hostnames(*args, **kwargs):
    assert args[0][:3] == ["scontrol", "show", "hostnames"]
    return SimpleNamespace(stdout="gpu03\ngpu04\ngpu05\ngpu06\nlogin1\n")


TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
            "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29501", "TORCHELASTIC_RUN_ID": "none"}
SRUN = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODELIST": "gpu[03-06],login1",
        "SLURM_JOB_ID": "42"}
MPIRUN = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
          "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_ADDR": "node7", "MASTER_PORT": "23456"}


@pytest.mark.usefixtures("no_process_group")
@pytest.mark.parametrize("env, expected", [
    ({}, LaunchInfo(0, 1, 0, "127.0.0.1", 29500, "single")),
    (TORCHRUN, LaunchInfo(3, 8, 1, "10.0.0.1", 29501, "torchrun/deepspeed")),
    (MPIRUN, LaunchInfo(2, 4, 0, "node7", 23456, "mpirun")),
    ({**SRUN, "MASTER_ADDR": "gpu03", "MASTER_PORT": "20042"},          # train.sbatch exports both
     LaunchInfo(5, 8, 1, "gpu03", 20042, "slurm")),
    # torchrun.sbatch: srun starts one torchrun per node; torchrun's RANK, not the srun task, is the rank
    ({**SRUN, "SLURM_PROCID": "1", "SLURM_NTASKS": "2", **TORCHRUN},
     LaunchInfo(3, 8, 1, "10.0.0.1", 29501, "torchrun/deepspeed")),
    ({"PMI_RANK": "6", "PMI_SIZE": "8", "MPI_LOCALRANKID": "2", "MASTER_ADDR": "node2"},     # MPICH's hydra
     LaunchInfo(6, 8, 2, "node2", 29500, "mpiexec (PMI)")),
], ids=["bare", "torchrun", "mpirun", "srun", "torchrun-under-srun", "mpich"])
def test_discover(monkeypatch, env, expected):
    monkeypatch.setattr(launch, "subprocess", SimpleNamespace(run=no_scontrol,
                                                              SubprocessError=subprocess.SubprocessError))
    assert discover(env=env) == expected


@pytest.mark.usefixtures("no_process_group")
@pytest.mark.parametrize("run, host", [(scontrol_hostnames, "gpu03"), (no_scontrol, "gpu03")],
                         ids=["scontrol", "without-scontrol"])
def test_discover_srun_takes_the_first_host_of_the_allocation(monkeypatch, run, host):
    monkeypatch.setattr(launch, "subprocess", SimpleNamespace(run=run, SubprocessError=subprocess.SubprocessError))
    assert discover(env=SRUN) == LaunchInfo(5, 8, 1, host, 29500, "slurm")


@pytest.mark.usefixtures("no_process_group")
@pytest.mark.parametrize("nodelist, host", [("node[01-04],other", "node01"), ("a1,a2", "a1"), ("solo", "solo"),
                                            ("rack2-n[7,9-12]", "rack2-n7")])
def test_first_slurm_host_without_scontrol(monkeypatch, nodelist, host):
    monkeypatch.setattr(launch, "subprocess", SimpleNamespace(run=no_scontrol,
                                                              SubprocessError=subprocess.SubprocessError))
    assert discover(env={**SRUN, "SLURM_NODELIST": nodelist}).master_addr == host


@pytest.mark.usefixtures("no_process_group")
def test_discover_mpirun_inside_a_slurm_allocation():
    # mpirun run from an sbatch script: its processes inherit the batch step's SLURM_* variables.
    env = {**MPIRUN, "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_NODELIST": "gpu03"}
    assert discover(env=env) == LaunchInfo(1, 2, 1, "node7", 23456, "mpirun")


@pytest.mark.usefixtures("no_process_group")
def test_error_lines_name_the_rank_the_launcher_gave(monkeypatch, capsys):
    """Under mpirun inside an sbatch allocation every rank once said "rank 0" (SLURM_PROCID read first): the
    error reporter now reads the rank through discovery, as start-up does."""
    import socket

    from megalm.errors import report

    env = {**MPIRUN, "OMPI_COMM_WORLD_RANK": "3", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
           "SLURM_NODELIST": "gpu03"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert report(ConfigError("model.num_heads=6 is not divisible")) == 2
    line = capsys.readouterr().err.strip()
    assert line == f"megalm: error (rank 3 on {socket.gethostname()}): model.num_heads=6 is not divisible", line


def test_discover_uses_a_process_group_already_joined(monkeypatch):
    monkeypatch.setattr(launch.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(launch.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(launch.dist, "get_world_size", lambda: 2)
    assert discover(env={"MASTER_PORT": "29600"}) == LaunchInfo(1, 2, 1, "127.0.0.1", 29600, "preinitialized")
