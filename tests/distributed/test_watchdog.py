"""Dead and stopped ranks are named within seconds: the heartbeat outside the collectives (no hang on gloo,
which cannot abort a pending collective). Three real `megalm train` processes, launched as torchrun would
(RANK, WORLD_SIZE, MASTER_ADDR/PORT), one of them killed (SIGKILL) or stopped (SIGSTOP) mid-run."""
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest

from megalm.checkpoint.format import latest_checkpoint
from megalm.runtime.watchdog import EXIT_PEER_LOST, Watchdog
from tests.conftest import tiny_overrides

TIMEOUT = 3.0            # parallel.heartbeat_timeout for these runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(prefix, run_dir, world=3):
    overrides = tiny_overrides(prefix, run_dir, **{
        "train.steps": 100000, "train.micro_batch_size": 1, "train.global_batch_size": world,
        "train.log_interval": 1, "checkpoint.interval": 5, "parallel.heartbeat_timeout": TIMEOUT})
    port, procs = free_port(), []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "megalm", "train", *overrides], env=env,
                                      stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def wait_for_step(proc, step: int) -> None:
    for line in proc.stdout:
        if line.startswith(f"step {step:>6}/"):
            return
    raise AssertionError("rank 0 ended before training")


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_a_dead_or_stopped_rank_is_named_by_every_survivor(tiny_corpus, tmp_path, how):
    random.seed(how)
    victim, step = random.choice([1, 2]), random.randint(7, 12)
    procs = launch(tiny_corpus, tmp_path)
    try:
        wait_for_step(procs[0], step)
        os.kill(procs[victim].pid, getattr(signal, how))
        struck = time.monotonic()
        survivors = [p for r, p in enumerate(procs) if r != victim]
        for proc in survivors:
            proc.wait(timeout=TIMEOUT + 30)
        detected = time.monotonic() - struck
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert detected < TIMEOUT + 15, detected                     # heartbeat timeout plus start-up of the check
    for rank, proc in enumerate(procs):
        if rank == victim:
            continue
        err = proc.stderr.read()
        assert proc.returncode == EXIT_PEER_LOST, (rank, proc.returncode, err[-2000:])
        assert f"rank {victim} (host {socket.gethostname()}, local rank {victim}; its last completed step was" in err
        assert "Traceback" not in err
    assert latest_checkpoint(tmp_path) is not None               # the last committed checkpoint still loads


class MemoryStore:
    """The three store operations the watchdog uses, in memory (the unit test of its decisions)."""

    def __init__(self):
        self.data = {}

    def set(self, key, value):
        self.data[key] = value.encode() if isinstance(value, str) else value

    def get(self, key):
        return self.data[key]

    def check(self, keys):
        return all(k in self.data for k in keys)


def test_the_watchdog_names_a_silent_neighbour_and_not_a_finished_one():
    store, exits = MemoryStore(), []
    quiet = Watchdog(store, 1, 2, 1, timeout=0.5, exit=exits.append)
    quiet.note("training step 4", step=3)
    quiet._publish()                                            # one beat, then silence (as after SIGSTOP)
    watcher = Watchdog(store, 0, 2, 0, timeout=0.5, interval=0.05, exit=exits.append).start()
    deadline = time.monotonic() + 5
    while not exits and time.monotonic() < deadline:
        time.sleep(0.05)
    watcher.stop()
    assert exits == [EXIT_PEER_LOST]
    assert "last completed step was 3, last in: training step 4" in store.get("megalm/watchdog/failed").decode()
    store2, exits2 = MemoryStore(), []
    done = Watchdog(store2, 1, 2, 1, timeout=0.5, exit=exits2.append)
    done.stop()                                                 # published "finished"
    watcher = Watchdog(store2, 0, 2, 0, timeout=0.5, interval=0.05, exit=exits2.append).start()
    time.sleep(1.2)
    watcher.stop()
    assert exits2 == []
