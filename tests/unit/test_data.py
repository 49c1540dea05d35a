"""The data room: indexed format round trip and corruption, preprocess, splits, samples, sampler, cache."""
from __future__ import annotations

import json
import pathlib
import struct
import sysconfig

import numpy as np
import pytest
import torch

from megalm.data import preprocess as pp
from megalm.data.corpus import default_corpus_files, iter_documents
from megalm.data.dataset import BatchSampler, TokenDataset, eval_batches, split_documents
from megalm.data.errors import DataError
from megalm.data.indexed import HEADER_SIZE, IndexedDataset, IndexedDatasetWriter, best_dtype
from megalm.data.tokenizer import (
    EOD_TOKEN,
    load_tokenizer,
    padded_vocab_size,
    tokenizer_path,
    train_tokenizer,
)

RERUN = "re-run megalm preprocess"


def write_docs(prefix, docs, dtype="<u2"):
    with IndexedDatasetWriter(prefix, dtype) as w:
        for d in docs:
            w.add_document(d)
    return str(prefix)


def random_docs(n, vocab, seed=0, eod=0, max_len=200):
    rng = np.random.default_rng(seed)
    return [np.append(rng.integers(1, vocab, rng.integers(1, max_len)), eod) for _ in range(n)]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """60 documents of token ids below 1000, each ending with EOD = 0."""
    docs = random_docs(60, 1000)
    return write_docs(tmp_path_factory.mktemp("syn") / "syn", docs), docs


@pytest.fixture
def tiny_inputs(tmp_path):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("def add(a, b):\n    return a + b\n")
    (d / "sub" / "b.md").write_text("def add(a, b):\n    return a + b\n")  # exact duplicate of a.txt
    (d / "c.txt").write_text("  \n\t\n")  # empty after stripping
    (d / "e.txt").write_text("Cafe\u0301 au lait\n")  # decomposed e + accent, NFC-normalised to one char
    (d / "docs.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"text": "import os\nprint(os.getcwd())\n", "id": 1}, {"text": ""},
        {"text": "x = [i * i for i in range(9)]"},
    ]) + "\n")
    return d


# ---------------------------------------------------------------- indexed format

@pytest.mark.parametrize("dtype", ["<u1", "<u2", "<i4", "<u4", "<i8"])
def test_round_trip_tokens_written_equal_tokens_read(tmp_path, dtype):
    top = min(np.iinfo(dtype).max, 2**40)
    docs = random_docs(25, top, seed=1) + [np.array([], dtype=np.int64), np.array([top])]
    prefix = write_docs(tmp_path / "rt", docs, dtype)
    ds = IndexedDataset(prefix)
    assert len(ds) == len(docs) and ds.dtype == np.dtype(dtype)
    assert ds.num_tokens == sum(map(len, docs)) and ds.max_token_id == top
    np.testing.assert_array_equal(ds.doc_lengths, [len(d) for d in docs])
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i].astype(np.int64), d)
    np.testing.assert_array_equal(ds[-1], docs[-1])
    ds.verify()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rt.bin", "rt.idx"]  # no temporary files left


def test_best_dtype():
    assert best_dtype(8192) == np.uint16 and best_dtype(65536) == np.uint16
    assert best_dtype(65537) == np.int32 and best_dtype(200_000) == np.int32


def test_writer_rejects_ids_that_do_not_fit_and_cleans_up(tmp_path):
    with pytest.raises(DataError, match="token id 70000 does not fit"):
        write_docs(tmp_path / "w", [[1, 2], [70000]], "<u2")
    assert list(tmp_path.iterdir()) == []


