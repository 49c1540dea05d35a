"""logging.wandb: every metrics.jsonl number goes to Weights & Biases as well, checked in W&B's offline mode by
reading the run's own record file back; a resumed run continues the same W&B run; a missing package is refused."""
import json

import pytest

from megalm.config import ConfigError, load_config
from megalm.train.loop import train
from megalm.train.metrics import read_metrics
from tests.conftest import tiny_overrides


def wandb_history(run_file) -> list[dict]:
    """The history rows of a W&B offline run file (LevelDB log framing: 7-byte header, then 32 KiB blocks of
    chunks, each with a 4-byte checksum, a 2-byte length and a type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, rows, pending, pos, block = run_file.read_bytes(), [], b"", 7, 32768
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:                      # the tail of a block is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_metrics_reach_wandb_offline_and_a_resume_continues_the_run(tiny_corpus, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="needs wandb (pip install megalm[test])")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = tiny_overrides(tiny_corpus, tmp_path, **{"train.steps": 4, "logging.wandb": "megalm-test"})
    train(load_config(None, args + ["train.stop_at_step=2"]))
    run_id = (tmp_path / "wandb_id").read_text().strip()
    train(load_config(None, args))
    assert (tmp_path / "wandb_id").read_text().strip() == run_id
    # W&B names a second folder of the same second and id "...-ID-1"
    files = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}*/run-{run_id}.wandb"),
                   key=lambda f: f.stat().st_mtime)                         # the first run, then its resumption
    assert len(files) == 2, list((tmp_path / "wandb").iterdir())          # the first run and its resumption
    logged = [row for f in files for row in wandb_history(f) if "loss" in row]
    expected = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert [row["_step"] for row in logged] == [r["step"] for r in expected] == [1, 2, 3, 4]
    assert [row["loss"] for row in logged] == [r["loss"] for r in expected]          # the same floats
    assert {"lr", "grad_norm", "tokens_per_s", "tflops_per_device"} <= set(logged[0])
    assert any("val_loss" in row for f in files for row in wandb_history(f))


def test_wandb_without_the_package_is_refused_naming_it(tiny_corpus, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="logging.wandb=proj needs the wandb package.*pip install wandb"):
        train(load_config(None, tiny_overrides(tiny_corpus, tmp_path, **{"logging.wandb": "proj"})))
    assert not (tmp_path / "metrics.jsonl").exists()                   # refused before any work
