"""``megalm preprocess``: inputs -> surveyed -> read -> examined by workers -> decided in order -> written.

Streaming throughout: inputs are read document by document, workers examine and tokenize chunks of about 1 MB
of text in submission order, and the writer streams PREFIX.bin and the offsets, so memory does not grow with
the corpus except for the de-duplication structures (a 16-byte hash per kept document, and with near-duplicate
removal its MinHash index). Two passes when a tokenizer is trained (one to train it on the cleaned documents,
one to encode), one otherwise. The output is byte-identical for any number of workers.

``megalm preprocess merge A B --output-prefix C`` joins datasets tokenized in parts (``--shard I/N``).
``megalm preprocess chat --input F.jsonl --tokenizer T --output-prefix P`` prepares conversations for fine-tuning
(``megalm.data.chat_preprocess``).
"""
from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import pathlib
import sys
import time
from typing import Iterator

import numpy as np
from tqdm import tqdm

from megalm.data.cleaning import NORMALIZATIONS, CleaningConfig, Decider, Examiner
from megalm.data.corpus import ON_ERROR, Fates, iter_input_documents, resolve_inputs, survey
from megalm.data.errors import DataError
from megalm.data.indexed import IndexedDatasetWriter, best_dtype
from megalm.data.neardup import NearDupConfig
from megalm.data.quality import parse_filters
from megalm.data.readers import DECODE_POLICIES, Input
from megalm.data.report import build_report, histogram_path, refuse_existing, report_path, table, write_report
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


def _chunks(docs, chunk_chars: int) -> Iterator[list[str]]:
    chunk, size = [], 0
    for text in docs:
        chunk.append(text)
        size += len(text)
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


# Worker-process state, set once by the pool initializer.
_worker: dict = {}


def _init_worker(cleaning: CleaningConfig, tok_state, dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism; one thread per worker
    tok = None
    if tok_state is not None:
        tok_json, special, parse_special = tok_state
        tok = Tokenizer.from_str(tok_json, SpecialTokens(**special), parse_special)
    _worker["examiner"] = Examiner(cleaning, tok, np.dtype(dtype))


def _examine_in_worker(texts: list[str]):
    return _worker["examiner"].examine(texts)


def _examined(chunks, cleaning: CleaningConfig, tok: Tokenizer | None, dtype: np.dtype, workers: int):
    """(chunk, Examined) per chunk, in input order; at most 2 chunks per worker in flight."""
    if workers == 1:
        examiner = Examiner(cleaning, tok, dtype)
        for chunk in chunks:
            yield chunk, examiner.examine(chunk)
        return
    ctx = multiprocessing.get_context("spawn")  # fork after tokenizers' thread pool has run can deadlock
    tok_state = (tok.to_str(), tok.special.to_dict(), tok.parse_special) if tok is not None else None
    with ctx.Pool(workers, _init_worker, (cleaning, tok_state, dtype.str)) as pool:
        pending = collections.deque()
        for chunk in chunks:
            pending.append((chunk, pool.apply_async(_examine_in_worker, (chunk,))))
            if len(pending) >= 2 * workers:
                chunk, result = pending.popleft()
                yield chunk, result.get()
        while pending:
            chunk, result = pending.popleft()
            yield chunk, result.get()


class _Run:
    """One pass over the surveyed inputs: reading, examining, deciding; with a progress bar in input bytes."""

    def __init__(self, items: list[Input], opts: dict, fates: Fates, desc: str, show: bool):
        self.items, self.opts, self.fates = items, opts, fates
        self.decider = Decider(opts["cleaning"])
        total = sum(_size(i.path) for i in items)
        self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not show, dynamic_ncols=True)

    def chunks(self, tok: Tokenizer | None, dtype: np.dtype):
        o = self.opts
        docs = iter_input_documents(self.items, o["text_key"], o["decode_errors"], o["on_error"], self.fates,
                                    on_done=lambda item: self.bar.update(_size(item.path)))
        with self.bar:
            for raw, found in _examined(_chunks(docs, _CHUNK_CHARS), o["cleaning"], tok, dtype, o["workers"]):
                keep = self.decider.decide(found, raw)
                self.bar.set_postfix_str(f"{self.decider.kept.documents} docs kept, "
                                         f"{self.decider.kept.tokens / 1e6:.2f}M tokens", refresh=False)
                yield found, keep


