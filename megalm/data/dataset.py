"""Fixed-length samples over a split of an indexed dataset, shuffled per epoch, and the resumable sampler.

A split's documents (each already ending with EOD) are concatenated into one stream of T tokens; sample k is
tokens [k*L, k*L + L + 1) of it, so neighbouring samples share one token and inputs = s[:-1], targets = s[1:]
cover every next-token pair once. One epoch holds (T - 1) // L samples. Sample i of the infinite stream is
sample perm_e[i mod n] with e = i // n and perm_e a permutation seeded by (seed, e): any index can be read
without replaying the ones before it, which is what makes resuming from ``consumed_samples`` exact.
"""
from __future__ import annotations

import operator
import os
import pathlib
import uuid
import warnings
from typing import Iterator

import numpy as np
import torch

from megalm.config.rules import micro_batches_per_rank
from megalm.data.errors import DataError
from megalm.data.indexed import IndexedDataset

SPLITS = ("train", "valid", "test")


def split_documents(num_docs: int, split=(98, 1, 1), seed: int = 1234) -> dict[str, np.ndarray]:
    """Assign documents to train/valid/test at random in proportion to ``split``; sorted ids per split.

    Every split with a nonzero weight gets at least one document when there are enough documents.
    """
    weights = np.asarray(split, dtype=np.float64)
    if weights.shape != (3,) or np.any(weights < 0) or weights.sum() <= 0:
        raise DataError(f"split weights {tuple(split)} must be three non-negative numbers (train, valid, "
                        f"test) with a positive sum, e.g. (98, 1, 1)")
    bounds = np.round(np.cumsum(weights) / weights.sum() * num_docs).astype(np.int64)
    counts = np.diff(bounds, prepend=0)
    wanted = weights > 0
    if num_docs >= wanted.sum():
        for i in np.flatnonzero(wanted & (counts == 0)):
            counts[np.argmax(counts)] -= 1
            counts[i] = 1
    perm = np.random.default_rng(seed).permutation(num_docs)
    ends = np.cumsum(counts)
    return {name: np.sort(perm[end - c:end]) for name, c, end in zip(SPLITS, counts, ends)}