def _corrupt(prefix, suffix, offset=None, data=None, truncate=None):
    path = pathlib.Path(f"{prefix}.{suffix}")
    raw = bytearray(path.read_bytes())
    if truncate is not None:
        raw = raw[:truncate]
    if data is not None:
        raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("suffix, kwargs, message", [
    ("bin", dict(truncate=-6), r"\.bin holds \d+ bytes but .*\.idx says \d+ .*truncated; " + RERUN),
    ("bin", dict(offset=10**6, data=b"\0\0"), r"\.bin holds \d+ bytes .*trailing bytes"),
    ("idx", dict(offset=0, data=b"X"), r"not the megalm magic .*corrupt"),
    ("idx", dict(offset=8, data=struct.pack("<I", 7)), r"format version 7, but this megalm reads version 1"),
    ("idx", dict(offset=12, data=b"\x09"), r"dtype code 9"),
    ("idx", dict(truncate=20), r"less than the 48-byte header: the file is truncated"),
    ("idx", dict(truncate=-8), r"header promises 30 documents .* truncated"),
    ("idx", dict(offset=HEADER_SIZE + 8 * 5, data=struct.pack("<Q", 2**40)), r"offsets .* corrupt"),
])
def test_corrupt_files_are_caught(tmp_path, suffix, kwargs, message):
    prefix = write_docs(tmp_path / "c", random_docs(30, 5000, seed=2))
    _corrupt(prefix, suffix, **kwargs)
    with pytest.raises(DataError, match=message):
        IndexedDataset(prefix)


def test_flipped_token_caught_by_checksum_before_training_reads_it(tmp_path):
    prefix = write_docs(tmp_path / "c", random_docs(30, 5000, seed=2))
    _corrupt(prefix, "bin", offset=100, data=b"\xff\xfe")
    ds = IndexedDataset(prefix)  # sizes are intact, so opening succeeds ...
    with pytest.raises(DataError, match="does not match the checksum"):
        ds.verify()
    with pytest.raises(DataError, match="does not match the checksum"):  # ... but building the index checks
        TokenDataset(prefix, "train", 16)


def test_missing_files_name_the_fix(tmp_path):
    with pytest.raises(DataError, match="not found: run megalm preprocess --output-prefix"):
        IndexedDataset(tmp_path / "nothing")


# ---------------------------------------------------------------- corpus and tokenizer

def test_default_corpus_is_the_stdlib_sorted_without_site_packages():
    files = default_corpus_files()
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    assert len(files) > 500 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and "os.py" in rel and files == default_corpus_files()
    assert next(iter_documents(None)) == files[0].read_text(encoding="utf-8", errors="replace")


def test_jsonl_errors_name_file_line_and_fix(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text key"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2 has no key 'text' \(found \['body'\]\).*--text-key"):
        list(iter_documents([str(bad)]))
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2 is not valid JSON"):
        list(iter_documents([str(bad)]))


def test_tokenizer_trains_deterministically_and_round_trips(tmp_path):
    texts = [f.read_text() for f in default_corpus_files()[:12]]
    a, b = train_tokenizer(texts, 600), train_tokenizer(texts, 600)
    assert a.to_str() == b.to_str() and a.vocab_size == 600
    assert a.eod_id == a._tok.token_to_id(EOD_TOKEN)
    assert a.decode(a.encode(texts[3])) == texts[3]
    a.save(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    for path in (tmp_path / "tokenizer.json", tmp_path):  # a file, or a Hugging Face folder
        c = load_tokenizer(path)
        assert c.encode(texts[5]) == a.encode(texts[5]) and c.eod_id == a.eod_id
    with pytest.raises(DataError, match="too small"):
        train_tokenizer(texts, 100)
    with pytest.raises(DataError, match="not found"):
        load_tokenizer(tmp_path / "missing")


def test_padded_and_resolved_vocab_size():
    assert padded_vocab_size(8192) == 8192 and padded_vocab_size(50257) == 50304
    assert padded_vocab_size(50257, 128, tp=4) == 50688 and padded_vocab_size(1, 64, 2) == 128
    from megalm.config import ConfigError
    from megalm.config.resolve import vocab_size_for

    assert vocab_size_for(None, 50257, tp=2) == 50432 and vocab_size_for(60000, 50257) == 60000
    with pytest.raises(ConfigError, match="model.vocab_size=1000 is smaller than the tokenizer's vocabulary "
                                          "50257: set model.vocab_size >= 50257"):
        vocab_size_for(1000, 50257)


# ---------------------------------------------------------------- preprocess

def _read_all(prefix):
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def test_preprocess_cleans_dedups_and_round_trips(tiny_inputs, tmp_path):
    prefix = str(tmp_path / "out" / "tiny")
    stats = pp.preprocess([str(tiny_inputs)], prefix, vocab_size=300, show_progress=False)
    assert stats["input_documents"] == 7 and stats["documents"] == 4
    assert stats["dropped_empty"] == 2 and stats["dropped_duplicate"] == 1
    tok = load_tokenizer(tokenizer_path(prefix))
    assert tok.vocab_size == stats["vocab_size"] and IndexedDataset(prefix).dtype == np.uint16
    # Files in sorted order: a.txt, c.txt (empty), docs.jsonl, e.txt, sub/b.md (duplicate).
    expected = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n",
                "x = [i * i for i in range(9)]", "Caf\u00e9 au lait\n"]
    docs = _read_all(prefix)
    assert docs == [tok.encode(t) + [tok.eod_id] for t in expected]  # tokens written == tokens read
    assert [tok.decode(d[:-1]) for d in docs] == expected


