"""Dead, stopped, missing, desynchronised and slow ranks, over many trials: every surviving rank stops within
the heartbeat timeout plus a small margin, names the right rank, and the last committed checkpoint still loads.

Each trial is a real 3-rank `megalm train` (ranks forked from one process that imported megalm once, see
zygote.py), with a fault from megalm's own fault facility (MEGALM_FAULTS) or a signal sent from here."""
from __future__ import annotations

import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megalm.checkpoint.format import latest_checkpoint
from megalm.checkpoint.load import CheckpointReader
from megalm.runtime.watchdog import EXIT_PEER_LOST
from megalm.train.metrics import read_metrics
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 2.0            # parallel.heartbeat_timeout of these runs
MARGIN = 4.0             # beats come every TIMEOUT/5 s; then the report, and exiting, on 2 busy cores
TRIALS = 20 if os.environ.get("MEGALM_STRESS") else 5     # the README's figures: MEGALM_STRESS=1
WORLD = 3
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Zygote:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.distributed.zygote"], cwd=ROOT, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.exits: dict[int, tuple[int, float]] = {}
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def _next(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, "the zygote ended"
        message = json.loads(line)
        if "exited" in message:
            self.exits[message["exited"]] = (message["status"], message["at"])
        return message

    def spawn(self, env: dict, args: list[str], stdout: Path, stderr: Path) -> int:
        self.proc.stdin.write(json.dumps({"env": env, "args": args, "stdout": str(stdout), "stderr": str(stderr)})
                              + "\n")
        self.proc.stdin.flush()
        while "pid" not in (message := self._next()):
            pass
        return message["pid"]

    def wait(self, pids, timeout: float) -> dict[int, tuple[int, float]]:
        deadline = time.monotonic() + timeout
        while not all(p in self.exits for p in pids) and time.monotonic() < deadline:
            self._next()
        return {p: self.exits[p] for p in pids if p in self.exits}

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


class Trial:
    """One 3-rank run; ranks[i] is rank i's pid; logs in folder/rank{i}.out|err."""

    def __init__(self, zygote, prefix, folder: Path, ranks=range(WORLD), faults: str = "", **overrides):
        self.zygote, self.folder = zygote, folder
        folder.mkdir(parents=True, exist_ok=True)
        args = ["train", *tiny_overrides(prefix, folder / "run", **{
            "train.steps": 100000, "train.micro_batch_size": 1, "train.global_batch_size": WORLD,
            "train.log_interval": 1, "checkpoint.interval": 2, "parallel.heartbeat_timeout": TIMEOUT,
            # synchronous saves: a victim struck from step 3 on always leaves step 2 committed (an asynchronous
            # save commits at a later step boundary; test_save_kill_trials covers those)
            "checkpoint.async_save": "false", **overrides})]
        port = free_port()
        self.pids = {}
        for rank in ranks:
            env = {"RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(port), "MEGALM_FAULTS": faults, "OMP_NUM_THREADS": "1"}
            self.pids[rank] = zygote.spawn(env, args, folder / f"rank{rank}.out", folder / f"rank{rank}.err")

    def wait_for_step(self, step: int, timeout: float = 120) -> None:
        log, deadline = self.folder / "rank0.out", time.monotonic() + timeout
        while time.monotonic() < deadline:
            if log.exists() and f"step {step:>6}/" in log.read_text():
                return
            assert self.pids[0] not in self.zygote.exits, self.err(0)
            time.sleep(0.05)
        raise AssertionError(f"step {step} not reached: {self.err(0)[-2000:]}")

    def err(self, rank: int) -> str:
        return (self.folder / f"rank{rank}.err").read_text()

    def kill_all(self) -> None:
        for pid in self.pids.values():
            if pid not in self.zygote.exits:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
        self.zygote.wait(list(self.pids.values()), 30)


def strike_and_measure(zygote, prefix, folder, how: str, rng) -> dict:
    victim, step = rng.randrange(WORLD), rng.randint(3, 7)
    trial = Trial(zygote, prefix, folder)
    try:
        trial.wait_for_step(step)
        os.kill(trial.pids[victim], getattr(__import__("signal"), how))
        struck = time.monotonic()
        survivors = [r for r in trial.pids if r != victim]
        exits = zygote.wait([trial.pids[r] for r in survivors], TIMEOUT + 60)
    finally:
        trial.kill_all()
    assert len(exits) == len(survivors), f"a survivor hung ({how} of rank {victim} at step {step})"
    for rank in survivors:
        status, _ = exits[trial.pids[rank]]
        err = trial.err(rank)
        assert status == EXIT_PEER_LOST, (how, victim, rank, status, err[-2000:])
        assert f"rank {victim} (host {socket.gethostname()}, local rank {victim}; its last completed step was" \
            in err, (how, victim, rank, err[-2000:])
        assert "Traceback" not in err, err[-3000:]
    latest = latest_checkpoint(folder / "run")
    assert latest is not None
    CheckpointReader(latest, verify=True)                      # the last committed checkpoint verifies
    return {"how": how, "victim": victim, "step": step,
            "detected_s": max(at for _, at in exits.values()) - struck}


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_dead_or_stopped_ranks_over_many_trials(zygote, tiny_corpus, tmp_path, how):
    rng = random.Random(how)
    results = [strike_and_measure(zygote, tiny_corpus, tmp_path / f"trial{i}", how, rng) for i in range(TRIALS)]
    times = sorted(r["detected_s"] for r in results)
    p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
    summary = {"how": how, "trials": len(times), "heartbeat_timeout_s": TIMEOUT, "median_s": statistics.median(times),
               "p95_s": p95, "max_s": times[-1], "victims": sorted({r["victim"] for r in results})}
    print(f"\ndetection of {how} over {len(times)} trials: {json.dumps(summary)}")
    assert summary["victims"] == list(range(WORLD))            # rank 0 (which hosts the store) included
    assert times[-1] < TIMEOUT + MARGIN, summary


def test_a_rank_that_never_joins_is_named(zygote, tiny_corpus, tmp_path):
    trial = Trial(zygote, tiny_corpus, tmp_path / "no2", ranks=[0, 1], **{"parallel.join_timeout": 3})
    exits = trial.zygote.wait(list(trial.pids.values()), 60)
    trial.kill_all()
    assert [exits[trial.pids[r]][0] for r in (0, 1)] == [EXIT_PEER_LOST] * 2
    assert "only 2 of 3 ranks joined the rendezvous" in trial.err(0) and "missing: rank 2" in trial.err(0)
    assert "only 2 of 3 ranks joined the rendezvous" in trial.err(1)

    trial = Trial(zygote, tiny_corpus, tmp_path / "no0", ranks=[1, 2], **{"parallel.join_timeout": 3})
    exits = trial.zygote.wait(list(trial.pids.values()), 60)
    trial.kill_all()
    for rank in (1, 2):
        assert exits[trial.pids[rank]][0] == EXIT_PEER_LOST
        assert "could not reach the rendezvous at 127.0.0.1:" in trial.err(rank) and "rank 0 never started" \
            in trial.err(rank), trial.err(rank)
        assert "Traceback" not in trial.err(rank)


def test_a_rank_that_skips_a_collective_is_named(zygote, tiny_corpus, tmp_path):
    trial = Trial(zygote, tiny_corpus, tmp_path / "skip", faults="skip_collective:rank=1,step=5",
                  **{"train.log_interval": 100})
    exits = trial.zygote.wait(list(trial.pids.values()), 60)
    trial.kill_all()
    for rank in range(WORLD):
        err = trial.err(rank)
        assert exits[trial.pids[rank]][0] != 0, (rank, err[-2000:])
        assert "rank 1 (host" in err and "skipped or repeated a collective" in err, (rank, err[-2000:])
        assert "Traceback" not in err, err[-3000:]


def test_a_straggler_is_named_with_its_host(zygote, tiny_corpus, tmp_path):
    trial = Trial(zygote, tiny_corpus, tmp_path / "slow", faults="delay:rank=2,seconds=0.3",
                  **{"train.steps": 12, "train.log_interval": 4, "checkpoint.interval": 0})
    exits = trial.zygote.wait(list(trial.pids.values()), 120)
    trial.kill_all()
    assert [exits[trial.pids[r]][0] for r in range(WORLD)] == [0] * WORLD, trial.err(0)[-2000:]
    assert f"straggler: rank 2 (host {socket.gethostname()}, local rank 2)" in trial.err(2)
    assert "straggler" not in trial.err(0) + trial.err(1)
    flagged = [r for r in read_metrics(tmp_path / "slow" / "run") if "straggler_rank" in r]
    # 4 steps of 0.3 s: each window is long enough to judge; named from the second window in a row on
    assert [r["step"] for r in flagged] == [8, 12] and {r["straggler_rank"] for r in flagged} == {2}


def test_a_rank_that_drops_a_saves_collective_aborts_the_save_everywhere(zygote, tiny_corpus, tmp_path):
    """Rank 1 leaves step 4's save without the commit gather: the ranks deadlock in different operations, every
    rank stops naming rank 1, nothing of step 4 is committed, and step 2's checkpoint stays the latest."""
    trial = Trial(zygote, tiny_corpus, tmp_path / "drop", faults="skip_collective:rank=1,step=4,at=save_gather",
                  **{"train.log_interval": 100})
    exits = trial.zygote.wait(list(trial.pids.values()), 90)
    trial.kill_all()
    assert len(exits) == WORLD, "a rank hung"
    for rank in range(WORLD):
        err = trial.err(rank)
        assert exits[trial.pids[rank]][0] != 0, (rank, err[-2000:])
        assert "rank 1 (host" in err and "a rank that skipped or repeated a collective" in err, (rank, err[-2000:])
        assert "Traceback" not in err, err[-3000:]
    latest = latest_checkpoint(tmp_path / "drop" / "run")
    assert latest is not None and latest.name == "step_0000002", latest
    CheckpointReader(latest, verify=True)