class TokenDataset:
    """Samples of ``seq_len + 1`` token ids (int64) from one split of the indexed dataset at ``prefix``.

    ``split_seed`` fixes which documents are held out; ``seed`` only orders the samples, so runs with
    different seeds still share the same validation and test documents.
    """

    def __init__(self, prefix: str, split: str, seq_len: int, seed: int = 1234, vocab_size: int | None = None,
                 split_weights=(98, 1, 1), split_seed: int = 1234, document_eod: int | None = None):
        """``document_eod``: the end-of-document id; samples then carry each position's document
        (``data.document_mask``): (3, seq_len + 1) rows of tokens, loss mask (all ones) and document index."""
        self.document_eod = document_eod
        if split not in SPLITS:
            raise DataError(f"split {split!r} is not one of {', '.join(SPLITS)}")
        if seq_len < 1:
            raise DataError(f"seq_len={seq_len} must be at least 1")
        self.prefix, self.split, self.seq_len, self.seed = str(prefix), split, seq_len, seed
        self.indexed = IndexedDataset(prefix)
        self._check_vocab(vocab_size)
        self.docs = split_documents(len(self.indexed), split_weights, split_seed)[split]
        lengths = self.indexed.doc_lengths[self.docs]
        self.num_tokens = int(lengths.sum())
        if self.num_tokens < seq_len + 1:
            raise DataError(f"split {split!r} of {prefix} holds {self.num_tokens} tokens in {len(self.docs)} "
                            f"documents, fewer than seq_len + 1 = {seq_len + 1}: lower seq_len, give the "
                            f"split more weight than {tuple(split_weights)}, or preprocess more data")
        self.num_samples = (self.num_tokens - 1) // seq_len
        weights = "_".join(f"{w:g}" for w in split_weights)
        self.cache_path = pathlib.Path(f"{prefix}.{split}-seq{seq_len}-split{weights}-seed{split_seed}-"
                                       f"{self.indexed.fingerprint}.samples.npy")
        self._index = self._load_or_build_index(lengths)
        self._perm_epoch, self._perm = -1, None

    def _check_vocab(self, vocab_size: int | None) -> None:
        top = self.indexed.max_token_id
        if vocab_size is not None and top >= vocab_size:
            raise DataError(f"token id {top} in {self.prefix} is beyond the model's vocabulary {vocab_size}: "
                            f"set model.vocab_size >= {top + 1} or preprocess with that model's tokenizer")

    def _load_or_build_index(self, lengths: np.ndarray) -> np.ndarray:
        """Row k = (position in self.docs, offset in that document) where sample k starts; cached on disk."""
        shape = (self.num_samples, 2)
        if self.cache_path.is_file():
            try:
                index = np.load(self.cache_path, mmap_mode="r", allow_pickle=False)
                if index.shape == shape and index.dtype == np.int64:
                    return index
            except ValueError:  # a damaged cache file is rebuilt, not trusted
                pass
        self.indexed.verify()  # one checksum pass per new index: catches a corrupt PREFIX.bin early
        ends = np.cumsum(lengths)
        starts = np.arange(self.num_samples, dtype=np.int64) * self.seq_len
        pos = np.searchsorted(ends, starts, side="right")
        index = np.stack([pos, starts - (ends[pos] - lengths[pos])], axis=1).astype(np.int64)
        self._save_index(index)
        return index

    def _save_index(self, index: np.ndarray) -> None:
        # Ranks may build the same index at once: each writes its own file and renames it into place.
        tmp = self.cache_path.with_name(f"{self.cache_path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                np.save(f, index, allow_pickle=False)
            os.replace(tmp, self.cache_path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            warnings.warn(f"could not cache the sample index at {self.cache_path} ({e}); "
                          f"it is rebuilt each run")

    def __len__(self) -> int:
        return self.num_samples

    def sample(self, k: int) -> np.ndarray:
        """Sample k of the unshuffled epoch: ``seq_len + 1`` tokens as int64."""
        pos, offset = (int(x) for x in self._index[k])
        need, pieces = self.seq_len + 1, []
        while need:
            piece = self.indexed[int(self.docs[pos])][offset:offset + need]
            pieces.append(piece)
            need -= len(piece)
            pos, offset = pos + 1, 0
        tokens = np.concatenate(pieces).astype(np.int64)
        if self.document_eod is None:
            return tokens
        ends = tokens == self.document_eod            # a document ends with its end-of-document token
        segments = np.concatenate([[0], np.cumsum(ends[:-1])])
        return np.stack([tokens, np.ones_like(tokens), segments])

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._perm, self._perm_epoch = rng.permutation(self.num_samples), epoch
        return self._perm

    def __getitem__(self, i: int) -> np.ndarray:
        """Sample i of the shuffled infinite stream (i may exceed len(self): later epochs)."""
        i = operator.index(i)
        if i < 0:
            raise IndexError(f"sample index {i} must be non-negative")
        epoch, k = divmod(i, self.num_samples)
        return self.sample(int(self._epoch_order(epoch)[k]))

    def __iter__(self) -> Iterator[np.ndarray]:
        """One shuffled epoch (the first)."""
        return (self[i] for i in range(self.num_samples))


class BatchSampler:
    """Hands this data-parallel rank its micro-batches of each global batch, in order, resumably.

    Global batch g is samples [c, c + G) of the shuffled stream (c = samples consumed before it); DP rank r
    takes the contiguous slice [c + r*G/dp, c + (r+1)*G/dp), cut into micro-batches. The union over ranks is
    the same global batch for any dp, so a run can resume under a different data-parallel layout.
    """

    def __init__(self, dataset: TokenDataset, global_batch_size: int, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, consumed_samples: int = 0):
        if min(global_batch_size, micro_batch_size, dp_size) < 1:
            raise DataError(f"global_batch_size={global_batch_size}, micro_batch_size={micro_batch_size} and "
                            f"dp_size={dp_size} must all be at least 1")
        micro_batches_per_rank(global_batch_size, micro_batch_size, dp_size, prefix="")   # the rule book's rule
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank={dp_rank} must lie in [0, dp_size={dp_size})")
        self.dataset = dataset
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.per_rank = global_batch_size // dp_size
        self.consumed_samples = 0
        self.load_state_dict({"consumed_samples": consumed_samples})

    @property
    def num_micro_batches(self) -> int:
        return self.per_rank // self.micro_batch_size

    def next_batch(self) -> list[torch.Tensor]:
        """This rank's micro-batches of the next global batch, each (micro_batch_size, seq_len + 1) int64."""
        start = self.consumed_samples + self.dp_rank * self.per_rank
        ids = range(start, start + self.per_rank)
        mbs = self.micro_batch_size
        batches = [torch.from_numpy(np.stack([self.dataset[i] for i in ids[j:j + mbs]]))
                   for j in range(0, self.per_rank, mbs)]
        self.consumed_samples += self.global_batch_size
        return batches

    def load_state_dict(self, state: dict) -> None:
        consumed = state.get("consumed_samples")
        if not isinstance(consumed, (int, np.integer)) or isinstance(consumed, bool) or consumed < 0:
            raise DataError(f"sampler state consumed_samples={consumed!r} must be a non-negative integer: "
                            f"the checkpoint's data state is damaged")
        self.consumed_samples = int(consumed)


def eval_batches(dataset: TokenDataset, micro_batch_size: int, max_samples: int) -> Iterator[torch.Tensor]:
    """Batches of (micro_batch_size, seq_len + 1) over the first samples of the unshuffled split.

    Only whole micro-batches: min(max_samples, len(dataset)) // micro_batch_size of them, the same every time.
    """
    n = min(max_samples, len(dataset)) // micro_batch_size * micro_batch_size
    if micro_batch_size < 1 or n == 0:
        raise DataError(f"evaluation over min(max_samples={max_samples}, {len(dataset)} samples in split "
                        f"{dataset.split!r}) cannot fill one micro-batch of {micro_batch_size}: raise the "
                        f"number of eval samples or lower micro_batch_size")

    def batches():
        for start in range(0, n, micro_batch_size):
            ks = range(start, start + micro_batch_size)
            yield torch.from_numpy(np.stack([dataset.sample(k) for k in ks]))

    return batches()
