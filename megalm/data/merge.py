"""``megalm preprocess merge A B ... --output-prefix C``: datasets tokenized in parts, joined in order.

The parts must share one tokenizer (the same tokenizer.json and special tokens, byte for byte) and one token
dtype; C's documents are A's, then B's, and so on, so merging the shards of ``--shard I/N`` in order gives the
dataset the whole corpus would have given (de-duplication is per part: copies in different parts both stay).
Tokens are copied in blocks, so memory does not grow with the datasets.
"""
from __future__ import annotations

import argparse
import pathlib
import shutil
import sys

import numpy as np

from megalm.data.errors import DataError
from megalm.data.indexed import IndexedDataset, IndexedDatasetWriter
from megalm.data.report import refuse_existing
from megalm.data.tokenizer import first_tokenizer_mismatch, special_path, tokenizer_files, tokenizer_path

_BLOCK_DOCS = 1 << 16


def _same_tokenizer(prefixes: list[str]) -> None:
    for path in (p for prefix in prefixes for p in tokenizer_files(prefix)):
        if not path.is_file():
            raise DataError(f"{path} not found: every part needs the tokenizer files preprocess wrote beside it")
    mismatch = first_tokenizer_mismatch(prefixes)
    if mismatch is not None:
        other, path = mismatch
        raise DataError(f"{other} was tokenized with another tokenizer than {prefixes[0]} ({path} differs): "
                        f"tokenize every part with the same --tokenizer")


def merge(prefixes: list[str], output_prefix: str, overwrite: bool = False) -> dict:
    if len(prefixes) < 1:
        raise DataError("merge needs at least one dataset prefix")
    refuse_existing(output_prefix, overwrite)
    parts = [IndexedDataset(p) for p in prefixes]          # validates every header before any work
    dtypes = {str(p.dtype) for p in parts}
    if len(dtypes) > 1:
        raise DataError(f"the parts hold tokens of different dtypes {sorted(dtypes)}: re-run preprocess with the "
                        f"same tokenizer and --vocab-size for every part")
    _same_tokenizer(prefixes)
    for part in parts:
        part.verify()
    pathlib.Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    with IndexedDatasetWriter(output_prefix, parts[0].dtype) as writer:
        for part in parts:
            for start in range(0, len(part), _BLOCK_DOCS):
                stop = min(start + _BLOCK_DOCS, len(part))
                lo, hi = part.offsets[start], part.offsets[stop]
                writer.add_documents(np.asarray(part.tokens(lo, hi)), part.doc_lengths[start:stop])
        shutil.copyfile(special_path(tokenizer_path(prefixes[0])), special_path(tokenizer_path(output_prefix)))
        shutil.copyfile(tokenizer_path(prefixes[0]), tokenizer_path(output_prefix))
    return {"prefix": output_prefix, "documents": sum(len(p) for p in parts),
            "tokens": sum(p.num_tokens for p in parts)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="megalm preprocess merge",
                                 description="Join preprocessed datasets, in the order given, into one.")
    ap.add_argument("prefixes", nargs="+", metavar="PREFIX", help="datasets to join (PREFIX.bin/.idx each)")
    ap.add_argument("--output-prefix", required=True, metavar="PREFIX")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing dataset at the output prefix")
    args = ap.parse_args(argv)
    try:
        result = merge(args.prefixes, args.output_prefix, args.overwrite)
    except DataError as e:
        print(f"megalm preprocess merge: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {result['prefix']}.bin/.idx: {result['documents']} documents, {result['tokens']} tokens from "
          f"{len(args.prefixes)} parts")
    return 0
