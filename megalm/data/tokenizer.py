"""Byte-level BPE (GPT-2 style) through Hugging Face ``tokenizers``: train, load, save, size the vocabulary.

Every document ends with the tokenizer's end-of-document token (``<|endoftext|>`` for the BPE megalm trains,
Hugging Face's eos_token otherwise: ``</s>``, ``<|im_end|>``, ...); the loader concatenates documents, so that
token is what tells the model where one stops and the next starts. The special tokens are recorded beside the
tokenizer (``SpecialTokens``), so nothing is guessed later.
"""
from __future__ import annotations

import json
import pathlib
from dataclasses import asdict, dataclass, fields
from typing import Iterable

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from megalm.data.errors import DataError

EOD_TOKEN = "<|endoftext|>"
# Other names of the end-of-document token in tokenizers trained elsewhere (Llama 2, Llama 3, Gemma), used only
# for a bare tokenizer.json that carries no record of its special tokens.
_OTHER_EOD_TOKENS = ("</s>", "<|end_of_text|>", "<eos>")
MIN_VOCAB_SIZE = 257  # 256 byte symbols + <|endoftext|>


@dataclass(frozen=True)
class SpecialTokens:
    """What a tokenizer.json does not say about itself: which token ends a document (Hugging Face's eos), the
    beginning-of-sequence and padding tokens, whether documents start with BOS, and the chat template. Recorded
    at preprocess, saved beside the tokenizer (``special_path``), carried by every checkpoint, and written back
    by ``convert to-hf``."""
    eod: str
    bos: str | None = None
    pad: str | None = None
    add_bos: bool = False
    chat_template: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str) -> "SpecialTokens":
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown or not isinstance(data.get("eod"), str):
            raise DataError(f"{source} is not a megalm special-tokens record (keys {sorted(data)}); re-run megalm "
                            f"preprocess to write it")
        return cls(**data)


class Tokenizer:
    """A ``tokenizers.Tokenizer`` and its special tokens; encodes without adding BOS/EOS of its own, and with
    literal special-token text inside a document encoded as text (``parse_special=True``: as the special token)."""

    def __init__(self, tok: tokenizers.Tokenizer, special: SpecialTokens | str | None = None,
                 source: str = "<memory>", parse_special: bool = False):
        self._tok, self.source = tok, source
        if not isinstance(special, SpecialTokens):
            special = SpecialTokens(_find_eod(tok, special, source))
        for role in ("eod", "bos", "pad"):
            token = getattr(special, role)
            if token is not None and tok.token_to_id(token) is None:
                raise DataError(f"tokenizer {source}: its {role} token {token!r} is not in its vocabulary; fix the "
                                f"tokenizer's special tokens")
        self.special = special
        self.eod_token, self.eod_id = special.eod, tok.token_to_id(special.eod)
        self.bos_id = tok.token_to_id(special.bos) if special.bos else None
        self.parse_special = parse_special
        tok.encode_special_tokens = not parse_special

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and each token's character span, with special-token text encoded as the special token (a chat
        template's markers are; ``megalm.data.chat`` refuses message content that holds any)."""
        before = self._tok.encode_special_tokens
        self._tok.encode_special_tokens = False
        try:
            encoding = self._tok.encode(text, add_special_tokens=False)
        finally:
            self._tok.encode_special_tokens = before
        return encoding.ids, [tuple(o) for o in encoding.offsets]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.20) gives the same ids without computing character offsets
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def to_str(self) -> str:
        return self._tok.to_str()

    @classmethod
    def from_str(cls, data: str, special: SpecialTokens | str | None = None, parse_special: bool = False):
        return cls(tokenizers.Tokenizer.from_str(data), special, parse_special=parse_special)

    def save(self, path: str | pathlib.Path) -> None:
        """tokenizer.json at ``path`` and the special-tokens record beside it."""
        self._tok.save(str(path))
        pathlib.Path(special_path(path)).write_text(json.dumps(self.special.to_dict(), indent=1))


