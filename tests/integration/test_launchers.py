"""megalm under the launchers users run it with on one host: torchrun, mpirun and the deepspeed launcher (the
SLURM scripts are tested on two nodes in test_slurm_two_nodes.py)."""
import math
import os
import re
import shutil
import socket
import subprocess
import sys
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


def megalm(args, nproc=1, timeout=300) -> str:
    """Run ``megalm ARGS`` in one process, or under torchrun with ``nproc`` processes; return its stdout."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "megalm"]
    else:
        cmd = [str(ROOT / ".venv/bin/torchrun"), "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "megalm"]
    proc = subprocess.run(cmd + args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def eval_result(stdout: str) -> tuple[int, float]:
    """(samples, loss) of megalm eval's summary line."""
    m = re.search(r"eval .*: (\d+) samples x \d+ tokens \| loss (\d+\.\d+) \|", stdout)
    assert m, stdout[-3000:]
    return int(m.group(1)), float(m.group(2))


def test_torchrun(tiny_corpus, tmp_path):
    """Train at tp = 2 under torchrun, then evaluate and generate from that checkpoint under torchrun at tp = 2:
    the same loss and text as one process at tp = 1 (the checkpoint resharded on load)."""
    env = {**os.environ, "NPROC": "2", "MASTER_PORT": str(free_port())}
    launch("torchrun.sh", [str(ROOT / "configs/tiny.yaml")] + overrides(tiny_corpus, tmp_path), env)
    assert_trained(tmp_path)

    evaluate = ["eval", "--checkpoint", str(tmp_path), "--samples", "16"]
    samples_tp2, loss_tp2 = eval_result(megalm(evaluate + ["parallel.tp=2"], nproc=2))
    samples_tp1, loss_tp1 = eval_result(megalm(evaluate))
    assert samples_tp2 == samples_tp1 == 16
    # Printed with 4 decimals: equal up to one unit in the last place (the true difference is ~1e-6 relative).
    assert math.isclose(loss_tp2, loss_tp1, abs_tol=1.01e-4), (loss_tp2, loss_tp1)

    # Greedy decoding, and sampling with a fixed seed (after 3 steps greedy text is mostly one repeated token;
    # sampled text exercises many rows of the vocabulary-parallel head).
    for decoding in (["--temperature", "0"], ["--temperature", "1", "--top-k", "0", "--seed", "3"]):
        generate = ["generate", "--checkpoint", str(tmp_path), "--prompt", "def ", "--max-new-tokens", "16"]
        text_tp2 = megalm(generate + decoding + ["parallel.tp=2"], nproc=2)
        text_tp1 = megalm(generate + decoding)
        assert text_tp2.startswith("def ") and len(text_tp2) > len("def \n"), text_tp2
        assert text_tp2 == text_tp1, decoding


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs OpenMPI's mpirun (apt-get install openmpi-bin)")
def test_mpirun(tiny_corpus, tmp_path):
    env = {**os.environ, "NPROC": "2", "MASTER_PORT": str(free_port()), "OMPI_MCA_btl": "self,tcp"}
    launch("mpirun.sh", [str(ROOT / "configs/tiny.yaml")] + overrides(tiny_corpus, tmp_path), env)
    assert_trained(tmp_path)


def test_deepspeed_launcher_zero2(tiny_corpus, tmp_path):
    env = {**os.environ, "NPROC": "2", "MASTER_PORT": str(free_port())}
    args = tiny_overrides(tiny_corpus, tmp_path, **{"train.steps": 3, "parallel.zero_stage": 2})
    launch("deepspeed.sh", [str(ROOT / "configs/tiny.yaml")] + args, env)
    assert_trained(tmp_path)


def test_torchrun_deepspeed_zero3(tiny_corpus, tmp_path):
    """The DeepSpeed engine under torchrun (not the deepspeed launcher): ZeRO-3 from its JSON config, dp = 2."""
    env = {**os.environ, "NPROC": "2", "MASTER_PORT": str(free_port())}
    args = tiny_overrides(tiny_corpus, tmp_path, **{"train.steps": 3, "parallel.zero_stage": 3,
                                                    "parallel.deepspeed_config": ROOT / "configs/deepspeed/zero3.json"})
    proc = launch("torchrun.sh", [str(ROOT / "configs/tiny.yaml")] + args, env)
    assert "world 2 = tp 1 x pp 1 x dp 2" in proc.stdout and "engine deepspeed zero-3" in proc.stdout, proc.stdout
    assert_trained(tmp_path)


BENCH = ["bench", "train", "--steps", "3", "--warmup", "1", "--breakdown-steps", "2", "model.num_layers=2",
         "model.hidden_size=64", "model.num_heads=4", "data.seq_len=64", "model.max_seq_len=64",
         "train.micro_batch_size=2", "train.global_batch_size=8", "model.vocab_size=512"]


def bench_rows(folder) -> dict:
    import json

    result = json.loads((folder / "bench_train.json").read_text())["results"]
    assert result["world_size"] == 2
    return result["rows"]


def test_bench_train_under_torchrun_at_pp2(tmp_path):
    """The config's own pipeline step on 2 ranks: the bubble shows as waits for the other stage."""
    out = megalm(BENCH + ["--out", str(tmp_path), "parallel.pp=2"], nproc=2)
    row = bench_rows(tmp_path)["megalm tp1 pp2 dp1"]
    assert row["devices"] == 2 and row["tokens_per_s_per_device"] == row["tokens_per_s"] / 2
    assert row["breakdown_fraction"]["pp_wait"] > 0.1 and row["peak_memory_min"] > 0   # (p-1)/(m+p-1) = 20%
    assert "step by phase" in out


def test_bench_train_under_the_deepspeed_launcher_at_zero1(tmp_path):
    cmd = [str(ROOT / ".venv/bin/deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module",
           "megalm"] + BENCH + ["--out", str(tmp_path), "parallel.zero_stage=1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = bench_rows(tmp_path)["megalm tp1 pp1 dp2 zero1"]
    assert row["devices"] == 2 and row["breakdown_fraction"]["optimizer"] > 0
