"""A damaged latest checkpoint is caught before any weight is used, and train and eval fall back to the
previous one, saying so: 1,000 single-byte flips, truncation, a missing piece, a missing marker, an empty or
dangling latest pointer."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from megalm.checkpoint.format import CheckpointError
from megalm.checkpoint.load import CheckpointReader
from megalm.cli import main as cli
from megalm.train.metrics import read_metrics
from tests.conftest import tiny_overrides

STEPS = {"train.steps": 4, "checkpoint.interval": 2, "checkpoint.keep": 3}


@pytest.fixture(scope="module")
def run(tiny_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("damage") / "run"
    assert cli(["train"] + tiny_overrides(tiny_corpus, run_dir, **STEPS)) == 0
    straight = tmp_path_factory.mktemp("damage") / "straight"
    assert cli(["train"] + tiny_overrides(tiny_corpus, straight, **{**STEPS, "train.steps": 6})) == 0
    return run_dir, [r["loss"] for r in read_metrics(straight) if "loss" in r]


def test_every_single_byte_flip_of_shards_and_manifest_is_caught(run):
    folder = run[0] / "checkpoints" / "step_0000004"
    CheckpointReader(folder)                                  # intact: verifies
    files = sorted([*folder.glob("*.safetensors"), folder / "manifest.json"])
    sizes = np.array([f.stat().st_size for f in files])
    rng = np.random.default_rng(0)
    caught = 0
    for _ in range(1000):
        f = files[rng.choice(len(files), p=sizes / sizes.sum())]
        data = bytearray(f.read_bytes())
        offset = int(rng.integers(len(data)))
        original = data[offset]
        data[offset] ^= 1 << int(rng.integers(8))
        f.write_bytes(bytes(data))
        try:
            CheckpointReader(folder)
        except CheckpointError:
            caught += 1
        finally:
            data[offset] = original
            f.write_bytes(bytes(data))
    assert caught == 1000
    CheckpointReader(folder)


def _damage(folder, how):
    root = folder.parent
    shard = next(folder.glob("*.safetensors"))
    if how == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif how == "missing piece":
        shard.unlink()
    elif how == "missing marker":
        (folder / "COMMITTED").unlink()
    elif how == "flipped manifest byte":
        data = bytearray((folder / "manifest.json").read_bytes())
        data[len(data) // 2] ^= 0x01
        (folder / "manifest.json").write_bytes(bytes(data))
    elif how == "empty latest":
        (root / "latest").write_text("")
    elif how == "dangling latest":
        (root / "latest").write_text("step_0009999\n")


KINDS = ["truncated shard", "missing piece", "missing marker", "flipped manifest byte"]


@pytest.mark.parametrize("how", KINDS)
def test_train_falls_back_to_the_previous_checkpoint_and_continues_exactly(run, tiny_corpus, tmp_path, how,
                                                                           capsys):
    run_dir, straight = run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    _damage(copy / "checkpoints" / "step_0000004", how)
    capsys.readouterr()
    assert cli(["train"] + tiny_overrides(tiny_corpus, copy, **{**STEPS, "train.steps": 6})) == 0
    out = capsys.readouterr().out
    assert "step_0000002" in out and ("falling back" in out or "using the newest committed" in out), out[:2000]
    losses = [r["loss"] for r in read_metrics(copy) if "loss" in r]
    assert losses[-4:] == straight[2:]                 # steps 3-6 again, exactly as the uninterrupted run


@pytest.mark.parametrize("how", ["empty latest", "dangling latest"])
def test_a_bad_latest_pointer_gives_way_to_the_newest_committed_and_is_said(run, tiny_corpus, tmp_path, how,
                                                                            capsys):
    copy = tmp_path / "run"
    shutil.copytree(run[0], copy)
    _damage(copy / "checkpoints" / "step_0000004", how)
    capsys.readouterr()
    assert cli(["eval", "--checkpoint", str(copy), "--samples", "4"]) == 0
    err = capsys.readouterr().err
    assert "latest is" in err and "using the newest committed checkpoint, step_0000004" in err


@pytest.mark.parametrize("how", ["missing piece", "flipped manifest byte", "missing marker"])
def test_eval_says_which_step_it_used(run, tmp_path, how, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run[0], copy)
    _damage(copy / "checkpoints" / "step_0000004", how)
    capsys.readouterr()
    assert cli(["eval", "--checkpoint", str(copy), "--samples", "4"]) == 0
    captured = capsys.readouterr()
    assert "step_0000002" in captured.err + captured.out and "(step 2)" in captured.out + captured.err


@pytest.mark.parametrize("fault", ["corrupt", "truncate"])
def test_silent_disk_damage_planted_by_the_fault_facility_is_caught_at_resume(tiny_corpus, tmp_path, fault,
                                                                              monkeypatch, capsys):
    from megalm.runtime import faults
    run_dir = tmp_path / "run"
    monkeypatch.setenv("MEGALM_FAULTS", f"{fault}:rank=0,step=4")
    monkeypatch.setattr(faults, "_planned", None)
    assert cli(["train"] + tiny_overrides(tiny_corpus, run_dir, **{**STEPS, "train.stop_at_step": 4})) == 0
    monkeypatch.setenv("MEGALM_FAULTS", "")
    monkeypatch.setattr(faults, "_planned", None)
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        CheckpointReader(run_dir / "checkpoints" / "step_0000004")
    capsys.readouterr()
    assert cli(["train"] + tiny_overrides(tiny_corpus, run_dir, **STEPS)) == 0
    out = capsys.readouterr().out
    assert "is damaged" in out and "falling back to" in out and "step_0000002" in out
