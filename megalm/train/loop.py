"""``megalm train``: the loop. Config -> topology -> model chunks -> engine -> schedule per step -> metrics,
evaluation and checkpoints. Rerunning on the same run directory resumes exactly where it stopped."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from megalm.checkpoint.format import latest_checkpoint
from megalm.checkpoint.load import CheckpointReader
from megalm.config import Config, ConfigError
from megalm.data.dataset import BatchSampler, TokenDataset, eval_batches
from megalm.data.tokenizer import tokenizer_path
from megalm.parallel.parallelize import build_chunks
from megalm.parallel.pipeline.p2p import P2P, activation_shape
from megalm.runtime import Runtime, dataset_tokenizer, finish, start
from megalm.train.checkpointing import restore, save
from megalm.train.metrics import MetricsLogger, plot_loss_curve
from megalm.train.optim import lr_at
from megalm.train.step import evaluate, train_step


def make_engine(cfg: Config, rt: Runtime, chunks):
    if cfg.uses_deepspeed:
        from megalm.engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, rt.topo, chunks, rt.device)
    from megalm.train.native import NativeEngine

    return NativeEngine(cfg, rt.topo, chunks, rt.device)


def adopt_checkpoint_model(cfg: Config, reader: CheckpointReader | None, starting_from_load: bool) -> None:
    """A resumed run keeps the model it was saved with; a different explicit model config is an error.
    A run started from ``checkpoint.load`` (fine-tuning) takes the checkpoint's model settings wholesale."""
    if reader is None:
        return
    saved = reader.manifest["config"]["model"]
    if starting_from_load:
        for key, value in saved.items():
            if key != "dropout":
                setattr(cfg.model, key, value)
        return
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = saved["vocab_size"]
    current = cfg.to_dict()["model"]
    diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v and k != "dropout"}
    if diff:
        detail = ", ".join(f"model.{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(f"{reader.folder} holds another model ({detail}); use a new train.run_dir or the "
                          f"checkpoint's model settings")


def message_shape(cfg: Config, rt: Runtime):
    return activation_shape(cfg.train.micro_batch_size, cfg.data.seq_len, cfg.model.hidden_size, rt.topo)


def activation_dtype(cfg: Config) -> torch.dtype:
    # The native engine keeps fp32 weights under autocast, so the residual stream between stages is fp32;
    # DeepSpeed's bf16/fp16 modes hold the model itself in low precision.
    if cfg.uses_deepspeed and cfg.train.precision != "fp32":
        return torch.bfloat16 if cfg.train.precision == "bf16" else torch.float16
    return torch.float32


