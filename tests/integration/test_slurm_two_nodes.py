"""A real two-node SLURM (slurmctld, munge, two slurmd on this host): each launch script trains across both nodes
and equals the single-process loss curve; a preempted job and one that hits train.time_limit save, requeue,
resume by themselves and end bit-equal to an uninterrupted run."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megalm.train.metrics import read_metrics
from tests.conftest import STRESS, tiny_overrides
from tests.integration.slurm_cluster import SlurmCluster, missing_tools

ROOT = Path(__file__).resolve().parents[2]
STEPS = 12
MISSING = missing_tools() + ([] if os.geteuid() == 0 else ["root (to start slurmctld/slurmd/munged)"])
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900),
              pytest.mark.skipif(bool(MISSING), reason=f"needs SLURM and munge: missing {MISSING} "
                                 "(apt-get install slurmctld slurmd slurm-client munge)")]
# script: (sbatch arguments placing 2 ranks on each node, environment)
LAUNCHERS = {
    "train.sbatch": (["--ntasks-per-node", "2"], {}),
    "torchrun.sbatch": (["--ntasks-per-node", "1", "--cpus-per-task", "2"], {"NPROC_PER_NODE": "2"}),
    "deepspeed.sbatch": (["--ntasks-per-node", "2"], {}),
    "mpirun.sbatch": (["--ntasks-per-node", "2"], {}),
}
# tp within a node and dp across the two; pp across the nodes (stage 0 on the first node's ranks)
LAYOUTS = {"tp2-dp2": {"parallel.tp": 2}, "pp2-dp2": {"parallel.pp": 2}}
# every launcher at tp2-dp2, pp across the nodes under one (all four with MEGALM_STRESS=1)
JOBS = [(script, layout) for script in LAUNCHERS for layout in LAYOUTS
        if STRESS or layout == "tp2-dp2" or script == "train.sbatch"]
TIMINGS: dict = {}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2).start()
    yield c
    c.stop()
    if TIMINGS:
        print("\nlaunch timings (s): " + json.dumps(TIMINGS, indent=1))


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r and "val_loss" not in r]


def overrides(prefix, run_dir, layout: str, **extra) -> list[str]:
    return tiny_overrides(prefix, run_dir, **{"train.steps": STEPS, "train.log_interval": 1,
                                              **LAYOUTS[layout], **extra})


@pytest.fixture(scope="module")
def single_process(tiny_corpus, tmp_path_factory) -> list[float]:
    run_dir = tmp_path_factory.mktemp("single")
    command = [sys.executable, "-m", "megalm", "train", "--config", "configs/tiny.yaml"]
    proc = subprocess.run(command + overrides(tiny_corpus, run_dir, "tp2-dp2", **{"parallel.tp": 1}), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return losses(run_dir)


def submit(cluster, script: str, args: list[str], log: Path, extra_env: dict | None = None) -> str:
    sbatch_args, env = LAUNCHERS[script]
    env = {**env, **(extra_env or {})}
    cluster.env.update(env)
    try:
        return cluster.submit(["--nodes", "2", *sbatch_args, "--output", str(log), "--chdir", str(ROOT),
                               f"launch_scripts/slurm/{script}", "configs/tiny.yaml", *args])
    finally:
        for key in env:
            cluster.env.pop(key, None)


def first_step_after(run_dir: Path, since: float, job_alive, timeout: float = 300) -> float:
    """Seconds from ``since`` until metrics.jsonl holds a step it did not hold before."""
    metrics, before = run_dir / "metrics.jsonl", len(losses(run_dir)) if (run_dir / "metrics.jsonl").exists() else 0
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and len(losses(run_dir)) > before:
            return time.time() - since
        assert job_alive(), "the job ended before training"
        time.sleep(0.1)
    raise TimeoutError("no training step")


def run_job(cluster, script, args, tmp_path) -> tuple[dict, str]:
    log = tmp_path / "job.out"
    started = time.time()
    job = submit(cluster, script, args, log)
    run_dir = Path(next(a.split("=", 1)[1] for a in args if a.startswith("train.run_dir=")))
    first = first_step_after(run_dir, started, lambda: cluster.job(job).get("JobState") not in ("FAILED",
                                                                                               "CANCELLED"))
    fields = cluster.wait(job, 600)
    output = log.read_text() if log.exists() else ""
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", (fields, output[-4000:])
    assert fields["NumNodes"] == "2" and fields["NodeList"] == "megalm-n[1-2]", fields
    return {"sbatch_to_first_step_s": round(first, 1)}, output


@pytest.mark.parametrize("script,layout", JOBS)
def test_each_launcher_trains_across_two_nodes_like_one_process(cluster, tiny_corpus, single_process, tmp_path,
                                                                script, layout):
    extra = {"parallel.zero_stage": 1} if script == "deepspeed.sbatch" else {}
    timing, output = run_job(cluster, script, overrides(tiny_corpus, tmp_path / "run", layout, **extra), tmp_path)
    TIMINGS[f"{script} {layout}"] = timing
    world = "tp 2 x pp 1 x dp 2" if layout == "tp2-dp2" else "tp 1 x pp 2 x dp 2"
    assert f"world 4 = {world}" in output, output[-3000:]
    got = losses(tmp_path / "run")
    assert len(got) == STEPS
    for step, (a, b) in enumerate(zip(got, single_process), 1):
        assert math.isclose(a, b, rel_tol=1e-5), (script, layout, step, a, b)


@pytest.fixture(scope="module")
def uninterrupted(cluster, tiny_corpus, tmp_path_factory) -> dict:
    """Per launcher: the losses of an uninterrupted tp2-dp2 run (the reference a requeued run must equal)."""
    cache = {}

    def run(script):
        if script not in cache:
            folder = tmp_path_factory.mktemp("uninterrupted")
            run_job(cluster, script, overrides(tiny_corpus, folder / "run", "tp2-dp2"), folder)
            cache[script] = losses(folder / "run")
        return cache[script]
    return run


def wait_for_requeue(cluster, job, timeout=120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cluster.job(job).get("Restarts", "0") != "0":
            return
        time.sleep(0.2)
    raise TimeoutError("the job was not requeued")


@pytest.mark.parametrize("script", ["train.sbatch", "torchrun.sbatch"] if STRESS else ["train.sbatch"])
def test_a_preempted_job_saves_requeues_and_resumes_bit_exactly(cluster, tiny_corpus, uninterrupted, tmp_path,
                                                                script):
    reference = uninterrupted(script)
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = submit(cluster, script, overrides(tiny_corpus, run_dir, "tp2-dp2"), log)
    first_step_after(run_dir, time.time(), lambda: True)
    while len(losses(run_dir)) < 3:
        time.sleep(0.05)
    signalled = time.time()
    cluster.run(["scancel", "--signal=USR1", job], check=True)   # what SLURM sends before a time limit
    wait_for_requeue(cluster, job)
    stopped_at = len(losses(run_dir))
    resumed = first_step_after(run_dir, signalled, lambda: True)
    fields = cluster.wait(job, 600)
    output = log.read_text()
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", (fields, output[-4000:])
    assert "SIGUSR1 (SLURM's warning)); checkpoint saved" in output and "requeueing job" in output, output[-4000:]
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r and "val_loss" not in r]
    assert steps == list(range(1, STEPS + 1)), steps            # no step lost, none repeated
    assert losses(run_dir) == reference                          # bit-equal
    assert not (ROOT / f".megalm-stopped-{job}").exists()      # the marker was consumed by the requeue
    TIMINGS[f"preemption {script}"] = {"signal_to_requeued_first_step_s": round(resumed, 1),
                                       "stopped_after_step": stopped_at, "steps_lost": 0}


def test_train_time_limit_stops_saves_and_the_requeued_job_finishes_bit_exactly(cluster, tiny_corpus, uninterrupted,
                                                                                tmp_path):
    reference = uninterrupted("train.sbatch")
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    # every step sleeps 0.5 s (a planned delay, which changes no number), so 12 steps cannot fit in the 5 s budget
    # however fast the machine: the job must stop, save and be requeued at least once
    job = submit(cluster, "train.sbatch", overrides(tiny_corpus, run_dir, "tp2-dp2", **{
        "train.time_limit": 5.0, "train.time_limit_margin": 1.0}), log,
        extra_env={"MEGALM_FAULTS": "delay:seconds=0.5"})
    fields = cluster.wait(job, 600)
    output = log.read_text()
    assert fields["JobState"] == "COMPLETED" and int(fields["Restarts"]) >= 1, (fields, output[-4000:])
    assert "train.time_limit" in output and "nearly spent" in output, output[-4000:]
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r and "val_loss" not in r]
    assert steps == list(range(1, STEPS + 1)), steps
    assert losses(run_dir) == reference
    TIMINGS["time_limit train.sbatch"] = {"requeues": int(fields["Restarts"])}


def test_the_planners_memory_holds_across_two_nodes(cluster, tmp_path, capsys):
    """`megalm plan`'s per-rank memory against `megalm bench train --memory` launched by srun over the two nodes
    (2 tasks each): pp across the nodes with dp 2 within 10% (with MEGALM_STRESS=1 also tp2 within a node)."""
    from megalm.bench.plan_model import layout_of, memory_per_rank
    from megalm.config import load_config, resolve
    from tests.integration.test_plan_accuracy import SHAPE

    points = ["parallel.pp=2"] + (["parallel.tp=2"] if STRESS else [])
    out, log = tmp_path / "bench", tmp_path / "bench.out"
    script = tmp_path / "bench.sbatch"
    script.write_text("#!/usr/bin/env bash\nset -uo pipefail\nsource launch_scripts/slurm/common.sh\n"
                      "srun --kill-on-bad-exit=1 .venv/bin/python -m megalm bench train --steps 2 --warmup 1 "
                      f"--breakdown-steps 0 --memory --out {out} {' '.join(SHAPE)} --points "
                      + " ".join(f"'{p}'" for p in points) + "\n")
    job = cluster.submit(["--nodes", "2", "--ntasks-per-node", "2", "--output", str(log), "--chdir", str(ROOT),
                          str(script)])
    fields = cluster.wait(job, 600)
    output = log.read_text() if log.exists() else ""
    assert fields["JobState"] == "COMPLETED" and fields["NumNodes"] == "2", (fields, output[-4000:])
    rows = list(json.loads((out / "bench_train.json").read_text())["results"]["rows"].values())
    table = []
    for point, row in zip(points, rows):
        cfg = resolve(load_config("tiny", SHAPE + point.split()), 4)
        lay = layout_of(cfg, 4)
        micro = cfg.train.global_batch_size // (lay.micro_batch_size * lay.dp)
        table.append((point, memory_per_rank(cfg, lay, micro, "cpu")["total"], row["peak_tensor_bytes_max"]))
    with capsys.disabled():
        for point, predicted, measured in table:
            print(f"\ntwo nodes, {point} dp2: predicted {predicted / 2**20:.1f} MiB, measured "
                  f"{measured / 2**20:.1f} MiB ({(predicted - measured) / measured:+.1%})")
    assert len(table) == len(points)
    for point, predicted, measured in table:
        assert abs(predicted - measured) / measured < 0.10, (point, predicted, measured)
