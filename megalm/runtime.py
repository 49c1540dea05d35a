"""Bring a process up for a run: launcher discovery, config resolution and validation, topology, the model.

Shared by ``train``, ``eval`` and ``generate`` so that each builds the model the same way.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megalm.config import Config, ConfigError
from megalm.data.tokenizer import Tokenizer, load_tokenizer, padded_vocab_size, tokenizer_path
from megalm.parallel.launch import LaunchInfo, init_distributed
from megalm.parallel.topology import Topology, build_topology


@dataclass
class Runtime:
    cfg: Config
    info: LaunchInfo
    device: torch.device
    topo: Topology

    @property
    def is_logging_rank(self) -> bool:
        return self.info.rank == 0


def resolve_vocab(cfg: Config, tokenizer: Optional[Tokenizer]) -> None:
    """Take model.vocab_size from the tokenizer (padded for TP) when unset; refuse one smaller than it."""
    if tokenizer is None:
        if cfg.model.vocab_size is None:
            raise ConfigError("model.vocab_size is unset and no tokenizer was found to take it from; run "
                              "megalm preprocess first or set model.vocab_size")
        return
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = padded_vocab_size(tokenizer.vocab_size, 128, cfg.parallel.tp)
    elif cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} tokens; leave it unset or set at least {tokenizer.vocab_size}")


def dataset_tokenizer(cfg: Config) -> Optional[Tokenizer]:
    if cfg.data.prefix and Path(tokenizer_path(cfg.data.prefix)).exists():
        return load_tokenizer(tokenizer_path(cfg.data.prefix))
    return None


def pick_device(cfg: Config, local_rank: int) -> torch.device:
    if cfg.train.device == "cpu":
        return torch.device("cpu")
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA GPU is visible; use train.device=auto or cpu")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def start(cfg: Config, tokenizer: Optional[Tokenizer] = None) -> Runtime:
    """Validate everything first (every rank raises the same error before allocating), then join the group."""
    from megalm.parallel.launch import discover

    info = discover()
    if info.world_size > 1 or cfg.uses_deepspeed:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    resolve_vocab(cfg, tokenizer)
    adopt_deepspeed_json(cfg, info.world_size)
    cfg.validate(info.world_size)
    info, _ = init_distributed()
    device = pick_device(cfg, info.local_rank)
    torch.manual_seed(cfg.train.seed)
    topo = build_topology(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dp, cfg.parallel.sequence_parallel)
    return Runtime(cfg, info, device, topo)


def adopt_deepspeed_json(cfg: Config, world_size: int) -> None:
    """A user's DeepSpeed JSON may carry the batch sizes: fold them into cfg before it is validated."""
    if not (cfg.uses_deepspeed and cfg.parallel.deepspeed_config):
        return
    model_parallel = cfg.parallel.tp * cfg.parallel.pp
    if world_size % model_parallel == 0:             # otherwise validation names the world-size error
        from megalm.engine import resolve_deepspeed_config

        resolve_deepspeed_config(cfg, world_size // model_parallel)


def finish(rt: Runtime) -> None:
    """Leave the process group, unless someone else (a test harness, a notebook) created it."""
    if dist.is_initialized():
        dist.barrier()
        if rt.info.launcher != "preinitialized":
            dist.destroy_process_group()
