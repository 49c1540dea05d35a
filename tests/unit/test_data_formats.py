"""Every input format gives the same tokens as plain text; compressed, binary and bad inputs; overwrite; merge."""
from __future__ import annotations

import bz2
import gzip
import json
import lzma

import numpy as np
import pytest

from megalm.data import preprocess as pp
from megalm.data.errors import DataError
from megalm.data.indexed import IndexedDataset
from megalm.data.merge import main as merge_main
from megalm.data.merge import merge
from megalm.data.readers import identify
from megalm.data.tokenizer import tokenizer_path

DOCS = ["def add(a, b):\n    return a + b\n", "Caf\u00e9 au lait, s'il vous pla\u00eet.\n",
        "# Notes\n\n- one\n- two\n", "\u65e5\u672c\u8a9e\u306e\u6587\u7ae0\u3002 \U0001f600 emoji too"]


def _read_all(prefix):
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The documents as plain text files, tokenized with a tokenizer trained on them."""
    root = tmp_path_factory.mktemp("ref")
    for i, doc in enumerate(DOCS):
        (root / "txt" / f"{i}.txt").parent.mkdir(exist_ok=True)
        (root / "txt" / f"{i}.txt").write_text(doc)
    prefix = str(root / "ref")
    pp.preprocess([str(root / "txt")], prefix, vocab_size=300, show_progress=False)
    return root, prefix, _read_all(prefix)


def _jsonl(docs) -> bytes:
    return "".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs)).encode()


def _zstd(data: bytes) -> bytes:
    import zstandard
    return zstandard.ZstdCompressor().compress(data)


def _write_format(root, fmt):
    """Write DOCS in format ``fmt`` under root/fmt; returns the --input path."""
    folder = root / fmt
    folder.mkdir()
    if fmt.startswith("text"):
        squeeze = {"text.gz": gzip.compress, "text.zst": _zstd, "text.xz": lzma.compress, "text.bz2": bz2.compress,
                   "text": lambda b: b}[fmt]
        suffix = {"text": "", "text.gz": ".gz", "text.zst": ".zst", "text.xz": ".xz", "text.bz2": ".bz2"}[fmt]
        for i, doc in enumerate(DOCS):
            (folder / f"{i}.md{suffix}").write_bytes(squeeze(doc.encode()))
        return folder
    if fmt.startswith("jsonl"):
        squeeze = {"jsonl": lambda b: b, "jsonl.gz": gzip.compress, "jsonl.zst": _zstd, "jsonl.xz": lzma.compress,
                   "jsonl.bz2": bz2.compress}[fmt]
        path = folder / f"docs.{fmt}"
        path.write_bytes(squeeze(_jsonl(DOCS)))
        return path
    if fmt == "json-array":
        path = folder / "docs.json"
        path.write_text(json.dumps([{"body": d, "n": 1} for d in DOCS], indent=2))
        return path
    import pyarrow as pa
    table = pa.table({"id": list(range(len(DOCS))), "body": DOCS})
    if fmt == "parquet":
        import pyarrow.parquet as pq
        pq.write_table(table, folder / "docs.parquet", row_group_size=2)
        return folder / "docs.parquet"
    if fmt in ("arrow-file", "arrow-stream"):
        path = folder / "docs.arrow"
        with pa.OSFile(str(path), "wb") as sink:
            writer = pa.ipc.new_file if fmt == "arrow-file" else pa.ipc.new_stream
            with writer(sink, table.schema) as w:
                for batch in table.to_batches(max_chunksize=3):
                    w.write_batch(batch)
        return path
    assert fmt == "hf-dataset"
    import datasets
    datasets.Dataset.from_dict({"id": list(range(len(DOCS))), "body": DOCS}).save_to_disk(str(folder / "ds"),
                                                                                         num_shards=2)
    return folder / "ds"


FORMATS = ["text", "text.gz", "text.zst", "text.xz", "text.bz2", "jsonl", "jsonl.gz", "jsonl.zst", "jsonl.xz",
           "jsonl.bz2", "json-array", "parquet", "arrow-file", "arrow-stream", "hf-dataset"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_gives_the_tokens_of_plain_text(reference, tmp_path, fmt):
    root, ref_prefix, expected = reference
    source = _write_format(tmp_path, fmt)
    out = str(tmp_path / "out")
    stats = pp.preprocess([str(source)], out, text_key="body", tokenizer=tokenizer_path(ref_prefix),
                          show_progress=False)
    assert _read_all(out) == expected
    assert stats["documents"] == len(DOCS) and stats["inputs"].get("read") >= 1
    item = identify(next(source.iterdir()) if fmt.startswith("text") else source)
    assert item.compression == {"gz": "gzip", "zst": "zstd", "xz": "xz", "bz2": "bz2"}.get(fmt.split(".")[-1])
    assert item.kind == {"arrow-file": "arrow", "arrow-stream": "arrow"}.get(fmt, fmt.split(".")[0])


def test_compressed_file_without_a_suffix_is_recognised_by_its_bytes(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(gzip.compress(b"plain words inside gzip\n"))
    item = identify(path)
    assert (item.kind, item.compression) == ("text", "gzip")


def test_binary_files_are_skipped_and_counted(reference, tmp_path):
    root, ref_prefix, _ = reference
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.txt").write_text(DOCS[0])
    (folder / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    (folder / "blob.dat").write_bytes(b"abc\x00def" * 10)
    (folder / "lib.so.gz").write_bytes(gzip.compress(b"\x7fELF\x02\x01\x01" + bytes(100)))
    out = str(tmp_path / "out")
    stats = pp.preprocess([str(folder)], out, tokenizer=tokenizer_path(ref_prefix), show_progress=False)
    assert stats["documents"] == 1 and stats["inputs"] == {"read": 1, "skipped_binary": 3}
    skipped = {s["path"].rsplit("/", 1)[-1]: s["why"] for s in stats["report"]["inputs"]["skipped"]}
    assert set(skipped) == {"image.png", "blob.dat", "lib.so.gz"}
    assert "NUL byte" in skipped["blob.dat"] and "signature" in skipped["image.png"]


def _bad_folder(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.txt").write_text(DOCS[0])
    (folder / "b.json").write_text('{"name": "not a record", "version": 1}')     # one object, no "text" key
    (folder / "c.txt").write_bytes("caf\u00e9".encode("latin-1"))              # not UTF-8
    (folder / "d.jsonl").write_text('{"text": "good line"}\n{"text": broken\n')  # fails part-way
    (folder / "e.json").write_text('{\n  "name": "package",\n  "version": 2\n}\n')  # pretty-printed object
    return folder


def test_on_error_stop_refuses_before_any_work(reference, tmp_path, capsys):
    _, ref_prefix, _ = reference
    folder = _bad_folder(tmp_path)
    out = tmp_path / "out"
    argv = ["--input", str(folder), "--output-prefix", str(out), "--tokenizer", tokenizer_path(ref_prefix),
            "--workers", "1", "--quiet"]
    assert pp.main(argv) == 2
    err = capsys.readouterr().err
    assert "b.json:1 has no key 'text' (found ['name', 'version'])" in err and "--text-key" in err
    assert "the run stopped before any work" in err
    assert list(tmp_path.glob("out*")) == []


def test_on_error_skip_lists_each_bad_file_and_keeps_the_rest(reference, tmp_path):
    _, ref_prefix, _ = reference
    folder = _bad_folder(tmp_path)
    stats = pp.preprocess([str(folder)], str(tmp_path / "out"), tokenizer=tokenizer_path(ref_prefix),
                          on_error="skip", show_progress=False)
    assert stats["inputs"] == {"read": 1, "skipped_unreadable": 3, "failed_partway": 1}
    assert stats["documents"] == 2        # a.txt and the good first line of d.jsonl
    fates = {s["path"].rsplit("/", 1)[-1]: s for s in stats["report"]["inputs"]["skipped"]}
    assert "not UTF-8 (byte 0xe9" in fates["c.txt"]["why"] and "--decode-errors replace" in fates["c.txt"]["why"]
    assert fates["d.jsonl"]["fate"] == "failed_partway" and "d.jsonl:2 is not valid JSON" in fates["d.jsonl"]["why"]
    assert "one JSON document spread over lines" in fates["e.json"]["why"]


def test_decode_errors_replace_reads_non_utf8_with_replacement_characters(reference, tmp_path):
    _, ref_prefix, _ = reference
    (tmp_path / "latin.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    out = str(tmp_path / "out")
    pp.preprocess([str(tmp_path / "latin.txt")], out, tokenizer=tokenizer_path(ref_prefix),
                  decode_errors="replace", show_progress=False)
    from megalm.data.tokenizer import load_tokenizer
    tok = load_tokenizer(tokenizer_path(out))
    assert tok.decode(_read_all(out)[0][:-1]) == "caf\ufffd cr\ufffdme"


def test_existing_output_is_refused_unless_overwrite(reference, tmp_path, capsys):
    root, ref_prefix, expected = reference
    out = str(tmp_path / "out")
    args = dict(tokenizer=tokenizer_path(ref_prefix), show_progress=False)
    pp.preprocess([str(root / "txt" / "0.txt")], out, **args)
    before = {s: open(f"{out}{s}", "rb").read() for s in (".bin", ".idx")}
    with pytest.raises(DataError, match=r"already holds .*out.bin.*pass --overwrite"):
        pp.preprocess([str(root / "txt")], out, **args)
    assert {s: open(f"{out}{s}", "rb").read() for s in (".bin", ".idx")} == before     # nothing lost
    pp.preprocess([str(root / "txt")], out, overwrite=True, **args)
    assert _read_all(out) == expected


def test_a_dataset_dict_folder_is_refused_with_the_split_to_pass(tmp_path):
    import datasets
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a b c"]}),
                               "test": datasets.Dataset.from_dict({"text": ["d e f"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"DatasetDict with splits \['test', 'train'\].*--input .*dd/test"):
        pp.preprocess([str(tmp_path / "dd")], str(tmp_path / "out"), show_progress=False)


# ---------------------------------------------------------------- shards and merge

def test_shards_merged_equal_the_whole(tmp_path):
    from megalm.data.corpus import default_corpus_files
    files = [str(f) for f in default_corpus_files()[:30]]
    whole = str(tmp_path / "whole")
    pp.preprocess(files, whole, vocab_size=400, show_progress=False)
    parts = []
    for i in range(3):
        parts.append(str(tmp_path / f"part{i}"))
        pp.preprocess(files, parts[-1], tokenizer=tokenizer_path(whole), shard=(i, 3), show_progress=False)
    assert sum(len(IndexedDataset(p)) for p in parts) == len(IndexedDataset(whole))
    assert merge_main(parts + ["--output-prefix", str(tmp_path / "merged")]) == 0
    for suffix in (".bin", ".idx"):
        assert open(f"{tmp_path}/merged{suffix}", "rb").read() == open(f"{whole}{suffix}", "rb").read()
    IndexedDataset(tmp_path / "merged").verify()


def test_merge_refuses_parts_of_another_tokenizer(tmp_path, reference):
    root, ref_prefix, _ = reference
    other = str(tmp_path / "other")
    pp.preprocess([str(root / "txt")], other, vocab_size=280, show_progress=False)
    with pytest.raises(DataError, match=r"another tokenizer.*same --tokenizer"):
        merge([ref_prefix, other], str(tmp_path / "m"))
    assert not list(tmp_path.glob("m.*"))


def test_indexed_writer_streams_offsets(tmp_path):
    """Many documents written in blocks read back exactly (the offsets are streamed to disk, not held)."""
    from megalm.data.indexed import IndexedDatasetWriter
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 9, 5000)
    flat = rng.integers(0, 60000, int(lengths.sum())).astype(np.uint16)
    with IndexedDatasetWriter(tmp_path / "s", np.uint16) as w:
        for block in np.array_split(np.arange(5000), 7):
            lo, hi = lengths[:block[0]].sum(), lengths[:block[-1] + 1].sum()
            w.add_documents(flat[lo:hi], lengths[block])
    ds = IndexedDataset(tmp_path / "s")
    assert np.array_equal(ds.doc_lengths, lengths) and np.array_equal(ds.tokens(0, len(flat)), flat)
    ds.verify()
