"""``megalm preprocess chat --input FILE.jsonl --tokenizer PATH --output-prefix PREFIX``: conversations into the
memory-mapped format supervised fine-tuning reads.

Writes, with the guarantees of pretraining data (temporary names renamed into place, CRC-32 of every .bin checked
before first use, documents in input order):
  - PREFIX.bin/.idx: each conversation's token ids, one document per conversation (its boundaries);
  - PREFIX.mask.bin/.idx: one byte per token, 1 where the loss is taken (the assistant's tokens: ``megalm.data.chat``);
  - PREFIX.tokenizer.json and its special-tokens record (the chat template included), PREFIX.report.json (what
    was kept, truncated and dropped, and why).
A conversation longer than ``--max-tokens`` is truncated (``--overflow truncate``, the default) or dropped
(``drop``); one left with no assistant token is dropped. Nothing is dropped without being counted and printed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from megalm.data.chat import BadRecord, ChatRenderer, Counts, messages_of, read_jsonl
from megalm.data.errors import DataError
from megalm.data.indexed import IndexedDataset, IndexedDatasetWriter, best_dtype

MASK_SUFFIX = ".mask"


def mask_prefix(prefix) -> str:
    return f"{prefix}{MASK_SUFFIX}"


def is_chat_dataset(prefix) -> bool:
    return Path(f"{mask_prefix(prefix)}.idx").is_file()


def preprocess_chat(inputs: list[str], tokenizer_path: str, output_prefix: str, max_tokens: int | None = None,
                    overflow: str = "truncate", loss_on: str = "all", template: str | None = None,
                    say=print) -> Counts:
    from megalm.data.tokenizer import load_tokenizer

    if overflow not in ("truncate", "drop") or loss_on not in ("all", "last"):
        raise DataError(f"--overflow {overflow} / --loss-on {loss_on}: use truncate or drop, and all or last")
    if max_tokens is not None and max_tokens < 2:
        raise DataError(f"--max-tokens {max_tokens} must be at least 2")
    tokenizer = load_tokenizer(tokenizer_path)
    renderer = ChatRenderer(tokenizer, template)
    counts = Counts()
    out = Path(output_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    with IndexedDatasetWriter(out, best_dtype(tokenizer.vocab_size)) as tokens, \
            IndexedDatasetWriter(mask_prefix(out), np.uint8) as masks:
        for path in inputs:
            for line, record in read_jsonl(path):
                try:
                    if isinstance(record, BadRecord):
                        raise record
                    ids, mask = renderer.encode(messages_of(record), loss_on)
                except BadRecord as why:
                    counts.drop(str(why))
                    continue
                if max_tokens is not None and len(ids) > max_tokens:
                    if overflow == "drop" or not any(mask[:max_tokens]):
                        counts.drop(f"longer than --max-tokens {max_tokens}"
                                    + ("" if overflow == "drop" else " with no assistant token before it"))
                        continue
                    ids, mask = ids[:max_tokens], mask[:max_tokens]
                    counts.truncated += 1
                tokens.add_document(np.asarray(ids, dtype=np.int64))
                masks.add_document(np.asarray(mask, dtype=np.uint8))
                counts.kept += 1
        if counts.kept == 0:
            raise DataError(f"no conversation of {', '.join(inputs)} could be used ({counts.summary()})")
    _save_tokenizer(tokenizer, f"{out}.tokenizer.json")
    report = {"inputs": inputs, "template": renderer.source, "loss_on": loss_on, "max_tokens": max_tokens,
              "overflow": overflow, "kept": counts.kept, "truncated": counts.truncated, "dropped": counts.dropped}
    _replace_with(Path(f"{out}.report.json"), lambda tmp: tmp.write_text(json.dumps(report, indent=1)))
    say(f"megalm preprocess chat: {counts.summary()} -> {out}.bin ({renderer.source}; loss on {loss_on} "
        f"assistant turns)")
    return counts


def _replace_with(path: Path, write) -> None:
    """``write(tmp)`` a temporary file, then rename it onto ``path``: ranks that prepare the same data at once
    (``megalm finetune --data``) never read a file another is still writing."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _save_tokenizer(tokenizer, path: str) -> None:
    """The tokenizer and its special-tokens record, each renamed into place (the record first)."""
    from megalm.data.tokenizer import special_path

    tmp = Path(f"{path}.tmp-{os.getpid()}.json")
    tokenizer.save(tmp)
    os.replace(special_path(tmp), special_path(path))
    os.replace(tmp, path)


def open_masks(prefix) -> IndexedDataset:
    """The loss mask of a chat dataset, checked against its tokens document by document."""
    tokens, masks = IndexedDataset(prefix), IndexedDataset(mask_prefix(prefix))
    if len(tokens) != len(masks) or not np.array_equal(tokens.doc_lengths, masks.doc_lengths):
        raise DataError(f"{mask_prefix(prefix)} does not match {prefix}: re-run megalm preprocess chat")
    return masks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="megalm preprocess chat", description=__doc__.splitlines()[0])
    ap.add_argument("--input", nargs="+", required=True, metavar="FILE.jsonl")
    ap.add_argument("--tokenizer", required=True, help="the checkpoint's tokenizer.json (or a dataset's)")
    ap.add_argument("--output-prefix", required=True, metavar="PREFIX")
    ap.add_argument("--max-tokens", type=int, help="longest conversation kept (usually data.seq_len + 1)")
    ap.add_argument("--overflow", choices=("truncate", "drop"), default="truncate")
    ap.add_argument("--loss-on", choices=("all", "last"), default="all", help="assistant turns trained on")
    ap.add_argument("--template", metavar="FILE", help="a Jinja chat template instead of the tokenizer's")
    args = ap.parse_args(argv)
    try:
        template = Path(args.template).read_text() if args.template else None
        preprocess_chat(args.input, args.tokenizer, args.output_prefix, args.max_tokens, args.overflow,
                        args.loss_on, template)
    except (DataError, OSError) as e:
        print(f"megalm preprocess chat: error: {e}", file=sys.stderr)
        return 2
    return 0
