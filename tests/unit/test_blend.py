"""data.blend: exact proportions, deterministic and resumable in any layout; config forms and refusals."""
from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from megalm.config import ConfigError, load_config
from megalm.config.rules import blend_sources
from megalm.data.blend import BlendedDataset, open_split
from megalm.data.dataset import BatchSampler, TokenDataset
from megalm.data.errors import DataError
from megalm.data.preprocess import preprocess
from megalm.data.tokenizer import tokenizer_path
from megalm.train.loop import train
from megalm.train.metrics import read_metrics
from tests.conftest import tiny_overrides


class _Stream:
    """A stand-in source: sample k of its stream is [source id, k]."""
    def __init__(self, ident, n):
        self.ident, self.n, self.split, self.seq_len = ident, n, "train", 1

    def __len__(self):
        return self.n

    def __getitem__(self, k):
        return np.array([self.ident, k])

    def sample(self, k):
        return np.array([self.ident, -k])


@pytest.mark.parametrize("seed", range(6))
def test_every_source_has_its_share_within_one_sample_after_every_step(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 7))
    weights = rng.random(k) ** 2
    weights /= weights.sum()
    blend = BlendedDataset([_Stream(i, 50) for i in range(k)], list(weights), [f"s{i}" for i in range(k)])
    gbs = int(rng.integers(1, 17))
    steps = np.arange(0, 12_000, gbs)
    counts = np.stack([blend.counts(n) for n in steps])
    assert np.all(np.abs(counts - steps[:, None] * weights[None]) < 1)          # within one, every source
    assert np.array_equal(counts.sum(axis=1), steps)
    # each source's samples are its own stream in order: 0, 1, 2, ... (its epochs continue past its size)
    drawn = np.stack([blend[i] for i in range(3000)])
    for i in range(k):
        assert drawn[drawn[:, 0] == i, 1].tolist() == list(range(int((drawn[:, 0] == i).sum())))
    again = BlendedDataset([_Stream(i, 50) for i in range(k)], list(weights), [f"s{i}" for i in range(k)])
    assert [again.locate(i) for i in range(9000, 8000, -7)] == [blend.locate(i) for i in range(9000, 8000, -7)]


