"""Resolution: the one place a config changes. It takes what was read (YAML and overrides), the launcher's world
size, the checkpoint being resumed or loaded, the dataset's tokenizer and a DeepSpeed JSON, and returns one
validated, frozen config, before any process group exists or anything is allocated."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from megalm.config.deepspeed_json import adopt_deepspeed_json
from megalm.config.rules import validate
from megalm.config.schema import Config, ConfigError, ModelConfig

# Model settings a run may change against its checkpoint (they do not change any tensor's shape or meaning).
MODEL_KEYS_FREE_TO_CHANGE = ("dropout",)


def resolve(cfg: Config, world_size: int, *, checkpoint: Optional[tuple[Path, dict]] = None,
            adopt_model: bool = False, tokenizer=None, cuda: Optional[bool] = None) -> Config:
    """The run's frozen config.

    ``checkpoint``: (folder, saved config dict) of the checkpoint being resumed (its model must agree with the
    config's) or, with ``adopt_model``, loaded for fine-tuning (its model settings are taken wholesale).
    ``tokenizer``: the dataset's, whose size gives model.vocab_size when unset. ``cuda``: whether the run will
    use CUDA (None: decided from train.device and the machine).
    """
    work = cfg.mutable_copy()
    if work.data.blend is not None and not work.is_set("data.prefix"):
        work.data.prefix = None                      # the blend's sources are the data; no default prefix
    if checkpoint is not None:
        _adopt_checkpoint_model(work, *checkpoint, adopt_model)
    resolve_vocab(work, tokenizer)
    p = work.parallel
    if work.uses_deepspeed and p.deepspeed_config and world_size % (p.tp * p.pp) == 0:
        adopt_deepspeed_json(work, world_size // (p.tp * p.pp))    # else the rule book names the world error
    validate(work, world_size, cuda)
    return work.freeze()


def _adopt_checkpoint_model(cfg: Config, folder: Path, saved: dict, adopt: bool) -> None:
    """A resumed run keeps the model it was saved with, and a different explicit model setting is an error; a run
    started from a checkpoint's weights (fine-tuning) takes the checkpoint's model settings."""
    # keys a checkpoint predates have their default (the model it was trained as)
    model = {**dataclasses.asdict(ModelConfig()), **saved["model"]}
    for key, value in model.items():
        if key in MODEL_KEYS_FREE_TO_CHANGE:
            continue
        mine = getattr(cfg.model, key)
        if adopt or (key == "vocab_size" and mine is None):
            setattr(cfg.model, key, value)
    if adopt:
        return
    current = cfg.to_dict()["model"]
    diff = {k: (model.get(k), v) for k, v in current.items()
            if _plain(model.get(k)) != _plain(v) and k not in MODEL_KEYS_FREE_TO_CHANGE}
    if diff:
        detail = ", ".join(f"model.{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(f"{folder} holds another model ({detail}); use a new train.run_dir or the "
                          f"checkpoint's model settings")


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def vocab_size_for(configured: int | None, tokenizer_vocab: int, tp: int = 1, multiple: int = 128) -> int:
    """The model's vocabulary: ``configured`` if set (and large enough), else the tokenizer's padded to a multiple
    of ``multiple`` x tp (Megatron's --make-vocab-size-divisible-by)."""
    from megalm.data.tokenizer import padded_vocab_size

    if configured is None:
        return padded_vocab_size(tokenizer_vocab, multiple, tp)
    if configured < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size={configured} is smaller than the tokenizer's vocabulary "
                          f"{tokenizer_vocab}: set model.vocab_size >= {tokenizer_vocab}, or leave it unset to "
                          f"use {padded_vocab_size(tokenizer_vocab, multiple, tp)}")
    return configured


def resolve_vocab(cfg: Config, tokenizer) -> None:
    """model.vocab_size from the tokenizer when unset; at least its size."""
    if tokenizer is None:
        if cfg.model.vocab_size is None:
            raise ConfigError("model.vocab_size is unset and no tokenizer was found to take it from; run "
                              "megalm preprocess first or set model.vocab_size")
        return
    cfg.model.vocab_size = vocab_size_for(cfg.model.vocab_size, tokenizer.vocab_size, cfg.parallel.tp)
