"""megalm under the launchers users run it with: torchrun, mpirun, and a real SLURM cluster (sbatch + srun)."""
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from megalm.train.metrics import read_metrics
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(prefix, run_dir):
    return tiny_overrides(prefix, run_dir, **{"train.steps": 3, "parallel.tp": 2})


def assert_trained(run_dir, steps=3):
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if "loss" in r and "val_loss" not in r][:steps] == list(range(1, steps + 1))
    assert (run_dir / "checkpoints" / "latest").exists()


def launch(script, args, env, timeout=500):
    proc = subprocess.run(["bash", str(ROOT / "launch_scripts" / script)] + args, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_torchrun(tiny_corpus, tmp_path):
    env = {**os.environ, "NPROC": "2", "MASTER_PORT": str(free_port())}
    launch("torchrun.sh", [str(ROOT / "configs/tiny.yaml")] + overrides(tiny_corpus, tmp_path), env)
    assert_trained(tmp_path)


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs OpenMPI's mpirun (apt-get install openmpi-bin)")
def test_mpirun(tiny_corpus, tmp_path):
    env = {**os.environ, "NPROC": "2", "MASTER_PORT": str(free_port()), "OMPI_MCA_btl": "self,tcp"}
    launch("mpirun.sh", [str(ROOT / "configs/tiny.yaml")] + overrides(tiny_corpus, tmp_path), env)
    assert_trained(tmp_path)


def _slurm_missing():
    from tests.integration.slurm_cluster import missing_tools

    missing = missing_tools()
    if os.geteuid() != 0:
        missing.append("root (to start slurmctld/slurmd/munged)")
    return missing


@pytest.mark.skipif(bool(_slurm_missing()), reason=f"needs SLURM and munge: missing {_slurm_missing()} "
                    "(apt-get install slurmctld slurmd slurm-client munge)")
def test_slurm_sbatch_srun(tiny_corpus, tmp_path):
    from tests.integration.slurm_cluster import SlurmCluster

    cluster = SlurmCluster(tmp_path / "slurm").start()
    try:
        run_dir = tmp_path / "run"
        log = tmp_path / "job.out"
        fields = cluster.sbatch(["--ntasks", "2", "--output", str(log), "--chdir", str(ROOT),
                                 str(ROOT / "launch_scripts/slurm/train.sbatch"), str(ROOT / "configs/tiny.yaml")]
                                + overrides(tiny_corpus, run_dir))
        output = log.read_text() if log.exists() else ""
        assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", (fields, output[-3000:])
        assert_trained(run_dir)
    finally:
        cluster.stop()


def test_deepspeed_launcher_zero2(tiny_corpus, tmp_path):
    env = {**os.environ, "NPROC": "2", "MASTER_PORT": str(free_port())}
    args = tiny_overrides(tiny_corpus, tmp_path, **{"train.steps": 3, "parallel.zero_stage": 2})
    launch("deepspeed.sh", [str(ROOT / "configs/tiny.yaml")] + args, env)
    assert_trained(tmp_path)


@pytest.mark.skipif(bool(_slurm_missing()), reason=f"needs SLURM and munge: missing {_slurm_missing()} "
                    "(apt-get install slurmctld slurmd slurm-client munge)")
def test_slurm_sbatch_torchrun_per_node(tiny_corpus, tmp_path):
    """launch_scripts/slurm/torchrun.sbatch: one torchrun per node (here one node), c10d rendezvous."""
    from tests.integration.slurm_cluster import SlurmCluster

    cluster = SlurmCluster(tmp_path / "slurm").start()
    try:
        run_dir, log = tmp_path / "run", tmp_path / "job.out"
        fields = cluster.sbatch(["--nodes", "1", "--ntasks-per-node", "1", "--cpus-per-task", "2", "--output",
                                 str(log), "--chdir", str(ROOT), str(ROOT / "launch_scripts/slurm/torchrun.sbatch"),
                                 str(ROOT / "configs/tiny.yaml")] + overrides(tiny_corpus, run_dir))
        output = log.read_text() if log.exists() else ""
        assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", (fields, output[-3000:])
        assert_trained(run_dir)
    finally:
        cluster.stop()
