"""Cleaning: what each document is, worked out in the workers; what to keep, decided in order in the main process.

Per document, a worker normalises the text (Unicode NFC by default), checks the length limits and the quality
filters, hashes it (exact duplicates), computes its MinHash signature (near duplicates) and, in the encoding
pass, tokenizes it, dropped or not, so the report can say how many tokens each stage removed. The main process
then decides, in corpus order, exact and near duplicates against everything kept before: the first copy is
kept, and the result is the same for any number of workers.
"""
from __future__ import annotations

import hashlib
import itertools
import sys
import unicodedata
from dataclasses import dataclass, field

import numpy as np

from megalm.data.errors import DataError
from megalm.data.memory import allocated_bytes
from megalm.data.neardup import MinHasher, NearDupConfig, NearDupIndex
from megalm.data.quality import QualityFilter, first_rejection

NORMALIZATIONS = ("NFC", "NFKC", "NFD", "NFKD", "none")
LENGTH_REASONS = ("empty", "short", "long")


@dataclass(frozen=True)
class CleaningConfig:
    normalize: str = "NFC"
    min_chars: int = 1
    max_chars: int = 1_000_000
    exact_dedup: bool = True
    filters: tuple[QualityFilter, ...] = ()
    near_dup: NearDupConfig | None = None

    def __post_init__(self):
        if self.normalize not in NORMALIZATIONS:
            raise DataError(f"--normalize {self.normalize} is not one of {', '.join(NORMALIZATIONS)}")
        if not 1 <= self.min_chars <= self.max_chars:
            raise DataError(f"length limits min_chars={self.min_chars}, max_chars={self.max_chars} must satisfy "
                            f"1 <= min_chars <= max_chars")

    @property
    def reasons(self) -> list[str]:
        """Every reason a document can be dropped, in the order they are tried."""
        dedup = ["duplicate"] * self.exact_dedup + ["near_duplicate"] * (self.near_dup is not None)
        return [*LENGTH_REASONS, *(f.name for f in self.filters), *dedup]


@dataclass
class Examined:
    """A chunk of documents as a worker found them; index i is the chunk's i-th document."""
    verdicts: list            # None (a candidate to keep) or the reason it is dropped
    values: list              # the measured value of the filter that dropped it (None otherwise)
    chars: np.ndarray         # characters after normalisation
    digests: list             # 16-byte BLAKE2b of the normalised text (exact dedup), or None
    signatures: np.ndarray | None = None   # (n, num_perm) uint32 MinHash signatures
    flat: np.ndarray | None = None         # every document's token ids back to back (encoding pass)
    lengths: np.ndarray | None = None      # tokens per document (encoding pass)
    texts: list | None = None              # the normalised texts (tokenizer-training pass)


class Examiner:
    """The worker's side: one per process."""

    def __init__(self, cfg: CleaningConfig, tokenizer=None, dtype=None):
        self.cfg, self.tokenizer, self.dtype = cfg, tokenizer, dtype
        self.hasher = MinHasher(cfg.near_dup) if cfg.near_dup else None

    def _verdict(self, text: str):
        if not text.strip():
            return "empty", None
        if len(text) < self.cfg.min_chars:
            return "short", len(text)
        if len(text) > self.cfg.max_chars:
            return "long", len(text)
        rejected = first_rejection(self.cfg.filters, text) if self.cfg.filters else None
        return rejected if rejected else (None, None)

    def examine(self, raw: list[str]) -> Examined:
        form = self.cfg.normalize
        texts = raw if form == "none" else [unicodedata.normalize(form, t) for t in raw]
        verdicts, values = zip(*map(self._verdict, texts)) if texts else ((), ())
        keep = [v is None for v in verdicts]
        digests = [hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=16).digest() if k else None
                   for t, k in zip(texts, keep)] if self.cfg.exact_dedup else [None] * len(texts)
        out = Examined(list(verdicts), list(values), np.fromiter(map(len, texts), np.int64, len(texts)), digests)
        if self.hasher:
            sigs = np.zeros((len(texts), self.cfg.near_dup.num_perm), dtype=np.uint32)
            for i in itertools.compress(range(len(texts)), keep):
                sigs[i] = self.hasher.signature(texts[i])
            out.signatures = sigs
        if self.tokenizer is None:
            out.texts = [t if k else None for t, k in zip(texts, keep)]
        else:
            out.flat, out.lengths = encode(self.tokenizer, texts, self.dtype)
        return out


