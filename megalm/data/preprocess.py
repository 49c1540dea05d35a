"""``megalm preprocess``: documents -> cleaned -> tokenized by workers -> PREFIX.bin/.idx + tokenizer.

Two streaming passes over the inputs when a tokenizer is trained (one to train, one to encode), one otherwise;
only the hashes of the documents seen so far (for exact de-duplication) stay in memory. Workers encode chunks
of documents in submission order, so the output is byte-identical for any number of workers.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import itertools
import multiprocessing
import os
import pathlib
import sys
import time
import unicodedata
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from megalm.data.corpus import iter_file_documents, resolve_inputs
from megalm.data.errors import DataError
from megalm.data.indexed import IndexedDatasetWriter, best_dtype
from megalm.data.tokenizer import (
    MIN_VOCAB_SIZE,
    SpecialTokens,
    Tokenizer,
    load_tokenizer,
    special_path,
    tokenizer_path,
    train_tokenizer,
)

DEFAULT_VOCAB_SIZE = 8192
_CHUNK_CHARS = 1 << 20  # about 1 MB of text per task sent to a worker


def clean_documents(docs: Iterable[str], min_chars: int, max_chars: int, stats: dict) -> Iterator[str]:
    """NFC-normalise; drop empty, too short, too long (dropped, not cut) and exact-duplicate documents.

    Counts go into ``stats`` (input_documents, dropped_empty, dropped_short, dropped_long, dropped_duplicate,
    text_bytes). A document is "empty" when it holds only whitespace.
    """
    for key in ("input_documents", "dropped_empty", "dropped_short", "dropped_long", "dropped_duplicate",
                "text_bytes"):
        stats[key] = 0
    seen: set[bytes] = set()
    for text in docs:
        stats["input_documents"] += 1
        text = unicodedata.normalize("NFC", text)
        if not text.strip():
            stats["dropped_empty"] += 1
        elif len(text) < min_chars:
            stats["dropped_short"] += 1
        elif len(text) > max_chars:
            stats["dropped_long"] += 1
        else:
            data = text.encode("utf-8", errors="replace")
            digest = hashlib.blake2b(data, digest_size=16).digest()
            if digest in seen:
                stats["dropped_duplicate"] += 1
                continue
            seen.add(digest)
            stats["text_bytes"] += len(data)
            yield text


def _chunks(docs: Iterable[str], chunk_chars: int) -> Iterator[list[str]]:
    chunk, size = [], 0
    for text in docs:
        chunk.append(text)
        size += len(text)
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _encode(tok: Tokenizer, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Encode a chunk; return its ids (every document followed by EOD, and led by BOS where the tokenizer says
    documents start with it) flat, and each document's length."""
    ids = tok.encode_batch(texts)
    bos = [tok.bos_id] if tok.special.add_bos and tok.bos_id is not None else []
    eod = [tok.eod_id]
    lengths = np.fromiter((len(bos) + len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(bos + x + eod for x in ids), dtype=dtype,
                       count=int(lengths.sum()))
    return flat, lengths


# Worker-process state, set once by the pool initializer (one tokenizer per worker process).
_worker: dict = {}


def _init_worker(tok_json: str, special: dict, parse_special: bool, dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism; one thread per worker
    _worker["tok"] = Tokenizer.from_str(tok_json, SpecialTokens(**special), parse_special)
    _worker["dtype"] = np.dtype(dtype)


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _encode(_worker["tok"], texts, _worker["dtype"])


def _encode_chunks(chunks: Iterator[list[str]], tok: Tokenizer, dtype: np.dtype, workers: int):
    """Yield (flat ids, lengths) per chunk, in input order; at most 2 chunks per worker in flight."""
    if workers == 1:
        for chunk in chunks:
            yield _encode(tok, chunk, dtype)
        return
    ctx = multiprocessing.get_context("spawn")  # fork after tokenizers' thread pool has run can deadlock
    state = (tok.to_str(), tok.special.to_dict(), tok.parse_special, dtype.str)
    with ctx.Pool(workers, _init_worker, state) as pool:
        pending = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _check_args(output_prefix, tokenizer, vocab_size, workers, min_chars, max_chars, jsonl_key):
    if workers < 1:
        raise DataError(f"--workers {workers} must be at least 1")
    if not 1 <= min_chars <= max_chars:
        raise DataError(f"length limits min_chars={min_chars}, max_chars={max_chars} must satisfy "
                        f"1 <= min_chars <= max_chars")
    if not jsonl_key:
        raise DataError("--jsonl-key must name the JSON field that holds the text, e.g. --jsonl-key text")
    if tokenizer is None and vocab_size is not None and vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"--vocab-size {vocab_size} is too small for a byte-level BPE: pass at least "
                        f"{MIN_VOCAB_SIZE} (256 bytes + <|endoftext|>)")
    if str(output_prefix).endswith(("/", os.sep)) or pathlib.Path(output_prefix).is_dir():
        raise DataError(f"--output-prefix {output_prefix} is a folder: give a file prefix such as "
                        f"{pathlib.Path(output_prefix) / 'corpus'} (PREFIX.bin and PREFIX.idx are written)")


def _get_tokenizer(tokenizer, vocab_size, parse_special: bool = False) -> Tokenizer | None:
    """Load ``tokenizer`` if given (and check an explicit vocab_size against it); None means train one."""
    if tokenizer is None:
        return None
    tok = load_tokenizer(tokenizer, parse_special)
    if vocab_size is not None and vocab_size < tok.vocab_size:
        raise DataError(f"--vocab-size {vocab_size} is smaller than the vocabulary of tokenizer {tokenizer} "
                        f"({tok.vocab_size} tokens): its ids would not fit; pass --vocab-size >= "
                        f"{tok.vocab_size} or leave --vocab-size out")
    return tok


def preprocess(inputs: list[str] | None, output_prefix: str, jsonl_key: str = "text",
               tokenizer: str | None = None, vocab_size: int | None = None, workers: int = 1,
               min_chars: int = 1, max_chars: int = 1_000_000, show_progress: bool = True,
               parse_special: bool = False) -> dict:
    """Clean, tokenize and write ``inputs`` (None: the embedded default corpus) to ``output_prefix``.

    ``tokenizer`` is a tokenizer.json or a Hugging Face tokenizer folder; without one a byte-level BPE of
    ``vocab_size`` (default 8192) is trained on the cleaned corpus. The tokenizer is saved to
    ``tokenizer_path(output_prefix)``, its special tokens beside it. Literal special-token text in a document
    (``<|endoftext|>`` in a file about tokenizers) is encoded as text unless ``parse_special``. Returns counts,
    sizes and timings.
    """
    _check_args(output_prefix, tokenizer, vocab_size, workers, min_chars, max_chars, jsonl_key)
    files = resolve_inputs(inputs)
    if not files:
        raise DataError("no input files: pass files or folders to --input, or leave it out for the default "
                        "corpus")
    tok = _get_tokenizer(tokenizer, vocab_size, parse_special)
    pathlib.Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    docs = lambda stats: clean_documents(iter_file_documents(files, jsonl_key), min_chars, max_chars, stats)
    if tok is None:
        train_stats: dict = {}
        tok = train_tokenizer(docs(train_stats), vocab_size or DEFAULT_VOCAB_SIZE)
        _check_not_empty(train_stats, files)
        if show_progress:
            print(f"trained a byte-level BPE of {tok.vocab_size} tokens on {_documents(train_stats)} "
                  f"documents in {time.perf_counter() - start:.1f}s")
    tokenizer_seconds = time.perf_counter() - start
    dtype = best_dtype(max(tok.vocab_size, vocab_size or 0))

    stats: dict = {}
    num_docs = num_tokens = 0
    bar = tqdm(desc="preprocess", unit="doc", disable=not show_progress, dynamic_ncols=True)
    with IndexedDatasetWriter(output_prefix, dtype) as writer, bar:
        for flat, lengths in _encode_chunks(_chunks(docs(stats), _CHUNK_CHARS), tok, dtype, workers):
            for doc in np.split(flat, np.cumsum(lengths)[:-1]):
                writer.add_document(doc)
            num_docs += len(lengths)
            num_tokens += len(flat)
            bar.update(len(lengths))
            bar.set_postfix_str(f"{num_tokens / 1e6:.2f}M tokens", refresh=False)
        _check_not_empty(stats, files)  # raising here removes the temporary files
        _save_tokenizer(tok, tokenizer_path(output_prefix))  # in place before the data is renamed in
    seconds = time.perf_counter() - start
    result = dict(stats, prefix=str(output_prefix), documents=num_docs, tokens=num_tokens,
                  vocab_size=tok.vocab_size, eod_id=tok.eod_id, dtype=str(dtype),
                  tokenizer_path=tokenizer_path(output_prefix), tokenizer_trained=tokenizer is None,
                  tokenizer_seconds=tokenizer_seconds, seconds=seconds,
                  documents_per_s=num_docs / seconds, tokens_per_s=num_tokens / seconds,
                  mb_per_s=stats["text_bytes"] / 1e6 / seconds)
    if show_progress:
        print(_summary(result))
    return result


def _save_tokenizer(tok: Tokenizer, path: str) -> None:
    """The tokenizer and its special-tokens record, each written aside and renamed into place."""
    tmp = f"{path}.tmp-{os.getpid()}.json"
    tok.save(tmp)
    os.replace(special_path(tmp), special_path(path))
    os.replace(tmp, path)


def _documents(stats: dict) -> int:
    dropped = sum(v for k, v in stats.items() if k.startswith("dropped_"))
    return stats["input_documents"] - dropped


def _check_not_empty(stats: dict, files: list[pathlib.Path]) -> None:
    if _documents(stats) == 0:
        raise DataError(f"no documents left after cleaning {len(files)} input files "
                        f"({stats['input_documents']} read, {stats['dropped_empty']} empty, "
                        f"{stats['dropped_short']} too short, "
                        f"{stats['dropped_long']} too long, {stats['dropped_duplicate']} duplicates): check "
                        f"--input, --jsonl-key and the length limits")


def _summary(r: dict) -> str:
    return (f"wrote {r['prefix']}.bin/.idx: {r['documents']} documents ({r['input_documents']} read, "
            f"{r['dropped_empty']} empty, {r['dropped_duplicate']} duplicate, "
            f"{r['dropped_short'] + r['dropped_long']} outside the length limits), {r['tokens']} tokens "
            f"({r['dtype']}), vocab {r['vocab_size']}, in {r['seconds']:.1f}s: {r['documents_per_s']:.0f} "
            f"documents/s, {r['tokens_per_s']:.0f} tokens/s, {r['mb_per_s']:.2f} MB/s")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(
        prog="megalm preprocess",
        description="Clean and tokenize documents into a memory-mapped indexed dataset (PREFIX.bin, "
                    "PREFIX.idx) and save the tokenizer beside it.")
    p.add_argument("--input", nargs="+", metavar="PATH",
                   help="text files, folders of them, or .jsonl/.json files (default: the Python standard "
                        "library's source files that ship with this interpreter)")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX",
                   help="writes PREFIX.bin, PREFIX.idx and PREFIX.tokenizer.json")
    p.add_argument("--jsonl-key", default="text", metavar="KEY", help="JSON field holding the text")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json or Hugging Face tokenizer folder")
    p.add_argument("--vocab-size", type=int, metavar="N",
                   help=f"size of the BPE to train (default {DEFAULT_VOCAB_SIZE}); with --tokenizer, the "
                        f"vocabulary the ids must fit")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), metavar="N",
                   help="tokenizer worker processes (output is identical for any number)")
    p.add_argument("--min-chars", type=int, default=1, metavar="N", help="drop shorter documents")
    p.add_argument("--max-chars", type=int, default=1_000_000, metavar="N", help="drop longer documents")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("--parse-special-tokens", action="store_true",
                   help="encode special-token text inside documents as the special token (default: as text)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        preprocess(args.input, args.output_prefix, args.jsonl_key, args.tokenizer, args.vocab_size,
                   args.workers, args.min_chars, args.max_chars, show_progress=not args.quiet,
                   parse_special=args.parse_special_tokens)
    except DataError as e:
        print(f"megalm preprocess: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
