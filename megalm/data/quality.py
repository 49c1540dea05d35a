"""Heuristic quality filters of the kind the Gopher, C4 and FineWeb pipelines use, each optional.

A filter is a measure of a document (a number) with a lower and/or upper bound; a document that falls outside
the bounds of any filter is removed, attributed to the first such filter in the order given. The measures and
default bounds follow their papers: Gopher (Rae et al. 2021, App. A.1.1: word count, mean word length,
symbol/word ratio, bullet and ellipsis lines, alphabetic words, stop words, repetition), C4 (Raffel et al. 2020:
lorem ipsum, curly brackets) and FineWeb (Penedo et al. 2024: lines ending in punctuation, short lines,
characters in duplicated lines). ``digit_ratio`` is megalm's own.

Words are whitespace-separated tokens with at least one letter or digit, stripped of surrounding punctuation.
Presets: ``--quality gopher``, ``fineweb``, ``c4``; a single filter or a preset member with other bounds:
``--quality word_count:min=20,max=50000``.

Why not datatrove's filters: their English word splitting needs NLTK's punkt model, fetched from the network at
first use (cluster nodes and CI often have none), and they run inside datatrove's own pipeline executor; these
measures are a few lines each, and their definitions are stated here and tested on hand-made documents.
"""
from __future__ import annotations

import functools
import math
import re
import string
from dataclasses import dataclass
from typing import Callable

import numpy as np

from megalm.data.errors import DataError

_PUNCT = string.punctuation + "\u2018\u2019\u201c\u201d\u2026\u00ab\u00bb"
_TERMINAL = (".", "!", "?", '"', "'", "\u201d", "\u2019", "\u2026", ":", ";")
_BULLETS = ("\u2022", "-", "*", "\u2023", "\u25cf", "\u25aa", "\u2013")
_STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
_HAS_ALNUM = re.compile(r"\w", re.UNICODE)


def words(text: str) -> list[str]:
    return [w.strip(_PUNCT) for w in text.split() if _HAS_ALNUM.search(w)]


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _safe(num: float, den: float) -> float:
    return num / den if den else 0.0


def _dup_line_fractions(lines: list[str]) -> tuple[float, float]:
    """(fraction of lines that repeat an earlier line, fraction of characters in such lines)."""
    seen, dup_lines, dup_chars = set(), 0, 0
    for line in lines:
        if line in seen:
            dup_lines += 1
            dup_chars += len(line)
        seen.add(line)
    return _safe(dup_lines, len(lines)), _safe(dup_chars, sum(map(len, lines)))


