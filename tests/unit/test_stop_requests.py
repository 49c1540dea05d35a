"""Stopping on purpose: SIGTERM/SIGUSR1/Ctrl-C and train.time_limit stop at a step boundary with a checkpoint
and a distinct exit status, all ranks together, and the rerun resumes to the uninterrupted run's losses."""
import os
import signal
import subprocess
import sys
import time

import pytest

from megalm.config import load_config
from megalm.runtime.signals import EXIT_INTERRUPTED, EXIT_RESUMABLE
from megalm.train.loop import train
from megalm.train.metrics import read_metrics
from tests.conftest import tiny_overrides

STEPS = 8


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def signal_at(monkeypatch, step: int, signum: int, rank_ok=lambda: True):
    """Deliver ``signum`` to this process in the middle of training step ``step`` (as SLURM would)."""
    import megalm.train.loop as loop

    real = loop.train_step

    def planted(engine, p2p, schedule, micro, topo, lr, number, *rest):
        if number == step and rank_ok():
            os.kill(os.getpid(), signum)
        return real(engine, p2p, schedule, micro, topo, lr, number, *rest)

    monkeypatch.setattr(loop, "train_step", planted)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_saves_and_the_rerun_resumes_exactly(tiny_corpus, tmp_path, monkeypatch, signum, capsys):
    extra = {"train.steps": STEPS}
    train(load_config(None, tiny_overrides(tiny_corpus, tmp_path / "straight", **extra)))
    signal_at(monkeypatch, 3, signum)
    result = train(load_config(None, tiny_overrides(tiny_corpus, tmp_path / "stopped", **extra)))
    assert result["step"] == 3 and result["exit_status"] == EXIT_RESUMABLE
    assert "stopped at step 3" in capsys.readouterr().out
    assert signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler)      # handlers put back
    monkeypatch.undo()
    train(load_config(None, tiny_overrides(tiny_corpus, tmp_path / "stopped", **extra)))
    assert losses(tmp_path / "stopped") == losses(tmp_path / "straight")              # bit for bit


def test_time_limit_stops_in_time_and_resumes(tiny_corpus, tmp_path):
    extra = {"train.steps": 400, "train.time_limit": 1.5, "train.time_limit_margin": 0.2}
    started = time.monotonic()
    result = train(load_config(None, tiny_overrides(tiny_corpus, tmp_path, **extra)))
    assert result["exit_status"] == EXIT_RESUMABLE and 0 < result["step"] < 400
    assert "time_limit" in result["stopped"]
    assert time.monotonic() - started < 60
    stopped_at = result["step"]
    again = train(load_config(None, tiny_overrides(tiny_corpus, tmp_path, **{**extra, "train.time_limit": 3600})))
    assert again["step"] == 400 and min(s for s in losses(tmp_path) if s > stopped_at) == stopped_at + 1


def test_ctrl_c_saves_once_with_one_line_and_exit_130(tiny_corpus, tmp_path):
    cmd = [sys.executable, "-m", "megalm", "train", *tiny_overrides(tiny_corpus, tmp_path, **{
        "train.steps": 100000, "train.log_interval": 1})]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:                                   # wait until it trains
        if line.startswith("step      3/"):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.count("Ctrl-C: stopping at the end of this step") == 1
    assert "checkpoint saved: rerun the same command to resume" in out
    from megalm.checkpoint.format import latest_checkpoint

    assert latest_checkpoint(tmp_path) is not None


def _signal_one_rank(rank, world, overrides, queue):
    import pytest as _pytest

    monkeypatch = _pytest.MonkeyPatch()
    signal_at(monkeypatch, 2, signal.SIGUSR1, rank_ok=lambda: rank == 1)
    result = train(load_config(None, overrides))
    queue.put((rank, result["step"], result.get("exit_status")))


@pytest.mark.slow
def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(tiny_corpus, tmp_path):
    import torch

    from megalm.checkpoint.format import latest_checkpoint
    from megalm.runtime.spawn import run_distributed

    queue = torch.multiprocessing.get_context("spawn").SimpleQueue()
    run_distributed(_signal_one_rank, 2, tiny_overrides(tiny_corpus, tmp_path, **{"train.steps": STEPS,
                                                                                   "parallel.tp": 2}), queue)
    assert sorted(queue.get() for _ in range(2)) == [(0, 2, EXIT_RESUMABLE), (1, 2, EXIT_RESUMABLE)]
    assert latest_checkpoint(tmp_path).name == "step_0000002"