def encode(tok, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Encode a chunk; return its ids (every document followed by EOD, and led by BOS where the tokenizer says
    documents start with it) flat, and each document's length."""
    ids = tok.encode_batch(texts)
    bos = [tok.bos_id] if tok.special.add_bos and tok.bos_id is not None else []
    eod = [tok.eod_id]
    lengths = np.fromiter((len(bos) + len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(bos + x + eod for x in ids), dtype=dtype,
                       count=int(lengths.sum()))
    return flat, lengths


# ---------------------------------------------------------------- the main process's side

LENGTH_BINS = np.concatenate([[0], np.logspace(0, 8, 33)])   # characters: fixed, so reports compare
EXAMPLES = 3
EXCERPT_CHARS = 240


@dataclass
class Tally:
    documents: int = 0
    tokens: int = 0
    chars: int = 0
    examples: list = field(default_factory=list)


class Decider:
    """Decides keep or drop for each examined document in corpus order, and counts why."""

    def __init__(self, cfg: CleaningConfig):
        self.cfg = cfg
        self.seen: set[bytes] = set()
        self.index = NearDupIndex(cfg.near_dup) if cfg.near_dup else None
        self.tallies = {reason: Tally() for reason in cfg.reasons}
        self.kept, self.read = Tally(), Tally()
        self.hist_before = np.zeros(len(LENGTH_BINS) - 1, dtype=np.int64)
        self.hist_after = np.zeros_like(self.hist_before)

    def _dedup(self, i: int, found: Examined):
        digest = found.digests[i]
        if digest is not None:
            if digest in self.seen:
                return "duplicate", None
            self.seen.add(digest)
        if self.index is not None:
            duplicate, similarity = self.index.is_duplicate(found.signatures[i])
            if duplicate:
                return "near_duplicate", round(similarity, 4)
        return None, None

    def decide(self, found: Examined, raw: list[str]) -> np.ndarray:
        """A keep mask over the chunk; ``raw`` (the documents as read) gives the examples."""
        n = len(found.verdicts)
        keep = np.zeros(n, dtype=bool)
        tokens = found.lengths if found.lengths is not None else np.zeros(n, dtype=np.int64)
        for i in range(n):
            reason, value = found.verdicts[i], found.values[i]
            if reason is None:
                reason, value = self._dedup(i, found)
            tally = self.kept if reason is None else self.tallies[reason]
            keep[i] = reason is None
            tally.documents += 1
            tally.tokens += int(tokens[i])
            tally.chars += int(found.chars[i])
            if reason is not None and len(tally.examples) < EXAMPLES:
                tally.examples.append({"value": value, "excerpt": raw[i][:EXCERPT_CHARS]})
        self.read.documents += n
        self.read.tokens += int(tokens.sum())
        self.read.chars += int(found.chars.sum())
        self.hist_before += np.histogram(found.chars, LENGTH_BINS)[0]
        self.hist_after += np.histogram(found.chars[keep], LENGTH_BINS)[0]
        return keep

    def index_bytes(self) -> int:
        """Memory held by the structures that grow with the corpus (the dedup hash set and the MinHash index)."""
        # each 16-byte digest is a 49-byte bytes object (64 as allocated); the set's table is counted at 1.5x
        # (its resize)
        size = len(self.seen) * allocated_bytes(sys.getsizeof(bytes(16))) + int(1.5 * sys.getsizeof(self.seen))
        if self.index is not None:
            size += self.index.nbytes()
        return size
