"""checkpoint.async_save: the same files as a synchronous save, committed at a later step boundary, resumable
exactly; the step is blocked only for the snapshot."""
from __future__ import annotations

import json

import pytest
import torch

from megalm.checkpoint.format import committed_checkpoints
from megalm.config import load_config
from megalm.train.loop import train
from megalm.train.metrics import read_metrics
from tests.conftest import tiny_overrides


def _run(corpus, run_dir, **extra):
    return train(load_config(None, tiny_overrides(corpus, run_dir, **{
        "train.steps": 6, "checkpoint.interval": 2, "checkpoint.keep": 5, **extra})))


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "COMMITTED"}


def test_async_saves_write_what_sync_saves_write(tiny_corpus, tmp_path, capsys):
    _run(tiny_corpus, tmp_path / "sync", **{"checkpoint.async_save": "false"})
    _run(tiny_corpus, tmp_path / "async", **{"checkpoint.async_save": "true"})
    out = capsys.readouterr().out
    assert "(in the background; the step was blocked" in out
    sync, asyn = committed_checkpoints(tmp_path / "sync"), committed_checkpoints(tmp_path / "async")
    assert [c.name for c in sync] == [c.name for c in asyn] == ["step_0000006", "step_0000004", "step_0000002"]
    for a, b in zip(sync, asyn):
        fa, fb = _files(a), _files(b)
        assert fa.keys() == fb.keys()
        ma, mb = json.loads(fa.pop("manifest.json")), json.loads(fb.pop("manifest.json"))
        for m in (ma, mb):                                # the two runs differ in these settings only
            del m["config"]["train"]["run_dir"], m["config"]["checkpoint"]["async_save"]
        assert ma == mb
        assert fa == fb                                   # every shard and tokenizer file, byte for byte
    records = [r for r in read_metrics(tmp_path / "async") if "checkpoint_s" in r]
    assert [(r["step"], r["checkpoint_async"]) for r in records] == [(2, True), (4, True), (6, False)]


def test_a_run_resumed_from_an_async_checkpoint_continues_exactly(tiny_corpus, tmp_path):
    _run(tiny_corpus, tmp_path / "straight")
    _run(tiny_corpus, tmp_path / "resumed", **{"train.stop_at_step": 3})     # step 2 saved in the background
    assert [c.name for c in committed_checkpoints(tmp_path / "resumed")] == ["step_0000003", "step_0000002"]
    _run(tiny_corpus, tmp_path / "resumed")
    loss = lambda d: {r["step"]: r["loss"] for r in read_metrics(d) if "loss" in r}     # noqa: E731
    assert loss(tmp_path / "straight") == loss(tmp_path / "resumed")


def test_snapshot_buffers_are_reused_from_save_to_save():
    from megalm.checkpoint.save import SnapshotBuffers
    from megalm.parallel.shard import ShardSpec

    buffers, spec = SnapshotBuffers(), ShardSpec(None)
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    first = buffers.snapshot([("model.w", w, spec)])
    w.add_(10)                                                  # training moves on
    assert torch.equal(first[0][1], torch.arange(6.0).reshape(2, 3))     # the snapshot is a copy
    second = buffers.snapshot([("model.w", w, spec)])
    assert second[0][1].data_ptr() == first[0][1].data_ptr() and buffers.reused == 1
    assert torch.equal(second[0][1], w)
    third = buffers.snapshot([("model.w", torch.zeros(4), spec)])      # another shape: a new buffer
    assert third[0][1].shape == (4,) and buffers.reused == 1 and buffers.nbytes() == 16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (page-locked host buffers)")
def test_snapshot_buffers_of_cuda_tensors_are_page_locked():
    from megalm.checkpoint.save import SnapshotBuffers
    from megalm.parallel.shard import ShardSpec

    w = torch.randn(1024, 1024, device="cuda")
    (_, copy, _), = SnapshotBuffers().snapshot([("model.w", w, ShardSpec(None))])
    assert copy.is_pinned() and copy.device.type == "cpu" and torch.equal(copy, w.cpu())