def _size(path: pathlib.Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return path.stat().st_size


def _check_args(output_prefix, tokenizer, vocab_size, workers, text_key, decode_errors, on_error, overwrite):
    if workers < 1:
        raise DataError(f"--workers {workers} must be at least 1")
    if not text_key:
        raise DataError("--text-key must name the JSON field or column that holds the text, e.g. --text-key text")
    if decode_errors not in DECODE_POLICIES:
        raise DataError(f"--decode-errors {decode_errors} is not one of {', '.join(DECODE_POLICIES)}")
    if on_error not in ON_ERROR:
        raise DataError(f"--on-error {on_error} is not one of {', '.join(ON_ERROR)}")
    if tokenizer is None and vocab_size is not None and vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"--vocab-size {vocab_size} is too small for a byte-level BPE: pass at least "
                        f"{MIN_VOCAB_SIZE} (256 bytes + <|endoftext|>)")
    if str(output_prefix).endswith(("/", os.sep)) or pathlib.Path(output_prefix).is_dir():
        raise DataError(f"--output-prefix {output_prefix} is a folder: give a file prefix such as "
                        f"{pathlib.Path(output_prefix) / 'corpus'} (PREFIX.bin and PREFIX.idx are written)")
    refuse_existing(output_prefix, overwrite)


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


def preprocess(inputs: list[str] | None, output_prefix: str, text_key: str = "text",
               tokenizer: str | None = None, vocab_size: int | None = None, workers: int = 1,
               min_chars: int = 1, max_chars: int = 1_000_000, show_progress: bool = True,
               parse_special: bool = False, *, decode_errors: str = "strict", on_error: str | None = None,
               overwrite: bool = False, normalize: str = "NFC", exact_dedup: bool = True,
               quality: list[str] | None = None, near_dup: NearDupConfig | None = None,
               shard: tuple[int, int] | None = None) -> dict:
    """Clean, tokenize and write ``inputs`` (None: the embedded default corpus) to ``output_prefix``.

    ``tokenizer`` is a tokenizer.json or a Hugging Face tokenizer folder; without one a byte-level BPE of
    ``vocab_size`` (default 8192) is trained on the cleaned corpus. The tokenizer is saved to
    ``tokenizer_path(output_prefix)``, its special tokens beside it, and the cleaning report to
    ``PREFIX.report.json`` and ``PREFIX.lengths.png``. Literal special-token text in a document is encoded as
    text unless ``parse_special``. ``on_error`` (stop or skip; default stop, skip for the embedded corpus) says
    what a bad input does; ``shard=(i, n)`` takes the i-th of n contiguous parts of the sorted inputs (join the
    parts with ``merge``). Returns counts, sizes and timings.
    """
    on_error = on_error or ("skip" if inputs is None else "stop")
    _check_args(output_prefix, tokenizer, vocab_size, workers, text_key, decode_errors, on_error, overwrite)
    cleaning = CleaningConfig(normalize, min_chars, max_chars, exact_dedup, tuple(parse_filters(quality)), near_dup)
    tok = _get_tokenizer(tokenizer, vocab_size, parse_special)
    paths = _shard(resolve_inputs(inputs), shard)
    fates = Fates()
    items = survey(paths, text_key, decode_errors, on_error, fates)
    if not items:
        raise DataError(f"none of the {len(paths)} inputs is readable ({dict(fates.counts)}; first: "
                        f"{fates.skipped[0]['path'] if fates.skipped else '-'}): check --input and --text-key")
    opts = dict(cleaning=cleaning, text_key=text_key, decode_errors=decode_errors, on_error=on_error,
                workers=workers)
    pathlib.Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    if tok is None:
        tok = _train(items, opts, vocab_size or DEFAULT_VOCAB_SIZE, show_progress)
    tokenizer_seconds = time.perf_counter() - start
    dtype = best_dtype(max(tok.vocab_size, vocab_size or 0))

    run = _Run(items, opts, fates, "preprocess", show_progress)
    with IndexedDatasetWriter(output_prefix, dtype) as writer:
        for found, keep in run.chunks(tok, dtype):
            writer.add_documents(found.flat[np.repeat(keep, found.lengths)], found.lengths[keep])
        _check_not_empty(run.decider, len(items))  # raising here removes the temporary files
        _save_tokenizer(tok, tokenizer_path(output_prefix))  # in place before the data is renamed in
    seconds = time.perf_counter() - start
    settings = dict(inputs=inputs, text_key=text_key, decode_errors=decode_errors, on_error=on_error,
                    normalize=normalize, min_chars=min_chars, max_chars=max_chars, exact_dedup=exact_dedup,
                    quality=[f.describe() for f in cleaning.filters], shard=shard,
                    near_dup=near_dup.__dict__ if near_dup else None, tokenizer=tokenizer)
    report = build_report(run.decider, fates.to_dict(), settings)
    write_report(output_prefix, report)
    kept = run.decider.kept
    result = dict(prefix=str(output_prefix), input_documents=run.decider.read.documents,
                  documents=kept.documents, tokens=kept.tokens,
                  **{f"dropped_{k}": v["documents"] for k, v in report["removed"].items()},
                  inputs=dict(fates.counts), vocab_size=tok.vocab_size, eod_id=tok.eod_id, dtype=str(dtype),
                  tokenizer_path=tokenizer_path(output_prefix), tokenizer_trained=tokenizer is None,
                  tokenizer_seconds=tokenizer_seconds, seconds=seconds, documents_per_s=kept.documents / seconds,
                  tokens_per_s=kept.tokens / seconds, mb_per_s=run.bar.n / 1e6 / seconds, report=report)
    if show_progress:
        print(table(report))
        print(_summary(result))
    return result