def test_preprocess_length_limits(tiny_inputs, tmp_path):
    stats = pp.preprocess([str(tiny_inputs)], str(tmp_path / "t"), vocab_size=300, min_chars=15,
                          max_chars=30, show_progress=False)
    # Short: the 13-character cafe line; long: the 32-character add() and its copy (limits apply first).
    assert stats["dropped_short"] == 1 and stats["dropped_long"] == 2 and stats["documents"] == 2


def test_preprocess_output_is_identical_for_any_worker_count(tmp_path, monkeypatch):
    monkeypatch.setattr(pp, "_CHUNK_CHARS", 4000)  # many chunks, so ordering across workers matters
    inputs = [str(f) for f in default_corpus_files()[:25]]
    outs = {}
    for workers in (1, 2):
        prefix = tmp_path / f"w{workers}"
        stats = pp.preprocess(inputs, str(prefix), vocab_size=512, workers=workers, show_progress=False)
        outs[workers] = [pathlib.Path(f"{prefix}{s}").read_bytes()
                         for s in (".bin", ".idx", ".tokenizer.json")]
    assert outs[1] == outs[2]
    tok = load_tokenizer(tokenizer_path(tmp_path / "w2"))
    texts = [pathlib.Path(f).read_text() for f in inputs]
    texts = [t for i, t in enumerate(texts) if t.strip() and t not in texts[:i]]
    assert stats["documents"] == len(texts)
    assert _read_all(tmp_path / "w2") == [tok.encode(t) + [tok.eod_id] for t in texts]


def test_preprocess_with_given_tokenizer_and_vocab_checks(tiny_inputs, tmp_path, capsys):
    first = str(tmp_path / "first")
    pp.preprocess([str(tiny_inputs)], first, vocab_size=300, show_progress=False)
    given = tokenizer_path(first)
    vocab = load_tokenizer(given).vocab_size
    second = str(tmp_path / "second")
    argv = ["--input", str(tiny_inputs), "--output-prefix", second, "--tokenizer", given, "--workers", "1"]
    assert pp.main(argv + ["--quiet"]) == 0
    assert _read_all(second) == _read_all(first)

    # An explicit vocabulary smaller than the tokenizer's is refused before any output is written.
    third = tmp_path / "third"
    assert pp.main(argv[:3] + [str(third)] + argv[4:] + ["--vocab-size", str(vocab - 1)]) == 2
    err = capsys.readouterr().err
    assert f"--vocab-size {vocab - 1} is smaller than the vocabulary of tokenizer" in err
    assert f"({vocab} tokens)" in err and f"--vocab-size >= {vocab}" in err
    assert not list(tmp_path.glob("third*"))


