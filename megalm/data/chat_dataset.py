"""Samples of a chat dataset (``megalm preprocess chat``): one conversation per sample, padded to seq_len + 1, or
(``data.pack``) as many whole conversations as fit, each attending only to itself.

A sample is a (2, seq_len + 1) int64 array: row 0 the tokens, row 1 the loss mask (1 on the assistant's tokens,
0 on the prompt and the padding). ``inputs_and_targets`` turns a micro-batch of them into the model's inputs and
targets, with every target that is not an assistant token set to ``IGNORE`` (the loss skips it, and the last
token of a conversation never predicts padding). Splits, the per-epoch shuffle and exact resume work as for
pretraining data (``megalm.data.dataset``), by conversation.
"""
from __future__ import annotations

import operator

import numpy as np
import torch

from megalm.data.chat_preprocess import open_masks
from megalm.data.dataset import split_documents
from megalm.data.errors import DataError
from megalm.data.indexed import IndexedDataset

IGNORE = -100


class ChatDataset:
    def __init__(self, prefix: str, split: str, seq_len: int, seed: int = 1234, vocab_size: int | None = None,
                 split_weights=(98, 1, 1), split_seed: int = 1234, pack: bool = False):
        self.prefix, self.split, self.seq_len, self.seed = str(prefix), split, seq_len, seed
        self.indexed, self.masks = IndexedDataset(prefix), open_masks(prefix)
        top = self.indexed.max_token_id
        if vocab_size is not None and top >= vocab_size:
            raise DataError(f"token id {top} in {prefix} is beyond the model's vocabulary {vocab_size}: "
                            f"preprocess with the checkpoint's tokenizer")
        self.docs = split_documents(len(self.indexed), split_weights, split_seed)[split]
        if len(self.docs) == 0:
            raise DataError(f"split {split!r} of {prefix} holds no conversation ({len(self.indexed)} in all, split "
                            f"{tuple(split_weights)}): give it more weight or more data")
        lengths = self.indexed.doc_lengths[self.docs]
        if lengths.max() > seq_len + 1:
            raise DataError(f"a conversation of {int(lengths.max())} tokens in {prefix} is longer than "
                            f"data.seq_len + 1 = {seq_len + 1}: raise data.seq_len or preprocess with "
                            f"--max-tokens {seq_len + 1}")
        self.pack = pack
        self.plan = pack_in_order(lengths, seq_len + 1) if pack else [[k] for k in range(len(self.docs))]
        self.num_samples = len(self.plan)
        self._perm_epoch, self._perm = -1, None
        self.indexed.verify()
        self.masks.verify()

    def __len__(self) -> int:
        return self.num_samples

    def sample(self, k: int) -> np.ndarray:
        """(2, seq_len + 1): tokens, mask; packed, (3, seq_len + 1) with each position's conversation (1, 2, ...;
        0 on the padding)."""
        out = np.zeros((3 if self.pack else 2, self.seq_len + 1), dtype=np.int64)
        at = 0
        for number, position in enumerate(self.plan[k], 1):
            doc = int(self.docs[position])
            tokens, mask = self.indexed[doc], self.masks[doc]
            out[0, at:at + len(tokens)], out[1, at:at + len(mask)] = tokens, mask
            if self.pack:
                out[2, at:at + len(tokens)] = number
            at += len(tokens)
        return out

    def __getitem__(self, i: int) -> np.ndarray:
        i = operator.index(i)
        if i < 0:
            raise IndexError(f"sample index {i} must be non-negative")
        epoch, k = divmod(i, self.num_samples)
        if epoch != self._perm_epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._perm, self._perm_epoch = rng.permutation(self.num_samples), epoch
        return self.sample(int(self._perm[k]))


def pack_in_order(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Consecutive runs of documents whose lengths add up to at most ``capacity``: each sample is filled in order
    until the next document would not fit (deterministic, so resuming packs alike)."""
    plan, current, used = [], [], 0
    for k, n in enumerate(int(x) for x in lengths):
        if current and used + n > capacity:
            plan.append(current)
            current, used = [], 0
        current.append(k)
        used += n
    if current:
        plan.append(current)
    return plan


def inputs_and_targets(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(inputs, targets, segments) of a micro-batch: (B, T+1) token ids; (B, 2, T+1) tokens and loss mask; or
    (B, 3, T+1) tokens, loss mask and each position's document (packed documents: segments for the model, and
    no target across a document boundary, so the last token of one never predicts the first of the next)."""
    if batch.dim() == 2:
        return batch[:, :-1], batch[:, 1:], None
    tokens, mask = batch[:, 0], batch[:, 1]
    ignored = mask[:, 1:] == 0
    segments = None
    if batch.shape[1] == 3:
        segments = batch[:, 2]
        ignored = ignored | (segments[:, 1:] != segments[:, :-1])
        segments = segments[:, :-1]
    return tokens[:, :-1], tokens[:, 1:].masked_fill(ignored, IGNORE), segments