def _shard(paths: list[pathlib.Path], shard: tuple[int, int] | None) -> list[pathlib.Path]:
    if shard is None:
        return paths
    index, count = shard
    if not 0 <= index < count:
        raise DataError(f"--shard {index}/{count}: the shard index must lie in [0, {count})")
    part = paths[index * len(paths) // count:(index + 1) * len(paths) // count]
    if not part:
        raise DataError(f"--shard {index}/{count} holds none of the {len(paths)} inputs: use fewer shards")
    return part


def _train(items: list[Input], opts: dict, vocab_size: int, show: bool) -> Tokenizer:
    """Train the BPE on the documents the cleaning keeps (a pass of its own, decided exactly as the next)."""
    start = time.perf_counter()
    run = _Run(items, opts, Fates(), "tokenizer", show)

    def kept_texts():
        for found, keep in run.chunks(None, np.dtype("<u2")):
            yield from (found.texts[i] for i in np.flatnonzero(keep))

    tok = train_tokenizer(kept_texts(), vocab_size)
    _check_not_empty(run.decider, len(items))
    if show:
        print(f"trained a byte-level BPE of {tok.vocab_size} tokens on {run.decider.kept.documents} "
              f"documents in {time.perf_counter() - start:.1f}s")
    return tok


def _save_tokenizer(tok: Tokenizer, path: str) -> None:
    """The tokenizer and its special-tokens record, each written aside and renamed into place."""
    tmp = f"{path}.tmp-{os.getpid()}.json"
    tok.save(tmp)
    os.replace(special_path(tmp), special_path(path))
    os.replace(tmp, path)


def _check_not_empty(decider: Decider, num_inputs: int) -> None:
    if decider.kept.documents == 0:
        removed = ", ".join(f"{t.documents} {reason}" for reason, t in decider.tallies.items() if t.documents)
        raise DataError(f"no documents left after cleaning {num_inputs} inputs ({decider.read.documents} read; "
                        f"removed: {removed or 'none'}): check --input, --text-key, the length limits and "
                        f"--quality")


def _summary(r: dict) -> str:
    return (f"wrote {r['prefix']}.bin/.idx: {r['documents']} documents of {r['input_documents']} read, "
            f"{r['tokens']} tokens ({r['dtype']}), vocab {r['vocab_size']}, in {r['seconds']:.1f}s: "
            f"{r['documents_per_s']:.0f} documents/s, {r['tokens_per_s']:.0f} tokens/s, {r['mb_per_s']:.2f} MB/s "
            f"read; report in {report_path(r['prefix'])}, lengths in {histogram_path(r['prefix'])}")


def _shard_arg(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    try:
        return int(index), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be I/N, e.g. 0/4") from None


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(
        prog="megalm preprocess",
        description="Clean and tokenize documents into a memory-mapped indexed dataset (PREFIX.bin, "
                    "PREFIX.idx), save the tokenizer and a cleaning report beside it. "
                    "`megalm preprocess merge A B --output-prefix C` joins datasets.")
    p.add_argument("--input", nargs="+", metavar="PATH",
                   help="files or folders: text/Markdown/source, JSON lines, JSON arrays, Parquet, Arrow, "
                        "Hugging Face save_to_disk folders, each optionally gzip/zstd/xz/bz2-compressed "
                        "(default: the Python standard library's source files that ship with this interpreter)")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX",
                   help="writes PREFIX.bin, PREFIX.idx, PREFIX.tokenizer.json, PREFIX.report.json, "
                        "PREFIX.lengths.png")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at PREFIX")
    p.add_argument("--text-key", "--jsonl-key", dest="text_key", default="text", metavar="KEY",
                   help="JSON field or Parquet/Arrow column holding the text")
    p.add_argument("--on-error", choices=ON_ERROR, default=None,
                   help="a bad input stops the run before any work (stop; the default for --input) or is "
                        "skipped and listed in the report (skip; the default for the embedded corpus)")
    p.add_argument("--decode-errors", choices=DECODE_POLICIES, default="strict",
                   help="bytes that are not UTF-8 make the file bad (strict) or become U+FFFD (replace)")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json or Hugging Face tokenizer folder")
    p.add_argument("--vocab-size", type=int, metavar="N",
                   help=f"size of the BPE to train (default {DEFAULT_VOCAB_SIZE}); with --tokenizer, the "
                        f"vocabulary the ids must fit")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), metavar="N",
                   help="worker processes (output is identical for any number)")
    p.add_argument("--shard", type=_shard_arg, metavar="I/N",
                   help="take the I-th of N contiguous parts of the sorted inputs (join them with merge)")
    c = p.add_argument_group("cleaning")
    c.add_argument("--normalize", choices=NORMALIZATIONS, default="NFC", help="Unicode normalisation form")
    c.add_argument("--min-chars", type=int, default=1, metavar="N", help="drop shorter documents")
    c.add_argument("--max-chars", type=int, default=1_000_000, metavar="N", help="drop longer documents")
    c.add_argument("--no-exact-dedup", dest="exact_dedup", action="store_false",
                   help="keep exact duplicates (default: drop every copy after the first)")
    c.add_argument("--quality", nargs="+", metavar="SPEC",
                   help="quality filters: presets gopher, fineweb, c4, or NAME[:min=X,max=Y] (see "
                        "megalm.data.quality); default none")
    c.add_argument("--near-dup", action="store_true", help="remove near-duplicates (MinHash + LSH)")
    defaults = NearDupConfig()
    c.add_argument("--near-dup-threshold", type=float, default=defaults.threshold, metavar="J",
                   help=f"estimated Jaccard similarity at which a document is a near-duplicate "
                        f"(default {defaults.threshold})")
    c.add_argument("--near-dup-shingle", type=int, default=defaults.shingle, metavar="N",
                   help=f"words per shingle (default {defaults.shingle})")
    c.add_argument("--near-dup-perms", type=int, default=defaults.num_perm, metavar="N",
                   help=f"MinHash permutations (default {defaults.num_perm})")
    c.add_argument("--near-dup-bands", type=int, default=defaults.bands, metavar="B",
                   help=f"LSH bands of perms // B rows each (default {defaults.bands})")
    c.add_argument("--near-dup-seed", type=int, default=defaults.seed, metavar="S", help="MinHash seed")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("--parse-special-tokens", action="store_true",
                   help="encode special-token text inside documents as the special token (default: as text)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["merge"]:
        from megalm.data.merge import main as merge_main
        return merge_main(argv[1:])
    if argv[:1] == ["chat"]:
        from megalm.data.chat_preprocess import main as chat_main
        return chat_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        near_dup = NearDupConfig(args.near_dup_shingle, args.near_dup_perms, args.near_dup_bands,
                                 args.near_dup_threshold, args.near_dup_seed) if args.near_dup else None
        preprocess(args.input, args.output_prefix, args.text_key, args.tokenizer, args.vocab_size,
                   args.workers, args.min_chars, args.max_chars, show_progress=not args.quiet,
                   parse_special=args.parse_special_tokens, decode_errors=args.decode_errors,
                   on_error=args.on_error, overwrite=args.overwrite, normalize=args.normalize,
                   exact_dedup=args.exact_dedup, quality=args.quality, near_dup=near_dup, shard=args.shard)
    except DataError as e:
        print(f"megalm preprocess: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
