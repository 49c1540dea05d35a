"""Cleaning: each quality filter passes and fails hand-made documents; near-duplicate removal's recall and
precision on planted near-copies, the same for any number of workers; the report; memory that does not grow."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from megalm.data import preprocess as pp
from megalm.data.errors import DataError
from megalm.data.indexed import IndexedDataset
from megalm.data.neardup import NearDupConfig
from megalm.data.quality import MEASURES, PRESETS, View, first_rejection, parse_filters
from megalm.data.tokenizer import load_tokenizer, tokenizer_path

PROSE = ("The history of the river valley is told in the layers of its rocks. Each flood left a band of silt, "
         "and the farmers who came later learned to read them. They planted with the seasons and traded with "
         "the towns downstream. Over the centuries the villages grew into market towns, and the market towns "
         "into a city that still depends on the water that made it. Today the valley is known for its orchards, "
         "its old stone bridges and a festival that marks the first harvest of the year.\n") * 1
CASES = {  # filter: (a document it passes, a document it fails)
    "word_count": (PROSE, "Too short to be a page."),
    "mean_word_length": (PROSE, " ".join(["a b c d e f g h i j"] * 10)),
    "symbol_word_ratio": (PROSE, PROSE + " ".join(["#tag"] * 30)),
    "bullet_lines": (PROSE, "\n".join(f"- item number {i} of the list" for i in range(20))),
    "ellipsis_lines": (PROSE, "\n".join(f"and then the story went on {i}..." for i in range(10))),
    "alpha_words": (PROSE, " ".join(str(i) for i in range(200)) + " the and of to"),
    "stop_words": (PROSE, " ".join(["river valley rocks farmers"] * 20)),
    "digit_ratio": (PROSE, "Prices: " + " ".join(str(1000 + i) for i in range(100))),
    "dup_lines": (PROSE, "\n".join(["Click here to subscribe."] * 5 + ["A different line.", "Another one."])),
    "dup_line_chars": (PROSE, "\n".join(["Click here to subscribe to our newsletter today."] * 4 + ["End."])),
    "top_2gram": (PROSE, " ".join(["free shipping"] * 40) + " on all orders today"),
    "top_3gram": (PROSE, " ".join(["buy it now"] * 40) + " while stocks last"),
    "top_4gram": (PROSE, " ".join(["sign up for free"] * 40) + " while stocks last"),
    **{f"dup_{n}gram": (PROSE, PROSE + PROSE) for n in range(5, 11)},
    "line_punct": (PROSE, "\n".join(f"Menu entry {i}" for i in range(12))),
    "short_lines": (PROSE, "\n".join(f"Link {i}" for i in range(12))),
    "lorem_ipsum": (PROSE, PROSE + " Lorem ipsum dolor sit amet."),
    "curly_bracket": (PROSE, PROSE + " function() { return 1; }"),
}


def _filter(name):
    return next(f for f in parse_filters(["gopher", "fineweb", "c4", "digit_ratio"]) if f.name == name)


def test_every_measure_has_a_case():
    assert set(CASES) == set(MEASURES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_filter_passes_and_fails_hand_made_documents(name):
    good, bad = CASES[name]
    f = _filter(name)
    assert f.reject(View(good)) is None, (name, MEASURES[name](View(good)))
    value = f.reject(View(bad))
    assert value is not None and not f.low <= value <= f.high


def test_measures_are_what_their_definitions_say():
    assert MEASURES["word_count"](View("Hello, world -- 42 !!")) == 3        # punctuation-only tokens are no words
    assert MEASURES["top_2gram"](View("a b c a b c x y")) == pytest.approx(4 / 8)
    assert MEASURES["dup_5gram"](View("one two three four five one two three four five six")) == \
        pytest.approx(38 / 41)
    assert MEASURES["dup_lines"](View("x\ny\nx\nx")) == pytest.approx(0.5)
    assert MEASURES["line_punct"](View("Done.\nnot done\nReally?\nyes")) == pytest.approx(0.5)


def test_filter_specs_presets_overrides_and_errors():
    names = [f.name for f in parse_filters(["gopher"])]
    assert names == list(PRESETS["gopher"])
    fs = parse_filters(["gopher", "word_count:min=5,max=60"])
    assert next(f for f in fs if f.name == "word_count").describe() == "word_count:min=5,max=60"
    assert first_rejection(parse_filters(["word_count:min=5"]), "one two") == ("word_count", 2)
    for spec, message in [("gophr", "neither a filter nor a preset"), ("word_count:min=x", "min=NUMBER"),
                          ("word_count:min=9,max=1", "above max"), ("word_count:low=1", "min=NUMBER")]:
        with pytest.raises(DataError, match=message):
            parse_filters([spec])


# ---------------------------------------------------------------- near duplicates

def _near_dup_corpus(seed=0, bases=240, copies=80):
    """Unrelated documents of random words, plus near-copies of some of them with 1-3% of the words edited."""
    rng = np.random.default_rng(seed)
    vocab = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(3, 9))) for _ in range(4000)]
    docs = [" ".join(rng.choice(vocab, rng.integers(150, 400))) for _ in range(bases)]
    planted = []
    for k in range(copies):
        words = docs[rng.integers(0, bases)].split()
        edits = rng.choice(len(words), max(1, int(len(words) * rng.uniform(0.01, 0.03))), replace=False)
        for e in edits:
            words[e] = rng.choice(vocab)
        planted.append(" ".join(words))
    order = rng.permutation(bases + copies)
    corpus = (docs + planted)
    # Every planted copy comes after its original, so "first copy kept" makes the copies the ones to remove.
    originals = [d for d in (corpus[i] for i in order) if d in set(docs)]
    return originals + planted, set(planted)


def _kept_texts(prefix):
    tok = load_tokenizer(tokenizer_path(prefix))
    ds = IndexedDataset(prefix)
    return [tok.decode(ds[i].tolist()[:-1]) for i in range(len(ds))]


@pytest.mark.slow
def test_near_duplicates_recall_and_precision_do_not_depend_on_workers(tmp_path, monkeypatch):
    monkeypatch.setattr(pp, "_CHUNK_CHARS", 20_000)           # many chunks across the workers
    corpus, planted = _near_dup_corpus()
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus))
    cfg = NearDupConfig(shingle=5, num_perm=128, bands=20, threshold=0.6, seed=7)
    outs = {}
    for workers in (1, 2):
        prefix = str(tmp_path / f"w{workers}")
        stats = pp.preprocess([str(src)], prefix, vocab_size=300, workers=workers, near_dup=cfg,
                              show_progress=False)
        outs[workers] = (open(f"{prefix}.bin", "rb").read(), stats["dropped_near_duplicate"])
    assert outs[1] == outs[2]
    kept = set(_kept_texts(str(tmp_path / "w2")))
    removed = set(corpus) - kept
    true_positive = len(removed & planted)
    recall, precision = true_positive / len(planted), true_positive / max(1, len(removed))
    print(f"near-dup recall {recall:.3f}, precision {precision:.3f}")
    assert recall >= 0.95 and precision >= 0.95


def test_near_dup_settings_are_checked():
    with pytest.raises(DataError, match="bands=200"):
        NearDupConfig(num_perm=128, bands=200)
    with pytest.raises(DataError, match="threshold 1.5"):
        NearDupConfig(threshold=1.5)


# ---------------------------------------------------------------- the report

def test_report_counts_documents_and_tokens_per_stage_with_examples(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    docs = {"good.txt": PROSE, "copy.txt": PROSE, "short.txt": "Too short to be a page.",
            "lorem.txt": PROSE + " Lorem ipsum dolor sit amet.", "empty.txt": "\n"}
    for name, text in docs.items():
        (folder / name).write_text(text)
    prefix = str(tmp_path / "out")
    stats = pp.preprocess([str(folder)], prefix, vocab_size=300, quality=["gopher", "c4"], show_progress=False)
    report = json.loads(pathlib.Path(f"{prefix}.report.json").read_text())
    removed = report["removed"]
    assert removed["empty"]["documents"] == 1 and removed["word_count"]["documents"] == 1
    assert removed["lorem_ipsum"]["documents"] == 1 and removed["duplicate"]["documents"] == 1
    assert report["kept"]["documents"] == 1 == stats["documents"]
    tok = load_tokenizer(tokenizer_path(prefix))
    assert removed["word_count"]["tokens"] == len(tok.encode(docs["short.txt"])) + 1
    assert removed["word_count"]["examples"] == [{"value": 6, "excerpt": docs["short.txt"]}]
    assert report["read"]["tokens"] == report["kept"]["tokens"] + sum(r["tokens"] for r in removed.values())
    assert sum(report["lengths"]["before"]) == 5 and sum(report["lengths"]["after"]) == 1
    assert pathlib.Path(f"{prefix}.lengths.png").stat().st_size > 1000
    assert report["settings"]["quality"][0] == "word_count:min=50,max=100000"


def test_console_table_names_each_stage(tmp_path, capsys):
    (tmp_path / "a.txt").write_text(PROSE)
    pp.preprocess([str(tmp_path / "a.txt")], str(tmp_path / "o"), vocab_size=300, quality=["fineweb"])
    out = capsys.readouterr().out
    for row in ("read", "- empty", "- line_punct", "- short_lines", "- duplicate", "= kept", "inputs: 1 read"):
        assert row in out


# ---------------------------------------------------------------- memory

_MEASURE = """
import json, sys
from megalm.data.memory import peak_rss_bytes
from megalm.data.preprocess import preprocess
from megalm.data.neardup import NearDupConfig
r = preprocess([sys.argv[1]], sys.argv[2], tokenizer=sys.argv[3], workers=1, near_dup=NearDupConfig(),
               show_progress=False)