def test_resume_in_another_data_parallel_layout_reads_the_same_samples():
    blend = BlendedDataset([_Stream(0, 7), _Stream(1, 30), _Stream(2, 11)], [0.2, 0.5, 0.3], ["a", "b", "c"])
    straight = BatchSampler(blend, 12, 2)
    expected = [torch.cat(straight.next_batch()) for _ in range(8)]
    got = []
    ranks = [BatchSampler(blend, 12, 3, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(3):                                  # 3 steps at dp=2 ...
        got.append(torch.cat([torch.cat(s.next_batch()) for s in ranks]))
    resumed = BatchSampler(blend, 12, 4, dp_rank=0, dp_size=1, consumed_samples=ranks[0].consumed_samples)
    got += [torch.cat(resumed.next_batch()) for _ in range(5)]      # ... then 5 at dp=1
    assert all(torch.equal(a, b) for a, b in zip(got, expected)) and len(got) == 8
    assert blend.state(36) == [{"prefix": "a", "weight": 0.2, "consumed": 7},
                               {"prefix": "b", "weight": 0.5, "consumed": 18},
                               {"prefix": "c", "weight": 0.3, "consumed": 11}]


def test_a_source_the_run_reads_more_than_once_is_said():
    blend = BlendedDataset([_Stream(0, 10), _Stream(1, 1000)], [0.5, 0.5], ["small", "large"])
    assert blend.epochs_warning(100) == ["data.blend: small gives 50 of the run's 100 train samples but holds 10: "
                                         "it is read 5.00 times (in epochs, each reshuffled)"]


def test_blend_config_forms_and_refusals():
    assert blend_sources([0.3, "a", 0.7, "b"]) == [("a", 0.3), ("b", 0.7)]
    assert blend_sources([{"prefix": "a", "weight": 1}, {"prefix": "b", "weight": 3}]) == [("a", 0.25), ("b", 0.75)]
    assert blend_sources([{"prefix": "a", "tokens": "2e9"}, {"prefix": "b", "tokens": 6e9}]) == \
        [("a", 0.25), ("b", 0.75)]
    for bad, message in [([0.3, "a", 0.7], "odd number"), ([0, "a", 1, "b"], "weight of a is 0"),
                         ([1, "a", 1, "a"], "names a prefix twice"), ([], "data.blend must be"),
                         ([{"prefix": "a", "weight": 1}, {"prefix": "b", "tokens": 5}], "all weights or all tokens")]:
        with pytest.raises(ConfigError, match=message):
            blend_sources(bad)
    with pytest.raises(ConfigError, match="data.prefix=x and data.blend are both set"):
        from megalm.config.rules import check_data
        check_data(load_config(None, ["data.prefix=x", "data.blend=[1, a, 1, b]"]))


# ---------------------------------------------------------------- through megalm train

@pytest.fixture(scope="module")
def two_sources(tiny_corpus, tmp_path_factory):
    """Two datasets tokenized with the tiny corpus's tokenizer: a small one and a larger one."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    root = tmp_path_factory.mktemp("blend")
    sources = {"small": ["this.py", "keyword.py", "colorsys.py"],
               "large": ["textwrap.py", "shlex.py", "queue.py", "heapq.py", "string.py", "copy.py"]}
    for name, files in sources.items():
        preprocess([str(stdlib / f) for f in files], str(root / name), tokenizer=tokenizer_path(tiny_corpus),
                   workers=1, show_progress=False)
    return str(root / "small"), str(root / "large")


def _blend_overrides(sources, run_dir, **extra):
    small, large = sources
    base = tiny_overrides("x", run_dir, **{"train.steps": 8, "train.log_interval": 2, **extra})
    return [o for o in base if not o.startswith("data.prefix=")] + [f"data.blend=[0.25, {small}, 0.75, {large}]"]


def test_training_on_a_blend_logs_its_shares_and_resumes_exactly(two_sources, tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(load_config(None, _blend_overrides(two_sources, straight)))
    out = capsys.readouterr().out
    assert f"samples per source: {two_sources[0]} 8 (25.0%), {two_sources[1]} 24 (75.0%)" in out
    shares = [r for r in read_metrics(straight) if "samples_per_source" in r]
    assert [r["step"] for r in shares] == [2, 4, 6, 8]
    for r in shares:
        n = r["step"] * 4
        small, large = r["samples_per_source"].values()
        assert abs(small - 0.25 * n) < 1 and abs(large - 0.75 * n) < 1 and small + large == n
    train(load_config(None, _blend_overrides(two_sources, resumed, **{"train.stop_at_step": 4,
                                                                      "checkpoint.interval": 4})))
    manifest = json.loads(next(resumed.glob("checkpoints/step_0000004/manifest.json")).read_text())
    assert [s["consumed"] for s in manifest["data"]["blend"]] == [4, 12]
    train(load_config(None, _blend_overrides(two_sources, resumed)))
    loss = lambda d: [r["loss"] for r in read_metrics(d) if "loss" in r]
    assert loss(straight) == loss(resumed) and len(loss(resumed)) == 8

    # resuming with other weights is refused before training
    small, large = two_sources
    changed = [o for o in _blend_overrides(two_sources, resumed, **{"train.steps": 10})
               if not o.startswith("data.blend")] + [f"data.blend=[0.5, {small}, 0.5, {large}]"]
    with pytest.raises(DataError, match=r"trained on data.blend \[.*small 0.25.*not this run's"):
        train(load_config(None, changed))


def test_a_source_of_another_tokenizer_is_refused(two_sources, tmp_path):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    other = str(tmp_path / "other")
    preprocess([str(stdlib / "abc.py"), str(stdlib / "types.py")], other, vocab_size=300, workers=1,
               show_progress=False)
    cfg = load_config(None, [f"data.blend=[1, {two_sources[0]}, 1, {other}]", "data.seq_len=16"])
    with pytest.raises(DataError, match=r"other was tokenized with another tokenizer.*same --tokenizer"):
        open_split(cfg.data, "train", None)


def test_one_source_blend_equals_the_plain_dataset(two_sources):
    cfg = load_config(None, [f"data.blend=[1, {two_sources[1]}]", "data.seq_len=16"])
    blended = open_split(cfg.data, "valid", None)
    plain = TokenDataset(two_sources[1], "valid", 16)
    assert all(np.array_equal(blended[i], plain[i]) and np.array_equal(blended.sample(i), plain.sample(i))
               for i in range(len(plain)))


def _train_rank(rank, world, overrides):
    train(load_config(None, overrides))


@pytest.mark.slow
def test_a_blend_resumed_at_data_parallel_2_continues_the_single_process_run(two_sources, tmp_path):
    from megalm.runtime.spawn import run_distributed
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(load_config(None, _blend_overrides(two_sources, straight)))
    train(load_config(None, _blend_overrides(two_sources, resumed, **{"train.stop_at_step": 4,
                                                                      "checkpoint.interval": 4})))
    run_distributed(_train_rank, 2, _blend_overrides(two_sources, resumed, **{"parallel.dp": 2}))
    loss = lambda d: [r["loss"] for r in read_metrics(d) if "loss" in r]
    assert len(loss(resumed)) == 8
    torch.testing.assert_close(torch.tensor(loss(resumed)), torch.tensor(loss(straight)), rtol=1e-5, atol=0)
    last = [r["samples_per_source"] for r in read_metrics(resumed) if "samples_per_source" in r][-1]
    assert list(last.values()) == [8, 24]
