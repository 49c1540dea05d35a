"""Byte-level BPE (GPT-2 style) through Hugging Face ``tokenizers``: train, load, save, size the vocabulary.

Every document ends with the end-of-document token ``<|endoftext|>``; the loader concatenates documents, so
that token is what tells the model where one stops and the next starts.
"""
from __future__ import annotations

import json
import pathlib
from typing import Iterable

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from megalm.data.errors import DataError

EOD_TOKEN = "<|endoftext|>"
# Other names of the end-of-document token in tokenizers trained elsewhere (Llama 2, Llama 3, Gemma).
_OTHER_EOD_TOKENS = ("</s>", "<|end_of_text|>", "<eos>")
MIN_VOCAB_SIZE = 257  # 256 byte symbols + <|endoftext|>


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the end-of-document id; encodes without adding BOS/EOS of its own."""

    def __init__(self, tok: tokenizers.Tokenizer, eod_token: str | None = None, source: str = "<memory>"):
        self._tok = tok
        self.source = source
        candidates = (eod_token,) if eod_token else (EOD_TOKEN, *_OTHER_EOD_TOKENS)
        ids = [tok.token_to_id(t) for t in candidates]
        found = [(t, i) for t, i in zip(candidates, ids) if i is not None]
        if not found:
            raise DataError(f"tokenizer {source} has no end-of-document token (looked for "
                            f"{', '.join(candidates)}): add {EOD_TOKEN!r} as a special token, or let "
                            f"megalm preprocess train one with --vocab-size")
        self.eod_token, self.eod_id = found[0]

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def to_str(self) -> str:
        return self._tok.to_str()

    @classmethod
    def from_str(cls, data: str, eod_token: str | None = None) -> "Tokenizer":
        return cls(tokenizers.Tokenizer.from_str(data), eod_token)

    def save(self, path: str | pathlib.Path) -> None:
        self._tok.save(str(path))


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with ``vocab_size`` entries (fewer if the corpus runs out of merges).

    Deterministic: the same texts in the same order give the same merges.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"vocab size {vocab_size} is too small: a byte-level BPE needs at least "
                        f"{MIN_VOCAB_SIZE} (256 bytes + {EOD_TOKEN}); pass --vocab-size >= {MIN_VOCAB_SIZE}")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return Tokenizer(tok, EOD_TOKEN, source="<trained>")


def load_tokenizer(path: str | pathlib.Path) -> Tokenizer:
    """Load a ``tokenizer.json`` file, or a Hugging Face tokenizer folder that contains one."""
    path = pathlib.Path(path)
    eod_token = None
    if path.is_dir():
        eod_token = _eos_from_config(path / "tokenizer_config.json")
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"tokenizer {path} not found: pass a tokenizer.json file or a Hugging Face tokenizer "
                        f"folder containing tokenizer.json (slow sentencepiece-only tokenizers are not read)")
    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise DataError(f"tokenizer {path} could not be read ({e}): pass a tokenizer.json written by "
                        f"Hugging Face tokenizers") from None
    if eod_token is not None and tok.token_to_id(eod_token) is None:
        eod_token = None
    return Tokenizer(tok, eod_token, source=str(path))


def _eos_from_config(config: pathlib.Path) -> str | None:
    if not config.is_file():
        return None
    eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
    if isinstance(eos, dict):  # AddedToken written out as {"content": ..., ...}
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None


def tokenizer_path(prefix: str | pathlib.Path) -> str:
    """Where ``megalm preprocess`` saves the tokenizer of the dataset at ``prefix``."""
    return f"{prefix}.tokenizer.json"


def dataset_tokenizer(prefix) -> "Tokenizer | None":
    """The tokenizer ``megalm preprocess`` saved beside the dataset at ``prefix``, or None."""
    if prefix and pathlib.Path(tokenizer_path(prefix)).exists():
        return load_tokenizer(tokenizer_path(prefix))
    return None


def padded_vocab_size(vocab_size: int, multiple: int = 128, tp: int = 1) -> int:
    """Round up to a multiple of ``multiple * tp`` (Megatron's --make-vocab-size-divisible-by).

    The embedding and output layer are split by rows across tensor-parallel ranks, so every rank needs the
    same number of rows, and a multiple of 128 keeps each slice's matmuls aligned.
    """
    if vocab_size < 1 or multiple < 1 or tp < 1:
        raise DataError(f"padded_vocab_size needs positive numbers, got vocab_size={vocab_size}, "
                        f"multiple={multiple}, tp={tp}")
    step = multiple * tp
    return -(-vocab_size // step) * step
