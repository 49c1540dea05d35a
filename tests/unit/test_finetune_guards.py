"""Fine-tuning never writes into a run it did not start, and refuses data of another tokenizer."""
from __future__ import annotations

import json
import re
import sysconfig
from pathlib import Path

import pytest

from megalm.checkpoint.format import latest_checkpoint
from megalm.cli import main as cli
from megalm.data.preprocess import preprocess
from megalm.train.finetune import default_run_dir
from megalm.train.metrics import read_metrics
from tests.conftest import tiny_overrides


@pytest.fixture(scope="module")
def pretrained(tiny_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pre") / "pretrained"
    assert cli(["train"] + tiny_overrides(tiny_corpus, run_dir, **{"train.steps": 2})) == 0
    return run_dir


def _finetune_args(tiny_corpus, **extra):
    return [o for o in tiny_overrides(tiny_corpus, "unused", **{"train.steps": 2, **extra})
            if not o.startswith("train.run_dir=")]


def test_finetune_takes_a_new_run_dir_and_never_touches_another_run(pretrained, tiny_corpus, tmp_path,
                                                                     monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "runs" / "tiny"                      # the quickstart's run, say
    assert cli(["train"] + tiny_overrides(tiny_corpus, other, **{"train.steps": 2})) == 0
    before = {p: p.read_bytes() for p in other.rglob("*") if p.is_file()}
    capsys.readouterr()
    # a config whose run_dir is the other run: that run_dir is not used
    config = tmp_path / "ft.yaml"
    config.write_text(f"train:\n  run_dir: {other}\n")
    assert cli(["finetune", "--checkpoint", str(pretrained), "--config", str(config)]
               + _finetune_args(tiny_corpus)) == 0
    out = capsys.readouterr().out
    expected = Path(default_run_dir(str(pretrained), tiny_corpus))
    assert f"run directory {expected}" in out and "resuming from" not in out
    assert {p: p.read_bytes() for p in other.rglob("*") if p.is_file()} == before      # untouched
    marker = json.loads((expected / "finetune.json").read_text())
    assert marker == {"checkpoint": str(pretrained.resolve()), "data": tiny_corpus, "lora": None}
    assert latest_checkpoint(expected) is not None and len(read_metrics(expected)) > 0

    # naming the other run explicitly is refused before anything is written
    capsys.readouterr()
    assert cli(["finetune", "--checkpoint", str(pretrained), f"train.run_dir={other}"]
               + _finetune_args(tiny_corpus)) == 2
    assert "already holds another run; fine-tuning never resumes or writes" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in other.rglob("*") if p.is_file()} == before

    # the same command again resumes its own run
    capsys.readouterr()
    assert cli(["finetune", "--checkpoint", str(pretrained)] + _finetune_args(tiny_corpus, **{"train.steps": 3})) == 0
    assert "resuming from" in capsys.readouterr().out

    # LoRA of the same checkpoint and data is another run: a directory of its own, and the full run's refused
    lora = _finetune_args(tiny_corpus, **{"train.steps": 2, "lora.rank": 4})
    assert cli(["finetune", "--checkpoint", str(pretrained)] + lora) == 0
    out = capsys.readouterr().out
    assert f"run directory {expected}-lora4" in out and "resuming from" not in out
    assert cli(["finetune", "--checkpoint", str(pretrained), f"train.run_dir={expected}"] + lora) == 2
    assert "is the full fine-tuning of" in capsys.readouterr().err


def test_finetune_refuses_data_of_another_tokenizer(pretrained, tmp_path, capsys):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    other = str(tmp_path / "other")
    preprocess([str(stdlib / f) for f in ("textwrap.py", "shlex.py", "queue.py", "heapq.py", "string.py")], other,
               vocab_size=512, workers=1, show_progress=False)         # same size, another tokenizer
    assert cli(["finetune", "--checkpoint", str(pretrained), f"train.run_dir={tmp_path / 'ft'}"]
               + _finetune_args(other)) == 2
    err = capsys.readouterr().err
    assert re.search(r"data at .*other was tokenized with another tokenizer than .*pretrained.*--tokenizer", err)
    assert latest_checkpoint(tmp_path / "ft") is None
