"""Samples of a chat dataset (``megalm preprocess chat``): one conversation per sample, padded to seq_len + 1.

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
                 split_weights=(98, 1, 1), split_seed: int = 1234):
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
        self.num_samples = len(self.docs)
        self._perm_epoch, self._perm = -1, None
        self.indexed.verify()
        self.masks.verify()

    def __len__(self) -> int:
        return self.num_samples

    def sample(self, k: int) -> np.ndarray:
        doc = int(self.docs[k])
        out = np.zeros((2, self.seq_len + 1), dtype=np.int64)
        tokens, mask = self.indexed[doc], self.masks[doc]
        out[0, :len(tokens)], out[1, :len(mask)] = tokens, mask
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


def inputs_and_targets(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of a micro-batch: (B, T+1) token ids, or (B, 2, T+1) tokens and loss mask."""
    if batch.dim() == 2:
        return batch[:, :-1], batch[:, 1:]
    tokens, mask = batch[:, 0], batch[:, 1]
    return tokens[:, :-1], tokens[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)