def _find_eod(tok, eod_token: str | None, source: str) -> str:
    candidates = (eod_token,) if eod_token else (EOD_TOKEN, *_OTHER_EOD_TOKENS)
    found = [t for t in candidates if tok.token_to_id(t) is not None]
    if not found:
        raise DataError(f"tokenizer {source} has no end-of-document token (looked for {', '.join(candidates)}): "
                        f"give a Hugging Face tokenizer folder whose tokenizer_config.json names its eos_token, add "
                        f"{EOD_TOKEN!r} as a special token, or let megalm preprocess train one with --vocab-size")
    return found[0]


def special_path(tokenizer_file: str | pathlib.Path) -> str:
    """Where the special-tokens record of ``X.json`` lives: ``X.special.json``."""
    name = str(tokenizer_file)
    return (name[:-len(".json")] if name.endswith(".json") else name) + ".special.json"


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
    return Tokenizer(tok, SpecialTokens(EOD_TOKEN), source="<trained>")


def load_tokenizer(path: str | pathlib.Path, parse_special: bool = False) -> Tokenizer:
    """Load a ``tokenizer.json`` file (with its special-tokens record when one lies beside it), or a Hugging Face
    tokenizer folder (its tokenizer_config.json names the special tokens and the chat template)."""
    path = pathlib.Path(path)
    special = None
    if path.is_dir():
        special = _special_from_hf_folder(path)
        path = path / "tokenizer.json"
    elif pathlib.Path(special_path(path)).is_file():
        record = pathlib.Path(special_path(path))
        try:
            special = SpecialTokens.from_dict(json.loads(record.read_text(encoding="utf-8")), str(record))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DataError(f"{record} is not valid JSON; re-run megalm preprocess to write it") from None
    if not path.is_file():
        raise DataError(f"tokenizer {path} not found: pass a tokenizer.json file or a Hugging Face tokenizer "
                        f"folder containing tokenizer.json (slow sentencepiece-only tokenizers are not read)")
    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise DataError(f"tokenizer {path} could not be read ({str(e)[:200]}): pass a tokenizer.json written by "
                        f"Hugging Face tokenizers") from None
    return Tokenizer(tok, special, source=str(path), parse_special=parse_special)


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # AddedToken written out as {"content": ..., ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_from_hf_folder(folder: pathlib.Path) -> SpecialTokens | None:
    """The special tokens a Hugging Face tokenizer folder declares (None: it declares no eos_token)."""
    config_file = folder / "tokenizer_config.json"
    config = {}
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DataError(f"{config_file} is not valid JSON") from None
    eod = _token_text(config.get("eos_token"))
    if eod is None:
        return None
    template = config.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if not (template is None or isinstance(template, str)):
        raise DataError(f"{config_file}: chat_template is a list of named templates; megalm keeps one template")
    return SpecialTokens(eod=eod, bos=_token_text(config.get("bos_token")), pad=_token_text(config.get("pad_token")),
                         add_bos=bool(config.get("add_bos_token", False)), chat_template=template)


def tokenizer_path(prefix: str | pathlib.Path) -> str:
    """Where ``megalm preprocess`` saves the tokenizer of the dataset at ``prefix``."""
    return f"{prefix}.tokenizer.json"


def tokenizer_files(prefix) -> list[pathlib.Path]:
    """The tokenizer files ``megalm preprocess`` writes beside the dataset at ``prefix``."""
    return [pathlib.Path(tokenizer_path(prefix)), pathlib.Path(special_path(tokenizer_path(prefix)))]


def first_tokenizer_mismatch(prefixes: list[str]) -> tuple[str, pathlib.Path] | None:
    """(prefix, file) of the first dataset whose tokenizer files differ from the first one's, byte for byte (a
    missing file differs from a present one); None when all agree."""
    def contents(path: pathlib.Path):
        return path.read_bytes() if path.is_file() else None
    reference = [contents(p) for p in tokenizer_files(prefixes[0])]
    for other in prefixes[1:]:
        for ref, path in zip(reference, tokenizer_files(other)):
            if contents(path) != ref:
                return other, path
    return None


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
