"""The training loop's side of checkpoints: what a rank owns, what goes into the manifest, and restore."""
from __future__ import annotations

from pathlib import Path

from megalm.checkpoint.load import CheckpointReader
from megalm.checkpoint.save import save_checkpoint
from megalm.config import Config
from megalm.parallel.topology import Topology


def owns(topo: Topology, spec) -> bool:
    """Data-parallel rank 0 writes; of a replicated tensor only tensor-parallel rank 0."""
    if topo.dp_rank != 0:
        return False
    sharded = spec.dim is not None and spec.parts > 1
    return sharded or topo.tp_rank == 0


def save(engine, cfg: Config, topo: Topology, step: int, consumed_samples: int, tokenizer_file) -> None:
    with_optim = cfg.checkpoint.save_optimizer
    owned = [(name, tensor, spec) for name, tensor, spec in engine.state_tensors(with_optim) if owns(topo, spec)]
    p = cfg.parallel
    meta = {
        "config": cfg.to_dict(),
        "layout": {"tp": p.tp, "pp": p.pp, "dp": topo.dp, "virtual_stages": p.virtual_stages,
                   "sequence_parallel": p.sequence_parallel, "zero_stage": p.zero_stage,
                   "engine": "deepspeed" if cfg.uses_deepspeed else "native"},
        "data": {"prefix": cfg.data.prefix, "consumed_samples": consumed_samples},
        "optimizer": {"name": cfg.optimizer.name, "step": engine.optimizer_step_count(),
                      "has_state": with_optim},
        "loss_scale": engine.loss_scale_state(),     # fp16 only; None otherwise
        "rng": {"policy": "torch.manual_seed(train.seed + step) before every step"},
    }
    save_checkpoint(cfg.train.run_dir, step, owned, meta, tokenizer_file, cfg.checkpoint.keep)
    if cfg.checkpoint.deepspeed_native:                     # collective, like DeepSpeed's save_checkpoint
        engine.save_deepspeed_checkpoint(Path(cfg.train.run_dir) / "deepspeed", tag=f"global_step{step}")


def restore(engine, reader: CheckpointReader, weights_only: bool = False) -> tuple[int, int]:
    """Load weights (and optimizer state when saved) resharded for this rank; return (step, consumed).
    ``weights_only``: a fresh start from these weights (fine-tuning): step 0, data from the beginning."""
    m = reader.manifest
    if weights_only:
        engine.load_state_tensors(reader.read, 0, False)
        return 0, 0
    engine.load_state_tensors(reader.read, m["optimizer"]["step"], m["optimizer"]["has_state"])
    engine.load_loss_scale_state(m.get("loss_scale"))
    return m["step"], m["data"]["consumed_samples"]