@pytest.mark.parametrize("inputs, kwargs, message", [
    (["/no/such/file.txt"], {}, "input /no/such/file.txt does not exist"),
    (None, dict(workers=0), "--workers 0 must be at least 1"),
    (None, dict(vocab_size=100), "--vocab-size 100 is too small"),
    (None, dict(min_chars=10, max_chars=5), "min_chars=10, max_chars=5"),
])
def test_preprocess_rejects_bad_options_before_work(tmp_path, inputs, kwargs, message):
    with pytest.raises(DataError, match=message):
        pp.preprocess(inputs, str(tmp_path / "x"), show_progress=False, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_preprocess_reports_progress_and_throughput(tiny_inputs, tmp_path, capsys):
    pp.preprocess([str(tiny_inputs / "a.txt")], str(tmp_path / "p"), vocab_size=300)
    out = capsys.readouterr().out
    assert "documents/s" in out and "tokens/s" in out and "MB/s" in out


# ---------------------------------------------------------------- splits and samples

def test_split_documents_is_deterministic_disjoint_and_complete():
    for n in (3, 4, 10, 1000):
        s = split_documents(n)
        assert all(len(s[k]) >= 1 for k in ("train", "valid", "test"))
        allids = np.concatenate(list(s.values()))
        assert sorted(allids.tolist()) == list(range(n))  # disjoint and complete
        for k in s:
            np.testing.assert_array_equal(s[k], split_documents(n)[k])
    s = split_documents(10000, (80, 15, 5))
    assert [len(s[k]) for k in ("train", "valid", "test")] == [8000, 1500, 500]
    assert not np.array_equal(split_documents(1000, seed=1)["valid"], split_documents(1000, seed=2)["valid"])
    assert len(split_documents(5, (1, 0, 0))["test"]) == 0
    with pytest.raises(DataError, match="three non-negative numbers"):
        split_documents(10, (1, -1, 0))


def test_samples_are_windows_of_the_split_stream(synthetic):
    prefix, docs = synthetic
    ds = TokenDataset(prefix, "train", seq_len=32)
    stream = np.concatenate([docs[i] for i in ds.docs])
    assert len(ds) == (len(stream) - 1) // 32
    for k in (0, 1, len(ds) // 2, len(ds) - 1):
        np.testing.assert_array_equal(ds.sample(k), stream[k * 32:k * 32 + 33])
    first_epoch = [tuple(ds[i]) for i in range(len(ds))]
    assert sorted(first_epoch) == sorted(tuple(ds.sample(k)) for k in range(len(ds)))  # a permutation
    assert first_epoch != [tuple(ds.sample(k)) for k in range(len(ds))]  # ... that is shuffled
    again = TokenDataset(prefix, "train", seq_len=32)
    for i in (0, 5, len(ds) + 3, 3 * len(ds) + 1):  # any index, later epochs included, same everywhere
        np.testing.assert_array_equal(ds[i], again[i])
        assert ds[i].dtype == np.int64 and ds[i].shape == (33,)
    assert [tuple(ds[len(ds) + i]) for i in range(len(ds))] != first_epoch  # epoch 2 is reshuffled
    assert [tuple(TokenDataset(prefix, "train", 32, seed=7)[i]) for i in range(len(ds))] != first_epoch
    assert not set(TokenDataset(prefix, "valid", 8).docs) & set(ds.docs)


def test_sample_index_cache_is_reused_and_keyed(synthetic, tmp_path, monkeypatch):
    prefix = write_docs(tmp_path / "d", synthetic[1])
    ds = TokenDataset(prefix, "train", 16)
    assert ds.cache_path.is_file() and ds.cache_path.parent == tmp_path
    built = []
    monkeypatch.setattr(TokenDataset, "_save_index", lambda self, index: built.append(1))
    again = TokenDataset(prefix, "train", 16)
    assert built == [] and again.cache_path == ds.cache_path
    np.testing.assert_array_equal(again[3], ds[3])
    assert TokenDataset(prefix, "train", 17).cache_path != ds.cache_path and built == [1]
    assert TokenDataset(prefix, "valid", 16).cache_path != ds.cache_path and built == [1, 1]
    write_docs(prefix, synthetic[1][:-1])  # a rewritten dataset never reuses the old index
    assert TokenDataset(prefix, "train", 16).cache_path != ds.cache_path and len(built) == 3
    ds.cache_path.write_bytes(b"garbage")  # a damaged cache is rebuilt
    write_docs(prefix, synthetic[1])
    np.testing.assert_array_equal(TokenDataset(prefix, "train", 16)[3], ds[3])


def test_token_beyond_vocab_and_short_split_are_clear_errors(synthetic):
    prefix, docs = synthetic
    top = int(max(d.max() for d in docs))
    TokenDataset(prefix, "train", 8, vocab_size=top + 1)
    with pytest.raises(DataError, match=rf"token id {top} in .* is beyond the model's vocabulary {top}: "
                                        rf"set model.vocab_size >= {top + 1}"):
        TokenDataset(prefix, "train", 8, vocab_size=top)
    with pytest.raises(DataError, match=r"split 'test' .* fewer than seq_len \+ 1 = 100001"):
        TokenDataset(prefix, "test", 100000)


# ---------------------------------------------------------------- sampler

@pytest.fixture(scope="module")
def train_ds(synthetic):
    return TokenDataset(synthetic[0], "train", seq_len=8)


def test_union_of_dp_slices_is_the_global_batch(train_ds):
    gbs = 8
    reference = BatchSampler(train_ds, gbs, micro_batch_size=8)
    for step in range(3):
        (full,) = reference.next_batch()
        assert full.shape == (8, 9) and full.dtype == torch.int64
        for dp, mbs in ((1, 2), (2, 1), (2, 2), (4, 1), (4, 2)):
            got = []
            for r in range(dp):
                s = BatchSampler(train_ds, gbs, mbs, dp_rank=r, dp_size=dp, consumed_samples=step * gbs)
                micro = s.next_batch()
                assert len(micro) == gbs // dp // mbs and all(m.shape == (mbs, 9) for m in micro)
                got.extend(micro)
            assert torch.equal(torch.cat(got), full)


def test_resume_from_state_dict_reads_the_same_samples(train_ds):
    run = BatchSampler(train_ds, 4, 2, dp_rank=1, dp_size=2)
    for _ in range(3):
        run.next_batch()
    state = {"consumed_samples": run.consumed_samples}            # what a checkpoint stores
    assert state == {"consumed_samples": 12}
    expected = [run.next_batch() for _ in range(2 * len(train_ds))]  # crosses epoch boundaries
    resumed = BatchSampler(train_ds, 4, 2, dp_rank=1, dp_size=2)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    for want in expected:
        assert all(torch.equal(a, b) for a, b in zip(resumed.next_batch(), want))


def test_sampler_validates_batch_sizes(train_ds):
    with pytest.raises(ValueError, match=r"global_batch_size=10 is not divisible by micro_batch_size x dp = "
                                         r"2 x 2 = 4: use a global batch that is a multiple of 4 \(e.g. 8\)"):
        BatchSampler(train_ds, 10, 2, dp_size=2)
    with pytest.raises(DataError, match=r"dp_rank=2"):
        BatchSampler(train_ds, 8, 2, dp_rank=2, dp_size=2)
    with pytest.raises(DataError, match="consumed_samples=-1"):
        BatchSampler(train_ds, 8, 2).load_state_dict({"consumed_samples": -1})


def test_eval_batches_are_unshuffled_and_deterministic(train_ds):
    batches = list(eval_batches(train_ds, micro_batch_size=3, max_samples=10))
    assert len(batches) == 3 and all(b.shape == (3, 9) for b in batches)
    np.testing.assert_array_equal(torch.cat(batches).numpy(), [train_ds.sample(k) for k in range(9)])
    assert all(torch.equal(a, b) for a, b in zip(batches, eval_batches(train_ds, 3, 10)))
    with pytest.raises(DataError, match="cannot fill one micro-batch of 4"):
        eval_batches(train_ds, 4, 3)
