"""Build a model from a checkpoint in whatever layout this launch has, for eval, generate and convert --verify."""
from __future__ import annotations

from pathlib import Path

import torch

from megalm.checkpoint.format import CheckpointError, latest_checkpoint
from megalm.checkpoint.load import CheckpointReader
from megalm.config import Config
from megalm.data.tokenizer import load_tokenizer
from megalm.parallel.parallelize import build_chunks
from megalm.runtime import Runtime, start
from megalm.train.native import autocast_for


class ForwardEngine:
    """The forward half of an engine (no optimizer): enough for evaluation and generation."""

    def __init__(self, chunks, precision: str, device: torch.device):
        self.chunks, self.precision, self.device = chunks, precision, device

    def forward(self, chunk: int, x, targets=None, **kwargs):
        with autocast_for(self.precision, self.device):
            return self.chunks[chunk](x, targets, **kwargs)


def checkpoint_config(path, overrides: list[str] | None = None) -> tuple[Config, CheckpointReader]:
    """The saved run's config with the model fixed and the layout taken from ``overrides`` (default 1 x 1)."""
    folder = latest_checkpoint(path)
    if folder is None:
        raise CheckpointError(f"no committed checkpoint under {path}; train first or pass a checkpoint folder")
    reader = CheckpointReader(folder)
    saved = reader.manifest["config"]
    cfg = Config.from_dict({"model": saved["model"], "data": saved["data"], "train": saved["train"],
                            "kernels": saved.get("kernels", {})})
    cfg.parallel.engine = "native"
    cfg.train.precision = "fp32" if saved["train"]["precision"] == "fp16" else saved["train"]["precision"]
    for item in overrides or []:
        key, _, value = item.partition("=")
        cfg.set(key.strip(), value)
    return cfg, reader


def load_model(cfg: Config, reader: CheckpointReader) -> tuple[Runtime, ForwardEngine]:
    rt = start(cfg)
    chunks = build_chunks(cfg, rt.topo, rt.device, init=False)
    with torch.no_grad():
        for chunk in chunks:
            for name, p in chunk.named_parameters():
                p.copy_(reader.read(f"model.{name}", p.shard, tuple(p.shape)))
            chunk.eval()
    return rt, ForwardEngine(chunks, cfg.train.precision, rt.device)


def checkpoint_tokenizer(reader: CheckpointReader):
    path = Path(reader.folder) / "tokenizer.json"
    return load_tokenizer(str(path)) if path.exists() else None