def _gram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """A 64-bit hash of each word n-gram (a polynomial over word ids; a collision is astronomically rare)."""
    h = np.zeros(len(ids) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            h = h * np.uint64(1_000_003) + ids[k:len(ids) - n + 1 + k]
    return h


def _top_ngram_fraction(d: View, n: int) -> float:
    """Characters in the most frequent word n-gram (times its count) over all characters of the words."""
    ids, lengths = d.word_ids
    if len(ids) < n:
        return 0.0
    _, first, counts = np.unique(_gram_hashes(ids, n), return_index=True, return_counts=True)
    top = int(np.argmax(counts))
    if counts[top] < 2:
        return 0.0
    start = int(first[top])
    return _safe(int(counts[top]) * int(lengths[start:start + n].sum()), int(lengths.sum()))


def _dup_ngram_fraction(d: View, n: int) -> float:
    """Characters of the words covered by word n-grams that occur more than once, over all characters."""
    ids, lengths = d.word_ids
    if len(ids) < n:
        return 0.0
    _, inverse, counts = np.unique(_gram_hashes(ids, n), return_inverse=True, return_counts=True)
    starts = np.flatnonzero(counts[inverse] > 1)
    edges = np.zeros(len(ids) + 1, dtype=np.int64)
    np.add.at(edges, starts, 1)
    np.add.at(edges, starts + n, -1)
    covered = np.cumsum(edges[:-1]) > 0
    return _safe(int(lengths[covered].sum()), int(lengths.sum()))


class View:
    """A document with its words and non-empty lines worked out once, for all the measures."""

    def __init__(self, text: str):
        self.text = text

    @functools.cached_property
    def words(self) -> list[str]:
        return words(self.text)

    @functools.cached_property
    def lines(self) -> list[str]:
        return _lines(self.text)

    @functools.cached_property
    def word_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """(an id per word, equal words equal ids; each word's length in characters)."""
        vocab: dict[str, int] = {}
        ids = np.fromiter((vocab.setdefault(w, len(vocab)) for w in self.words), dtype=np.uint64,
                          count=len(self.words))
        return ids, np.fromiter(map(len, self.words), dtype=np.int64, count=len(self.words))

    @functools.cached_property
    def dup_lines(self) -> tuple[float, float]:
        return _dup_line_fractions(self.lines)

    def line_fraction(self, test: Callable[[str], bool]) -> float:
        return _safe(sum(map(test, self.lines)), len(self.lines))


MEASURES: dict[str, Callable[[View], float]] = {
    "word_count": lambda d: len(d.words),
    "mean_word_length": lambda d: _safe(sum(map(len, d.words)), len(d.words)),
    "symbol_word_ratio": lambda d: _safe(d.text.count("#") + d.text.count("...") + d.text.count("\u2026"),
                                         len(d.words)),
    "bullet_lines": lambda d: d.line_fraction(lambda line: line.startswith(_BULLETS)),
    "ellipsis_lines": lambda d: d.line_fraction(lambda line: line.endswith(("...", "\u2026"))),
    "alpha_words": lambda d: _safe(sum(any(c.isalpha() for c in w) for w in d.words), len(d.words)),
    "stop_words": lambda d: sum(w.lower() in _STOP_WORDS for w in d.words),
    "digit_ratio": lambda d: _safe(sum(c.isdigit() for c in d.text), len(d.text)),
    "dup_lines": lambda d: d.dup_lines[0],
    "dup_line_chars": lambda d: d.dup_lines[1],
    **{f"top_{n}gram": (lambda d, n=n: _top_ngram_fraction(d, n)) for n in (2, 3, 4)},
    **{f"dup_{n}gram": (lambda d, n=n: _dup_ngram_fraction(d, n)) for n in range(5, 11)},
    "line_punct": lambda d: d.line_fraction(lambda line: line.endswith(_TERMINAL)),
    "short_lines": lambda d: d.line_fraction(lambda line: len(line) <= 30),
    "lorem_ipsum": lambda d: float("lorem ipsum" in d.text.lower()),
    "curly_bracket": lambda d: float("{" in d.text),
}

_INF = math.inf
PRESETS: dict[str, dict[str, tuple[float, float]]] = {
    "gopher": {
        "word_count": (50, 100_000), "mean_word_length": (3, 10), "symbol_word_ratio": (-_INF, 0.1),
        "bullet_lines": (-_INF, 0.9), "ellipsis_lines": (-_INF, 0.3), "alpha_words": (0.8, _INF),
        "stop_words": (2, _INF), "dup_lines": (-_INF, 0.3), "dup_line_chars": (-_INF, 0.2),
        "top_2gram": (-_INF, 0.20), "top_3gram": (-_INF, 0.18), "top_4gram": (-_INF, 0.16),
        "dup_5gram": (-_INF, 0.15), "dup_6gram": (-_INF, 0.14), "dup_7gram": (-_INF, 0.13),
        "dup_8gram": (-_INF, 0.12), "dup_9gram": (-_INF, 0.11), "dup_10gram": (-_INF, 0.10),
    },
    "fineweb": {"line_punct": (0.12, _INF), "short_lines": (-_INF, 0.67), "dup_line_chars": (-_INF, 0.01)},
    "c4": {"lorem_ipsum": (-_INF, 0.0), "curly_bracket": (-_INF, 0.0)},
}
DEFAULT_BOUNDS = {"digit_ratio": (-_INF, 0.25)}


@dataclass(frozen=True)
class QualityFilter:
    name: str
    low: float
    high: float

    def reject(self, doc: View) -> float | None:
        """The measured value when ``doc`` falls outside [low, high], else None."""
        value = MEASURES[self.name](doc)
        return value if not self.low <= value <= self.high else None

    def describe(self) -> str:
        bounds = [f"min={self.low:g}"] if self.low > -_INF else []
        bounds += [f"max={self.high:g}"] if self.high < _INF else []
        return f"{self.name}:{','.join(bounds)}"


def parse_filters(specs: list[str] | None) -> list[QualityFilter]:
    """``["gopher", "digit_ratio:max=0.1"]`` -> filters in order; a later spec of a measure replaces its bounds."""
    chosen: dict[str, tuple[float, float]] = {}
    for spec in specs or []:
        for part in filter(None, (p.strip() for p in spec.split(";"))):
            name, _, args = part.partition(":")
            if name in PRESETS and not args:
                chosen.update(PRESETS[name])
                continue
            if name not in MEASURES:
                raise DataError(f"--quality {part}: {name!r} is neither a filter nor a preset; choose from presets "
                                f"{sorted(PRESETS)} or filters {sorted(MEASURES)}")
            chosen[name] = _bounds(part, name, args)
    return [QualityFilter(name, low, high) for name, (low, high) in chosen.items()]


def _bounds(part: str, name: str, args: str) -> tuple[float, float]:
    low, high = next((b[name] for b in (*PRESETS.values(), DEFAULT_BOUNDS) if name in b), (-_INF, _INF))
    for arg in filter(None, args.split(",")):
        key, _, value = arg.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if key not in ("min", "max") or math.isnan(number):
            raise DataError(f"--quality {part}: {arg!r} must be min=NUMBER or max=NUMBER, e.g. {name}:min=0.1")
        low, high = (number, high) if key == "min" else (low, number)
    if low > high:
        raise DataError(f"--quality {part}: min {low:g} is above max {high:g}")
    if (low, high) == (-_INF, _INF):
        raise DataError(f"--quality {part}: {name} has no default bounds; give min= and/or max=")
    return low, high


def first_rejection(filters: list[QualityFilter], text: str) -> tuple[str, float] | None:
    """(name, measured value) of the first filter ``text`` fails, or None when it passes them all."""
    doc = View(text)
    for f in filters:
        value = f.reject(doc)
        if value is not None:
            return f.name, value
    return None
