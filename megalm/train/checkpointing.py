"""The training loop's side of checkpoints: what a rank owns, what goes into the manifest, and restore."""
from __future__ import annotations

from pathlib import Path

from megalm.checkpoint.format import CheckpointError
from megalm.checkpoint.load import CheckpointReader, newest_intact
from megalm.checkpoint.manifest import layout_entry, new_manifest
from megalm.checkpoint.save import AsyncSave, save_checkpoint
from megalm.config import Config
from megalm.parallel.shard import writes_piece
from megalm.parallel.topology import Topology
from megalm.runtime import faults


def save(engine, cfg: Config, topo: Topology, step: int, consumed_samples: int, tokenizer_file,
         blend_state: list | None = None, asynchronous: bool = False) -> AsyncSave | None:
    """``blend_state``: with data.blend, each source's prefix, weight and samples consumed (checked at resume).
    ``asynchronous``: returns the save in flight (finish it, collectively, with ``.finish()``)."""
    with_optim = cfg.checkpoint.save_optimizer
    owned = [(name, tensor, spec) for name, tensor, spec in engine.state_tensors(with_optim)
             if writes_piece(spec, topo.tp_rank, topo.dp_rank)]
    p = cfg.parallel
    layout = layout_entry(p.tp, p.pp, topo.dp, p.virtual_stages, p.sequence_parallel, p.zero_stage,
                          "deepspeed" if cfg.uses_deepspeed else "native")
    manifest = new_manifest(step, cfg.to_dict(), layout, cfg.data.prefix, consumed_samples, cfg.optimizer.name,
                            engine.optimizer_step_count(), with_optim, engine.loss_scale_state())
    if blend_state is not None:
        manifest["data"]["blend"] = blend_state
    rank = topo.rank
    strike = lambda point, piece=None, path=None: faults.strike(point, rank, step, piece, path)     # noqa: E731
    if asynchronous:
        return AsyncSave(cfg.train.run_dir, step, owned, manifest, tokenizer_file, cfg.checkpoint.keep, strike)
    save_checkpoint(cfg.train.run_dir, step, owned, manifest, tokenizer_file, cfg.checkpoint.keep, strike=strike)
    if cfg.checkpoint.deepspeed_native:                     # collective, like DeepSpeed's save_checkpoint
        engine.save_native_checkpoint(Path(cfg.train.run_dir) / "deepspeed", tag=f"global_step{step}")
    return None


def restore(engine, reader: CheckpointReader, weights_only: bool = False, say=print) -> tuple[int, int, dict]:
    """Verify the checkpoint (the ranks split its files and agree; a damaged one gives way to the newest older one
    that verifies, named), then load weights (and optimizer state when saved) resharded for this rank; return
    (step, consumed, the manifest's data record). ``weights_only``: a fresh start from these weights
    (fine-tuning): step 0, data from the beginning."""
    chosen = newest_intact(reader, say)
    if chosen is not reader:
        if chosen.manifest["config"]["model"] != reader.manifest["config"]["model"]:
            raise CheckpointError(f"{chosen.folder} holds another model than {reader.folder}; it cannot replace it")
        say(f"resuming from {chosen.folder} at step {chosen.manifest['step']} instead")
    reader = chosen
    m = reader.manifest
    if weights_only:
        engine.load_state_tensors(reader.read, 0, False)
        return 0, 0, {}
    engine.load_state_tensors(reader.read, m["optimizer"]["step"], m["optimizer"]["has_state"])
    engine.load_loss_scale_state(m.get("loss_scale"))
    return m["step"], m["data"]["consumed_samples"], m["data"]
