"""Near-duplicate removal: MinHash signatures (datasketch) and a banded locality-sensitive hashing index.

A document's shingles are its lower-cased word n-grams (``shingle`` words each); its signature is the minimum
of each of ``num_perm`` hash permutations over them (datasketch's ``MinHash``: the permutations are fixed by
``seed``, so a signature is the same in any process). The signature is cut into ``bands`` bands of
``num_perm // bands`` rows; two documents that agree on every row of one band are candidates (the probability
is 1 - (1 - J^rows)^bands for Jaccard similarity J), and a candidate is a duplicate when the fraction of equal
signature entries (an unbiased estimate of J) is at least ``threshold``.

Documents are decided in corpus order, so the first of a group of near-copies is kept, and the result does not
depend on how many workers computed the signatures. The index is the one structure that grows with the corpus:
per kept document its signature (4 bytes x num_perm) and one dictionary entry per band (about 70 bytes each).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from megalm.data.errors import DataError
from megalm.data.memory import allocated_bytes
from megalm.data.quality import words

_ROWS_PER_BLOCK = 1 << 12


@dataclass(frozen=True)
class NearDupConfig:
    shingle: int = 5
    num_perm: int = 128
    bands: int = 20
    threshold: float = 0.7
    seed: int = 1

    def __post_init__(self):
        if self.shingle < 1 or self.num_perm < 1 or not 1 <= self.bands <= self.num_perm:
            raise DataError(f"near-duplicate settings shingle={self.shingle}, num_perm={self.num_perm}, "
                            f"bands={self.bands} must satisfy shingle >= 1 and 1 <= bands <= num_perm")
        if not 0 < self.threshold <= 1:
            raise DataError(f"--near-dup-threshold {self.threshold} must lie in (0, 1]")

    @property
    def rows(self) -> int:
        return self.num_perm // self.bands

    def candidate_probability(self, jaccard: float) -> float:
        return 1 - (1 - jaccard ** self.rows) ** self.bands


class MinHasher:
    """Signatures of documents; build once per process (the permutations are drawn once)."""

    def __init__(self, cfg: NearDupConfig):
        from datasketch import MinHash
        self.cfg = cfg
        self._template = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, scheme="affine32")
        self._minhash = MinHash

    def signature(self, text: str) -> np.ndarray:
        """(num_perm,) uint32; a document shorter than one shingle is one shingle of all its words."""
        ws = [w.lower() for w in words(text)]
        n = self.cfg.shingle
        shingles = {" ".join(ws[i:i + n]).encode() for i in range(max(1, len(ws) - n + 1))}
        m = self._minhash(num_perm=self.cfg.num_perm, seed=self.cfg.seed,
                          permutations=self._template.permutations, scheme="affine32")
        m.update_batch(shingles)
        return np.asarray(m.hashvalues, dtype=np.uint32)


class NearDupIndex:
    """The kept documents' signatures and band keys; ``is_duplicate`` answers and remembers in one step."""

    def __init__(self, cfg: NearDupConfig):
        self.cfg = cfg
        rng = np.random.default_rng(cfg.seed)
        # One odd multiplier per signature entry: a band's key is the wrapping dot product of its rows with
        # them, different in every band. A key collision only adds a candidate, which the estimate then rejects.
        self._mult = (rng.integers(0, 2**63, cfg.rows * cfg.bands, dtype=np.uint64) * 2 + 1).reshape(cfg.bands,
                                                                                                      cfg.rows)
        self._buckets: dict[int, int] = {}
        self._blocks: list[np.ndarray] = []
        self.kept = 0

    def _keys(self, sig: np.ndarray) -> list[int]:
        rows = sig[: self.cfg.bands * self.cfg.rows].astype(np.uint64).reshape(self.cfg.bands, self.cfg.rows)
        with np.errstate(over="ignore"):
            return (rows * self._mult).sum(axis=1, dtype=np.uint64).tolist()

    def _signature(self, doc: int) -> np.ndarray:
        return self._blocks[doc // _ROWS_PER_BLOCK][doc % _ROWS_PER_BLOCK]

    def is_duplicate(self, sig: np.ndarray) -> tuple[bool, float]:
        """(whether ``sig`` nearly duplicates a kept document, the best similarity estimate seen); a document
        that is not a duplicate is added to the index."""
        keys = self._keys(sig)
        best = 0.0
        for doc in {self._buckets[k] for k in keys if k in self._buckets}:
            similarity = float(np.mean(self._signature(doc) == sig))
            best = max(best, similarity)
            if similarity >= self.cfg.threshold:
                return True, similarity
        self._remember(sig, keys)
        return False, best

    def nbytes(self) -> int:
        """Peak memory of the index: the signature blocks, the bucket dictionary's integer keys (64-bit keys
        are 36-byte ints, 48 as allocated) and document numbers (one per kept document), and its hash table at
        1.5 times its size (while CPython resizes a dictionary the old and the new table both exist)."""
        key = allocated_bytes(sys.getsizeof(2**63))
        doc_number = allocated_bytes(sys.getsizeof(2**20))
        return (sum(b.nbytes for b in self._blocks) + key * len(self._buckets) + doc_number * self.kept
                + int(1.5 * sys.getsizeof(self._buckets)))

    def _remember(self, sig: np.ndarray, keys: list[int]) -> None:
        doc = self.kept
        if doc % _ROWS_PER_BLOCK == 0:
            self._blocks.append(np.empty((_ROWS_PER_BLOCK, self.cfg.num_perm), dtype=np.uint32))
        self._blocks[-1][doc % _ROWS_PER_BLOCK] = sig
        for k in keys:
            self._buckets.setdefault(k, doc)
        self.kept += 1
