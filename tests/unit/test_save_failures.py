"""A save that cannot be written (disk full) is one line naming the path and the space it needed, on every rank;
nothing is committed and the previous checkpoint stays the latest; checkpoint.on_error=continue trains on."""
import errno

import pytest

from megalm.checkpoint.format import CheckpointError, latest_checkpoint
from megalm.config import load_config
from megalm.train.loop import train
from megalm.train.metrics import read_metrics
from tests.conftest import tiny_overrides


def disk_full_after(monkeypatch, saves_ok: int, rank_ok=lambda: True):
    """The (saves_ok + 1)-th save's shard write fails with ENOSPC (on the ranks ``rank_ok`` picks)."""
    from megalm.checkpoint import writer

    real, count = writer.PlannedSafetensorsFile.write, {"files": 0, "seen": set()}

    def write(self, key, tensor):
        if self.path not in count["seen"]:
            count["seen"].add(self.path)
            count["files"] += 1
        if count["files"] > saves_ok and rank_ok():
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return real(self, key, tensor)

    monkeypatch.setattr(writer.PlannedSafetensorsFile, "write", write)


def test_disk_full_stops_with_one_line_and_keeps_the_previous_checkpoint(tiny_corpus, tmp_path, monkeypatch):
    disk_full_after(monkeypatch, saves_ok=1)
    with pytest.raises(CheckpointError) as err:
        train(load_config(None, tiny_overrides(tiny_corpus, tmp_path, **{"train.steps": 4,
                                                                         "checkpoint.interval": 2})))
    message = str(err.value)
    assert "could not save the checkpoint of step 4 (rank 0 on" in message and "No space left on device" in message
    assert "GB to write there" in message and "GB free" in message and "previous checkpoint stays the latest" in message
    assert latest_checkpoint(tmp_path).name == "step_0000002"
    assert not (tmp_path / "checkpoints" / "step_0000004.tmp").exists()


def test_on_error_continue_trains_to_the_end(tiny_corpus, tmp_path, monkeypatch, capsys):
    disk_full_after(monkeypatch, saves_ok=1)
    train(load_config(None, tiny_overrides(tiny_corpus, tmp_path, **{
        "train.steps": 6, "checkpoint.interval": 2, "checkpoint.on_error": "continue"})))
    assert max(r["step"] for r in read_metrics(tmp_path) if "loss" in r) == 6
    assert "continuing without it" in capsys.readouterr().err
    assert latest_checkpoint(tmp_path).name == "step_0000002"


def _save_fails_on_rank_one(rank, world, overrides, queue):
    import pytest as _pytest

    monkeypatch = _pytest.MonkeyPatch()
    disk_full_after(monkeypatch, saves_ok=1, rank_ok=lambda: rank == 1)
    try:
        train(load_config(None, overrides))
        queue.put((rank, None))
    except CheckpointError as e:
        queue.put((rank, str(e)))


@pytest.mark.slow
def test_a_failing_rank_abandons_the_save_on_every_rank(tiny_corpus, tmp_path):
    import torch

    from megalm.runtime.spawn import run_distributed

    queue = torch.multiprocessing.get_context("spawn").SimpleQueue()
    run_distributed(_save_fails_on_rank_one, 2, tiny_overrides(tiny_corpus, tmp_path, **{
        "train.steps": 4, "checkpoint.interval": 2, "parallel.tp": 2}), queue)
    results = dict(queue.get() for _ in range(2))
    assert results[0] == results[1] and "(rank 1 on" in results[0]
    assert latest_checkpoint(tmp_path).name == "step_0000002"