def train(cfg: Config) -> dict:
    """Train to ``train.steps``; returns the final metrics (on every rank)."""
    source = latest_checkpoint(cfg.train.run_dir)                 # resuming this run comes first
    from_load = source is None and cfg.checkpoint.load is not None
    if from_load:
        source = latest_checkpoint(cfg.checkpoint.load)
        if source is None:
            raise ConfigError(f"checkpoint.load={cfg.checkpoint.load}: no committed megalm checkpoint there")
    reader = CheckpointReader(source) if source else None
    adopt_checkpoint_model(cfg, reader, from_load)
    rt = start(cfg, dataset_tokenizer(cfg))
    topo, t = rt.topo, cfg.train
    if cfg.uses_deepspeed:     # ZeRO-3 builds the layers already partitioned over data parallelism
        from megalm.engine import build_deepspeed_chunks

        chunks = build_deepspeed_chunks(cfg, topo, rt.device, init=reader is None)
    else:
        chunks = build_chunks(cfg, topo, rt.device, init=reader is None)
    engine = make_engine(cfg, rt, chunks)
    comm = count_tensor_parallel_traffic(chunks)
    weights_only = from_load and cfg.checkpoint.load_weights_only
    step, consumed = restore(engine, reader, weights_only) if reader else (0, 0)
    first_step = step
    data = {split: TokenDataset(cfg.data.prefix, split, cfg.data.seq_len, cfg.data.seed, cfg.model.vocab_size,
                                tuple(cfg.data.split)) for split in ("train", "valid", "test")}
    sampler = BatchSampler(data["train"], t.global_batch_size, t.micro_batch_size, topo.dp_rank, topo.dp, consumed)
    p2p = P2P(topo, message_shape(cfg, rt), activation_dtype(cfg), rt.device, num_chunks=len(chunks))
    log = MetricsLogger(t.run_dir, rt.is_logging_rank, cfg.logging.tensorboard, t.steps)
    if rt.is_logging_rank:
        _announce(cfg, rt, chunks, step, source)
        Path(t.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(t.run_dir) / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

    def run_eval(split: str) -> float:
        share = max(1, t.eval_samples // (t.micro_batch_size * topo.dp)) * t.micro_batch_size
        batches = eval_batches(data[split], t.micro_batch_size, share * topo.dp)
        mine = [b for i, b in enumerate(batches) if i % topo.dp == topo.dp_rank]
        loss = evaluate(engine, p2p, [b.to(rt.device) for b in mine], topo)
        log.evaluation(step, split, loss)
        return loss

    tokens_per_step = t.global_batch_size * cfg.data.seq_len
    result = {"step": step}
    last = min(t.steps, t.stop_at_step or t.steps)
    while step < last:
        torch.manual_seed(t.seed + step)     # dropout masks depend on (seed, step) only: exact resume
        begin = time.perf_counter()
        micro = [b.to(rt.device) for b in sampler.next_batch()]
        lr = lr_at(step, cfg)
        if comm is not None:
            comm.reset()
        loss, norm = train_step(engine, p2p, cfg.schedule, micro, topo, lr, step + 1)
        step += 1
        log.train_step(step, loss, lr, norm, tokens_per_step / (time.perf_counter() - begin),
                       print_line=step % t.log_interval == 0 or step == t.steps or step == 1 or math.isinf(norm),
                       loss_scale=engine.loss_scale, comm=comm)
        result.update(step=step, loss=loss)
        if t.eval_interval and step % t.eval_interval == 0 and step < t.steps:   # the last is evaluated below
            result["val_loss"] = run_eval("valid")
        if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0 and step < last:
            save(engine, cfg, topo, step, sampler.consumed_samples, tokenizer_path(cfg.data.prefix))
    if step < t.steps:        # stopped early on purpose: checkpoint and leave, the next run resumes here
        save(engine, cfg, topo, step, sampler.consumed_samples, tokenizer_path(cfg.data.prefix))
        log.close()
        finish(rt)
        return result
    result["val_loss"] = run_eval("valid")
    result["test_loss"] = run_eval("test")
    if step > first_step or source is None:                  # a finished run, rerun, only evaluates
        save(engine, cfg, topo, step, sampler.consumed_samples, tokenizer_path(cfg.data.prefix))
    if rt.is_logging_rank and cfg.logging.plot:
        print(f"loss curve: {plot_loss_curve(t.run_dir)}")
    log.close()
    finish(rt)
    return result


def count_tensor_parallel_traffic(chunks):
    """At tp > 1, one CommStats shared by every chunk's tensor-parallel handle (None at tp = 1): each step's
    elements sent go into metrics.jsonl beside the loss."""
    if chunks[0].tp.size == 1:
        return None
    from megalm.parallel.tensor import CommStats

    stats = CommStats()
    for chunk in chunks:
        chunk.tp.comm = stats
    return stats


def _announce(cfg: Config, rt: Runtime, chunks, step: int, source) -> None:
    params = sum(p.numel() for c in chunks for p in c.parameters())
    p = cfg.parallel
    print(f"megalm train: world {rt.topo.world_size} = tp {p.tp} x pp {p.pp} x dp {rt.topo.dp}"
          f"{' (sequence parallel)' if p.sequence_parallel else ''}, schedule {cfg.schedule}, "
          f"engine {'deepspeed zero-' + str(p.zero_stage) if cfg.uses_deepspeed else 'native'}, "
          f"{cfg.train.precision}, device {rt.device}", flush=True)
    print(f"model: {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, vocab {cfg.model.vocab_size}; "
          f"{params / 1e6:.2f}M parameters on rank 0", flush=True)
    print("kernels: " + ", ".join(f"{op} {impl}" for op, impl in chunks[0].ops.impls.items()), flush=True)
    if source:
        print(f"resuming from {source} at step {step}", flush=True)
