"""Where documents come from: text files, folders of them, JSON lines, or the embedded default corpus.

The default corpus is the Python standard library's own source, one file per document: it ships with every
interpreter, so ``megalm preprocess`` with no ``--input`` works offline and gives the same corpus on every
machine running the same Python version.
"""
from __future__ import annotations

import json
import os
import pathlib
import sysconfig
from typing import Iterator

from megalm.data.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".json")
_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


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
    """Expand files and folders (recursively, hidden entries skipped) into a sorted list of files.

    Raises before any work starts if an input does not exist or a folder holds no files.
    """
    if inputs is None:
        return default_corpus_files()
    missing = [str(p) for p in inputs if not pathlib.Path(p).exists()]
    if missing:
        raise DataError(f"input {', '.join(missing)} does not exist: pass existing files or folders to "
                        f"--input, or leave --input out to use the embedded default corpus")
    files: list[pathlib.Path] = []
    for item in map(pathlib.Path, inputs):
        if item.is_dir():
            found = sorted((p for p in item.rglob("*") if p.is_file() and not _hidden(p, item)),
                           key=lambda p: p.relative_to(item).as_posix())
            if not found:
                raise DataError(f"input folder {item} holds no files: point --input at text or JSONL files")
            files.extend(found)
        else:
            files.append(item)
    return files


def _hidden(path: pathlib.Path, root: pathlib.Path) -> bool:
    return any(part.startswith(".") or part in _SKIPPED_DIRS for part in path.relative_to(root).parts)


def iter_documents(inputs: list[str] | None, jsonl_key: str = "text") -> Iterator[str]:
    """Yield raw documents: a whole text file is one document, a JSONL/JSON file gives one per line.

    ``inputs=None`` reads the default corpus. Files are decoded as UTF-8; undecodable bytes become U+FFFD.
    """
    return iter_file_documents(resolve_inputs(inputs), jsonl_key)


def iter_file_documents(files: list[pathlib.Path], jsonl_key: str = "text") -> Iterator[str]:
    """``iter_documents`` over files already expanded by ``resolve_inputs``."""
    for path in files:
        if path.suffix.lower() in JSONL_SUFFIXES:
            yield from _iter_jsonl(path, jsonl_key)
        else:
            yield path.read_text(encoding="utf-8", errors="replace")


def _iter_jsonl(path: pathlib.Path, key: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno} is not valid JSON ({e.msg}): each line of a .jsonl/.json "
                                f"input must be one JSON object") from None
            if not isinstance(record, dict) or key not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"{path}:{lineno} has no key {key!r} (found {keys}): pass the key that holds "
                                f"the text with --jsonl-key")
            text = record[key]
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: {key!r} holds a {type(text).__name__}, not a string: "
                                f"pass the key that holds the text with --jsonl-key")
            yield text
