"""Reading one input: what it is (by its bytes, not only its name), and the documents in it.

Kinds: ``text`` (any text, Markdown or source file: one document), ``jsonl`` (one JSON object per line),
``json-array`` (a JSON list of objects or strings), ``json-document`` (one JSON object over many lines:
refused), ``parquet``, ``arrow`` (Arrow IPC file or stream) and ``hf-dataset`` (a Hugging Face ``datasets``
folder written by ``save_to_disk``). Any of the file kinds may be compressed with gzip, zstd, xz or bz2;
compression is recognised by its magic bytes and the kind by the name with the compression suffix taken off
(``a.jsonl.gz`` is gzip-compressed JSON lines). A file whose first bytes hold a NUL or a known binary signature
is ``binary`` and is skipped, never read as text.

Every problem is an ``InputError`` naming the file (and line or row) and the fix.
"""
from __future__ import annotations

import bz2
import codecs
import gzip
import io
import json
import lzma
import pathlib
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from megalm.data.errors import DataError

SNIFF_BYTES = 1 << 16
COMPRESSIONS = {  # name: (magic, file suffix)
    "gzip": (b"\x1f\x8b", ".gz"),
    "zstd": (b"\x28\xb5\x2f\xfd", ".zst"),
    "xz": (b"\xfd7zXZ\x00", ".xz"),
    "bz2": (b"BZh", ".bz2"),
}
_BINARY_MAGIC = (b"\x89PNG", b"GIF8", b"\xff\xd8\xff", b"%PDF", b"\x7fELF", b"PK\x03\x04", b"\xca\xfe\xba\xbe",
                 b"\x00asm", b"SQLite format 3", b"OggS", b"RIFF", b"ID3", b"\x00\x00\x01\x00", b"!<arch>")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
DECODE_POLICIES = ("strict", "replace")


class InputError(DataError):
    """One input cannot be read as documents; the message names the file, the place and the fix."""


@dataclass(frozen=True)
class Input:
    path: pathlib.Path
    kind: str                         # text, jsonl, json-array, parquet, arrow, hf-dataset, binary
    compression: str | None = None    # gzip, zstd, xz, bz2 or None
    why: str = ""                     # for kind == "binary": what gave it away


def is_hf_dataset_folder(path: pathlib.Path) -> bool:
    return path.is_dir() and (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def open_bytes(path: pathlib.Path, compression: str | None) -> BinaryIO:
    """The file's bytes, decompressed."""
    if compression is None:
        return open(path, "rb")
    if compression == "gzip":
        return gzip.open(path, "rb")
    if compression == "xz":
        return lzma.open(path, "rb")
    if compression == "bz2":
        return bz2.open(path, "rb")
    import zstandard
    return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True, read_across_frames=True)


def _compression_of(head: bytes) -> str | None:
    return next((name for name, (magic, _) in COMPRESSIONS.items() if head.startswith(magic)), None)


def _inner_suffix(path: pathlib.Path, compression: str | None) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if compression and suffixes and suffixes[-1] == COMPRESSIONS[compression][1]:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def _binary_sign(head: bytes) -> str:
    """Why ``head`` (the first decompressed bytes) is not text, or '' when it may be."""
    for magic in _BINARY_MAGIC:
        if head.startswith(magic):
            return f"starts with the binary signature {magic[:8]!r}"
    nul = head.find(b"\x00")
    if nul >= 0:
        return f"holds a NUL byte at offset {nul}"
    controls = sum(b < 9 or 13 < b < 32 for b in head)
    if head and controls > len(head) // 10:
        return f"{controls} of its first {len(head)} bytes are control characters"
    return ""


def identify(path: pathlib.Path) -> Input:
    """What ``path`` is, from its first bytes and its name; reads at most SNIFF_BYTES (decompressed)."""
    if is_hf_dataset_folder(path):
        return Input(path, "hf-dataset")
    with open(path, "rb") as f:
        raw = f.read(8)
    compression = _compression_of(raw)
    if raw.startswith(b"PAR1"):
        return Input(path, "parquet")
    if raw.startswith(b"ARROW1") or raw.startswith(b"\xff\xff\xff\xff"):
        return Input(path, "arrow")
    try:
        with open_bytes(path, compression) as f:
            head = f.read(SNIFF_BYTES)
    except (OSError, EOFError, lzma.LZMAError, ValueError) as e:
        raise InputError(f"{path}: its {compression} stream is damaged ({e}): re-download or recompress it, or "
                         f"pass --on-error skip to leave it out") from None
    sign = _binary_sign(head)
    if sign:
        return Input(path, "binary", compression, sign)
    suffix = _inner_suffix(path, compression)
    if suffix in _JSONL_SUFFIXES:
        return Input(path, "jsonl", compression)
    if suffix == ".json":
        if head.lstrip()[:1] == b"[":
            return Input(path, "json-array", compression)
        return Input(path, "jsonl" if _first_line_is_json(head) else "json-document", compression)
    return Input(path, "text", compression)


def _first_line_is_json(head: bytes) -> bool:
    line = head.lstrip().split(b"\n", 1)[0]
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------- records


def iter_records(item: Input, text_key: str, decode_errors: str = "strict") -> Iterator[str]:
    """The documents of one input, in file order."""
    if item.kind == "text":
        yield _read_text(item, decode_errors)
    elif item.kind == "jsonl":
        yield from _iter_jsonl(item, text_key, decode_errors)
    elif item.kind == "json-array":
        yield from _iter_json_array(item, text_key, decode_errors)
    elif item.kind in ("parquet", "arrow", "hf-dataset"):
        yield from _iter_columnar(item, text_key)
    else:
        raise InputError(f"{item.path} is {item.kind} ({item.why}) and holds no documents")


