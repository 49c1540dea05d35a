"""SIGKILL at every named point of a save, synchronous or asynchronous, on 4 ranks (tp 2 x dp 2): every restart
loads the newest committed checkpoint, re-saves the steps that were lost and ends with the losses of an
uninterrupted run, bit for bit; no rank hangs. The default suite strikes 7 points (about 80 s); MEGALM_STRESS=1
strikes 200 distinct ones (about 40 min on 2 cores)."""
from __future__ import annotations

import collections
import itertools
import os
import random

import pytest

from megalm.checkpoint.format import committed_checkpoints, latest_checkpoint
from megalm.checkpoint.load import CheckpointReader
from megalm.runtime.faults import SAVE_POINTS
from megalm.runtime.watchdog import EXIT_PEER_LOST
from megalm.train.metrics import read_metrics
from tests.conftest import tiny_overrides
from tests.distributed.test_fault_trials import Zygote, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]
WORLD, STEPS = 4, 6
RANK0_ONLY = ("save_manifest", "save_rename", "save_pointer", "save_marker", "save_prune")
WRITERS_ONLY = ("save_piece", "save_hashed", "save_durable")     # data-parallel rank 0 writes: ranks 0 and 1


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def _launch(zygote, prefix, folder, faults: str, asynchronous: bool = True) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    args = ["train", *tiny_overrides(prefix, folder / "run", **{
        "train.steps": STEPS, "checkpoint.interval": 2, "checkpoint.keep": 10, "parallel.tp": 2,
        "train.micro_batch_size": 1, "train.global_batch_size": 4, "train.log_interval": 1,
        "parallel.heartbeat_timeout": 2.0, "checkpoint.async_save": str(asynchronous).lower()})]
    port, pids = free_port(), {}
    tag = len(list(folder.glob("rank0*.out")))
    for rank in range(WORLD):
        env = {"RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "MEGALM_FAULTS": faults, "OMP_NUM_THREADS": "1"}
        pids[rank] = zygote.spawn(env, args, folder / f"rank{rank}.{tag}.out", folder / f"rank{rank}.{tag}.err")
    exits = zygote.wait(list(pids.values()), 120)
    missing = [r for r, p in pids.items() if p not in exits]
    for r in missing:
        os.kill(pids[r], 9)
    zygote.wait(list(pids.values()), 30)
    assert not missing, f"ranks {missing} hung ({faults})"
    return {rank: exits[pid][0] for rank, pid in pids.items()}


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}     # the last record per step


@pytest.fixture(scope="module")
def reference(zygote, tiny_corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    assert set(_launch(zygote, tiny_corpus, folder, "").values()) == {0}
    return _losses(folder / "run")


def _points(count: int, seed: int = 0) -> list[dict]:
    """Distinct (point, rank, step, piece) moments; pieces are the tensors a rank writes (at least 5 here)."""
    every = []
    for point, step in itertools.product(SAVE_POINTS, (2, 4, 6)):
        ranks = (0,) if point in RANK0_ONLY else (0, 1) if point in WRITERS_ONLY else range(WORLD)
        pieces = range(16) if point == "save_piece" else (None,)
        every += [{"at": point, "rank": r, "step": step, "piece": k, "async": a}
                  for r in ranks for k in pieces for a in (False, True)]
    random.Random(seed).shuffle(every)
    return every[:count]


# The default suite: one moment per kind of point (writers' pieces, hashing and fsync, rank 0's commit steps).
DEFAULT = [{"at": "save_begin", "rank": 3, "step": 4, "async": True},
           {"at": "save_piece", "rank": 1, "step": 4, "piece": 1, "async": True},
           {"at": "save_durable", "rank": 0, "step": 2, "async": False},
           {"at": "save_manifest", "rank": 0, "step": 4, "async": True},
           {"at": "save_rename", "rank": 0, "step": 4, "async": False},
           {"at": "save_marker", "rank": 0, "step": 4, "async": True},
           {"at": "save_prune", "rank": 0, "step": 4, "async": False}]


def _trial(zygote, prefix, folder, point: dict, reference) -> str:
    spec = ",".join(f"{k}={v}" for k, v in point.items() if v is not None and k != "async")
    point = {"piece": None, **point}
    first = _launch(zygote, prefix, folder, f"kill:{spec}", point["async"])
    victim = point["rank"]
    assert first[victim] == -9, (point, first)
    others = {r: s for r, s in first.items() if r != victim}
    assert set(others.values()) <= {EXIT_PEER_LOST, 0}, (point, first)
    before = latest_checkpoint(folder / "run")
    second = _launch(zygote, prefix, folder, "", point["async"])
    assert set(second.values()) == {0}, (point, second, (folder / "rank0.1.err").read_text()[-2000:])
    assert _losses(folder / "run") == reference, point                    # bit for bit, every step
    saved = sorted(c.name for c in committed_checkpoints(folder / "run"))
    assert saved == ["step_0000002", "step_0000004", "step_0000006"], (point, saved)
    for c in committed_checkpoints(folder / "run"):
        CheckpointReader(c)                                               # every re-saved step verifies
    resumed = (folder / "rank0.1.out").read_text()
    expected_from = before.name if before else None
    if expected_from:
        assert f"resuming from {folder / 'run' / 'checkpoints' / expected_from}" in resumed, point
    kind = "async" if point["async"] else "sync"
    return f"{kind} save, killed at {point['at']}: resumed from {expected_from or 'scratch'}"


def test_kill_at_every_save_point_then_restart_continues_exactly(zygote, tiny_corpus, tmp_path, reference):
    stress = os.environ.get("MEGALM_STRESS") == "1"
    points = _points(200) if stress else DEFAULT
    outcomes = collections.Counter(_trial(zygote, tiny_corpus, tmp_path / f"t{i}", p, reference)
                                   for i, p in enumerate(points))
    print(f"{len(points)} kill points:")
    for outcome, n in sorted(outcomes.items()):
        print(f"  {n:4d}  {outcome}")
    assert sum(outcomes.values()) == len(points)
