"""Build a model from a checkpoint in whatever layout this launch has, for eval, generate and convert --verify."""
from __future__ import annotations

import sys

import torch

from megalm.checkpoint.format import CheckpointError, latest_checkpoint
from megalm.checkpoint.load import CheckpointReader, newest_intact, open_readable
from megalm.config import Config, resolve
from megalm.engine import ForwardEngine
from megalm.parallel.parallelize import build_chunks
from megalm.runtime import Runtime, discover, start


def checkpoint_config(path, overrides: list[str] | None = None) -> tuple[Config, CheckpointReader]:
    """The saved run's config with the model fixed and the layout taken from ``overrides`` (default 1 x 1); the
    native engine runs it (in fp32 where the run used fp16, which needs loss scaling only to train)."""
    notes: list = []
    folder = latest_checkpoint(path, notes)
    for note in notes if discover().rank == 0 else ():
        print(f"checkpoint: {note}", file=sys.stderr, flush=True)
    if folder is None:
        raise CheckpointError(f"no committed checkpoint under {path}; train first or pass a checkpoint folder")
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if discover().rank == 0 else (lambda line: None)
    reader = open_readable(folder, say)                # load_model verifies what each rank reads
    saved = reader.manifest["config"]
    train = {**saved["train"], "precision": "fp32" if saved["train"]["precision"] == "fp16"
             else saved["train"]["precision"]}
    cfg = Config.from_dict({"model": saved["model"], "data": saved["data"], "train": train,
                            "kernels": saved.get("kernels", {}), "lora": saved.get("lora", {}),
                            "parallel": {"engine": "native"}}, explicit=False)
    for item in overrides or []:
        key, _, value = item.partition("=")
        cfg.set(key.strip(), value)
    return cfg, reader


def load_model(cfg: Config, reader: CheckpointReader) -> tuple[Runtime, Config, ForwardEngine]:
    """Resolve ``cfg`` for this launch, join the group and fill this rank's chunks from the checkpoint."""
    info = discover()
    cfg = resolve(cfg, info.world_size)
    rt = start(cfg, info)
    chunks = build_chunks(cfg, rt.topo, rt.device, init=False)
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if rt.is_logging_rank else (lambda line: None)
    reader = newest_intact(reader, say)
    say(f"loaded {reader.folder} (step {reader.manifest['step']})")
    with torch.no_grad():
        for chunk in chunks:
            for name, p in chunk.named_parameters():
                p.copy_(reader.read(f"model.{name}", p.shard, tuple(p.shape)))
            chunk.eval()
    return rt, cfg, ForwardEngine(chunks, cfg.train.precision, rt.device)


def checkpoint_tokenizer(reader: CheckpointReader):
    """The checkpoint's tokenizer (checked against its sha256 first), or None when it carries none."""
    return reader.tokenizer()