def _decode(data: bytes, item: Input, decode_errors: str, where: str = "") -> str:
    try:
        return data.decode("utf-8", errors="strict")
    except UnicodeDecodeError as e:
        if decode_errors == "replace":
            return data.decode("utf-8", errors="replace")
        raise InputError(f"{item.path}{where} is not UTF-8 (byte {data[e.start]:#04x} at offset {e.start}): pass "
                         f"--decode-errors replace to read it with U+FFFD in place of such bytes, or "
                         f"--on-error skip to leave the file out") from None


def _read_text(item: Input, decode_errors: str) -> str:
    with open_bytes(item.path, item.compression) as f:
        return _decode(f.read(), item, decode_errors)


def _lines(item: Input) -> Iterator[tuple[int, bytes]]:
    with open_bytes(item.path, item.compression) as f:
        yield from enumerate(io.BufferedReader(f) if not isinstance(f, io.BufferedIOBase) else f, 1)


def _text_of(record, item: Input, where: str, text_key: str) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict) or text_key not in record:
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise InputError(f"{item.path}{where} has no key {text_key!r} (found {found}): pass the key that holds "
                         f"the text with --text-key")
    text = record[text_key]
    if not isinstance(text, str):
        raise InputError(f"{item.path}{where}: {text_key!r} holds a {type(text).__name__}, not a string: pass "
                         f"the key that holds the text with --text-key")
    return text


def _iter_jsonl(item: Input, text_key: str, decode_errors: str) -> Iterator[str]:
    for lineno, raw in _lines(item):
        line = _decode(raw, item, decode_errors, f":{lineno}")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{item.path}:{lineno} is not valid JSON ({e.msg}): each line of a JSON-lines input "
                             f"must be one JSON object (a .json file may also be one JSON array)") from None
        if isinstance(record, str):
            raise InputError(f"{item.path}:{lineno} is a bare JSON string, not an object: JSON lines hold one "
                             f"object per line with the text under --text-key")
        yield _text_of(record, item, f":{lineno}", text_key)


def _iter_json_array(item: Input, text_key: str, decode_errors: str) -> Iterator[str]:
    # One JSON document is parsed whole (the json module cannot stream); JSON lines stream.
    with open_bytes(item.path, item.compression) as f:
        text = _decode(f.read(), item, decode_errors)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{item.path} is not valid JSON at line {e.lineno} ({e.msg}): a .json input must be "
                         f"one JSON array of objects, or JSON lines") from None
    for i, record in enumerate(records):
        yield _text_of(record, item, f"[{i}]", text_key)


# ---------------------------------------------------------------- Parquet, Arrow, Hugging Face datasets

def _arrow_files(item: Input) -> list[pathlib.Path]:
    if item.kind != "hf-dataset":
        return [item.path]
    try:
        state = json.loads((item.path / "state.json").read_text())
        files = [item.path / f["filename"] for f in state["_data_files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{item.path}/state.json does not list the dataset's Arrow files ({e}): the folder is "
                         f"not a complete save_to_disk output; save it again") from None
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise InputError(f"{item.path} is missing {', '.join(missing)}, listed in its state.json: save the "
                         f"dataset again")
    return files


def _batches(path: pathlib.Path, text_key: str, where: pathlib.Path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic.startswith(b"PAR1"):
            reader = pq.ParquetFile(path)
            _check_column(reader.schema_arrow, text_key, where, pa)
            yield from reader.iter_batches(batch_size=1024, columns=[text_key])
            return
        opener = pa.ipc.open_file if magic == b"ARROW1" else pa.ipc.open_stream
        reader = opener(pa.memory_map(str(path)))
        _check_column(reader.schema, text_key, where, pa)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) if opener is pa.ipc.open_file \
            else reader
        for batch in batches:
            yield batch.select([text_key])
    except pa.ArrowException as e:
        raise InputError(f"{path} is not a readable Parquet/Arrow file ({e}): re-create it, or pass --on-error "
                         f"skip to leave it out") from None


def _check_column(schema, text_key: str, where, pa) -> None:
    if text_key not in schema.names:
        raise InputError(f"{where} has no column {text_key!r} (columns: {schema.names}): pass the column that "
                         f"holds the text with --text-key")
    kind = schema.field(text_key).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise InputError(f"{where}: column {text_key!r} is {kind}, not a string column: pass the column that "
                         f"holds the text with --text-key")


def _iter_columnar(item: Input, text_key: str) -> Iterator[str]:
    for path in _arrow_files(item):
        for batch in _batches(path, text_key, item.path):
            for text in batch.column(0).to_pylist():
                yield "" if text is None else text     # a null text is an empty document (counted as such)


def check_readable(item: Input, text_key: str, decode_errors: str) -> None:
    """The cheap look before the long run: the first record (or the schema) of ``item`` can be read."""
    if item.kind == "binary":
        return
    if item.kind == "json-document":
        raise InputError(f"{item.path} is one JSON document spread over lines, neither JSON lines (one record per "
                         f"line) nor a JSON array of records: megalm reads documents from those; convert it, or "
                         f"pass --on-error skip to leave it out")
    if item.kind in ("parquet", "arrow", "hf-dataset"):
        for path in _arrow_files(item):
            next(_batches(path, text_key, item.path), None)
        return
    if item.kind == "jsonl":
        next(_iter_jsonl(item, text_key, decode_errors), None)
        return
    with open_bytes(item.path, item.compression) as f:
        head = f.read(SNIFF_BYTES)
    # Only what was read: a multi-byte character cut at the end of the sample is not an error.
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    try:
        decoder.decode(head, final=len(head) < SNIFF_BYTES)
    except UnicodeDecodeError:
        _decode(head, item, decode_errors)
