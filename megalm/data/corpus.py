"""Where documents come from: files, folders of them, Hugging Face dataset folders, or the embedded corpus.

The default corpus is the Python standard library's own source, one file per document: it ships with every
interpreter, so ``megalm preprocess`` with no ``--input`` works offline and gives the same corpus on every
machine running the same Python version.

Before any long work, ``survey`` identifies every input (``readers.identify``) and reads its first record, so a
bad file stops the run in seconds, not hours; each input's fate (read, skipped and why) is counted.
"""
from __future__ import annotations

import collections
import os
import pathlib
import sysconfig
from dataclasses import dataclass, field
from typing import Iterator

from megalm.data.errors import DataError
from megalm.data.readers import Input, InputError, check_readable, identify, is_hf_dataset_folder, iter_records

_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
ON_ERROR = ("stop", "skip")
MAX_LISTED = 1000  # skipped inputs named in the report; the rest are counted


def default_corpus_files() -> list[pathlib.Path]:
    """The ``*.py`` files of the running interpreter's standard library, third-party packages excluded."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _SKIPPED_DIRS]  # prune, don't walk third-party trees
        files.extend(pathlib.Path(folder, n) for n in names if n.endswith(".py"))
    # Sort by the path relative to the root so the order does not depend on where Python is installed.
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def resolve_inputs(inputs: list[str] | None) -> list[pathlib.Path]:
    """Expand files and folders (recursively, hidden entries skipped) into a sorted list of inputs.

    A Hugging Face dataset folder (``save_to_disk``) is one input, not walked into. Raises before any work
    starts if an input does not exist or a folder holds no files.
    """
    if inputs is None:
        return default_corpus_files()
    missing = [str(p) for p in inputs if not pathlib.Path(p).exists()]
    if missing:
        raise DataError(f"input {', '.join(missing)} does not exist: pass existing files or folders to "
                        f"--input, or leave --input out to use the embedded default corpus")
    found: list[pathlib.Path] = []
    for item in map(pathlib.Path, inputs):
        if item.is_dir() and not is_hf_dataset_folder(item):
            _refuse_dataset_dict(item)
            inside = _walk(item)
            if not inside:
                raise DataError(f"input folder {item} holds no files: point --input at text, JSON, Parquet or "
                                f"Arrow files")
            found.extend(inside)
        else:
            found.append(item)
    return found


def _walk(root: pathlib.Path) -> list[pathlib.Path]:
    found = []
    for folder, subdirs, names in os.walk(root):
        here = pathlib.Path(folder)
        datasets = [d for d in subdirs if is_hf_dataset_folder(here / d)]
        subdirs[:] = [d for d in subdirs if d not in datasets and not d.startswith(".") and d not in _SKIPPED_DIRS]
        found.extend(here / d for d in datasets)
        found.extend(here / n for n in names if not n.startswith(".") and (here / n).is_file())
        _refuse_dataset_dict(here)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _refuse_dataset_dict(folder: pathlib.Path) -> None:
    if (folder / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in folder.iterdir() if is_hf_dataset_folder(p))
        raise DataError(f"{folder} is a Hugging Face DatasetDict with splits {splits}: pass the folder of the "
                        f"split to read, e.g. --input {folder / (splits[0] if splits else 'train')}")


@dataclass
class Fates:
    """What became of each input: read, or skipped and why (binary, unreadable, failed part-way)."""
    counts: collections.Counter = field(default_factory=collections.Counter)
    skipped: list = field(default_factory=list)       # [{"path", "fate", "why"}], the first MAX_LISTED
    kinds: collections.Counter = field(default_factory=collections.Counter)

    def skip(self, path, fate: str, why: str) -> None:
        self.counts[fate] += 1
        if len(self.skipped) < MAX_LISTED:
            self.skipped.append({"path": str(path), "fate": fate, "why": why})

    def to_dict(self) -> dict:
        return {"counts": dict(self.counts), "kinds": dict(self.kinds), "skipped": self.skipped}


def survey(paths: list[pathlib.Path], text_key: str, decode_errors: str, on_error: str,
           fates: Fates) -> list[Input]:
    """Identify every input and read its first record; returns the readable ones.

    ``on_error="stop"`` raises the first problem (before any long work); ``"skip"`` records it in ``fates``.
    Binary files are always skipped, and counted.
    """
    readable = []
    for path in paths:
        try:
            item = identify(path)
            if item.kind == "binary":
                fates.skip(path, "skipped_binary", f"{path} {item.why}")
                continue
            check_readable(item, text_key, decode_errors)
        except InputError as e:
            if on_error == "stop":
                raise InputError(f"{e} (the run stopped before any work; nothing was written)") from None
            fates.skip(path, "skipped_unreadable", str(e))
            continue
        readable.append(item)
    return readable


def iter_input_documents(items: list[Input], text_key: str, decode_errors: str, on_error: str,
                         fates: Fates, on_done=None) -> Iterator[str]:
    """Every document of ``items`` in order. A file that fails part-way stops the run (``on_error="stop"``),
    or keeps the documents read before the failure and is listed as ``failed_partway`` (``"skip"``)."""
    for item in items:
        try:
            for text in iter_records(item, text_key, decode_errors):
                yield text
        except InputError as e:
            if on_error == "stop":
                raise
            fates.skip(item.path, "failed_partway", str(e))
        else:
            fates.counts["read"] += 1
            fates.kinds[item.kind if not item.compression else f"{item.kind}+{item.compression}"] += 1
        if on_done is not None:
            on_done(item)


def iter_documents(inputs: list[str] | None, text_key: str = "text", decode_errors: str = "strict",
                   on_error: str | None = None) -> Iterator[str]:
    """Raw documents of ``inputs`` (None: the default corpus): a text file is one document, a JSON/Parquet/Arrow
    input gives one per record. ``on_error`` defaults to stop, and to skip for the default corpus (a few of the
    standard library's test files are deliberately not UTF-8)."""
    on_error = on_error or ("skip" if inputs is None else "stop")
    fates = Fates()
    items = survey(resolve_inputs(inputs), text_key, decode_errors, on_error, fates)
    return iter_input_documents(items, text_key, decode_errors, on_error, fates)