print(json.dumps({"rss": peak_rss_bytes(),
                  "index": r["report"]["growing_index_bytes"], "docs": r["documents"]}))
"""


@pytest.mark.slow
def test_peak_memory_grows_only_by_the_dedup_index(tmp_path):
    rng = np.random.default_rng(1)
    words = ["".join(rng.choice(list("abcdefghij"), 5)) for _ in range(3000)]
    def write(path, n):
        with open(path, "w") as f:
            for _ in range(n):
                f.write(json.dumps({"text": " ".join(rng.choice(words, 150))}) + "\n")
    write(tmp_path / "x1.jsonl", 4000)                         # past the warm-up of caches and allocator
    write(tmp_path / "x10.jsonl", 40000)                       # about 4 MB and 40 MB of text
    (tmp_path / "t.txt").write_text(" ".join(words))
    pp.preprocess([str(tmp_path / "t.txt")], str(tmp_path / "tok"), vocab_size=300, show_progress=False)
    runs = {}
    for name in ("x1", "x10"):
        out = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / f"{name}.jsonl"),
                              str(tmp_path / f"o{name}"), tokenizer_path(tmp_path / "tok")],
                             capture_output=True, text=True, check=True)
        runs[name] = json.loads(out.stdout.strip().splitlines()[-1])
    growth, index_growth = runs["x10"]["rss"] - runs["x1"]["rss"], runs["x10"]["index"] - runs["x1"]["index"]
    print(f"peak RSS {runs['x1']['rss'] / 2**20:.0f} MiB at 1x, {runs['x10']['rss'] / 2**20:.0f} MiB at 10x; "
          f"dedup index {runs['x1']['index'] / 2**20:.1f} -> {runs['x10']['index'] / 2**20:.1f} MiB")
    assert runs["x10"]["docs"] == 40000
    assert growth - index_growth <= 16 * 2**20      # everything else stays the same size
