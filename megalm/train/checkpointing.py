"""The training loop's side of checkpoints: what a rank owns, what goes into the manifest, and restore."""
from __future__ import annotations

import hashlib
from pathlib import Path

from megalm.checkpoint.format import MANIFEST, CheckpointError
from megalm.checkpoint.load import CheckpointReader, newest_intact
from megalm.checkpoint.manifest import layout_entry, new_manifest
from megalm.checkpoint.save import AsyncSave, SnapshotBuffers, save_checkpoint
from megalm.config import Config, ConfigError
from megalm.model.lora import is_adapter
from megalm.model.transformer import master_init
from megalm.parallel.shard import writes_piece
from megalm.parallel.topology import Topology
from megalm.runtime import faults


def save(engine, cfg: Config, topo: Topology, step: int, consumed_samples: int, tokenizer_file,
         blend_state: list | None = None, asynchronous: bool = False, lora_base: Path | None = None,
         buffers: SnapshotBuffers | None = None) -> AsyncSave | None:
    """``blend_state``: with data.blend, each source's prefix, weight and samples consumed (checked at resume).
    ``asynchronous``: returns the save in flight (finish it, collectively, with ``.finish()``). ``lora_base``: a
    LoRA run's base checkpoint: the save holds the adapters (and their optimizer state) alone and names it.
    ``buffers``: the host buffers an asynchronous save snapshots into, kept by the caller from save to save."""
    with_optim = cfg.checkpoint.save_optimizer
    owned = [(name, tensor, spec) for name, tensor, spec in engine.state_tensors(with_optim, trainable_only=bool(
             lora_base)) if writes_piece(spec, topo.tp_rank, topo.dp_rank)]
    p = cfg.parallel
    layout = layout_entry(p.tp, p.pp, topo.dp, p.virtual_stages, p.sequence_parallel, p.zero_stage,
                          "deepspeed" if cfg.uses_deepspeed else "native")
    manifest = new_manifest(step, cfg.to_dict(), layout, cfg.data.prefix, consumed_samples, cfg.optimizer.name,
                            engine.optimizer_step_count(), with_optim, engine.loss_scale_state())
    if blend_state is not None:
        manifest["data"]["blend"] = blend_state
    if lora_base is not None:
        manifest["lora_base"] = {"folder": str(Path(lora_base).resolve()), "manifest_sha256": hashlib.sha256(
            (Path(lora_base) / MANIFEST).read_bytes()).hexdigest()}
    rank = topo.rank
    strike = lambda point, piece=None, path=None: faults.strike(point, rank, step, piece, path)     # noqa: E731
    if asynchronous:
        return AsyncSave(cfg.train.run_dir, step, owned, manifest, tokenizer_file, cfg.checkpoint.keep, strike,
                         buffers)
    save_checkpoint(cfg.train.run_dir, step, owned, manifest, tokenizer_file, cfg.checkpoint.keep, strike=strike)
    if cfg.checkpoint.deepspeed_native:                     # collective, like DeepSpeed's save_checkpoint
        engine.save_native_checkpoint(Path(cfg.train.run_dir) / "deepspeed", tag=f"global_step{step}")
    return None


def lora_base_of(cfg: Config, reader: CheckpointReader | None) -> Path | None:
    """A LoRA run's base checkpoint: the one it started from, or (resuming) the one its adapters name; None when
    lora.rank is 0. Refuses a LoRA run with no base, and a start from adapters (merge them first)."""
    if not cfg.lora.rank:
        return None
    if reader is None:
        raise ConfigError("lora.rank > 0 trains adapters on a base model, but this run starts from none: give the "
                          "base with megalm finetune --checkpoint (or checkpoint.load)")
    if reader.base is not None:
        return reader.base.folder
    if reader.manifest["config"].get("lora", {}).get("rank"):
        raise ConfigError(f"{reader.folder} was saved by a LoRA run but names no base checkpoint, so its adapters "
                          f"cannot be told from their base: start from the base checkpoint itself")
    return reader.folder


def adapters_initialised(reader: CheckpointReader, cfg: Config):
    """``reader.read``, with the adapters the checkpoint does not hold given their initial values (A seeded by
    name, B zero): a LoRA run's start from its base's weights (or from earlier adapters, kept)."""
    def read_or_init(name, spec=None, local_shape=None, optional=False):
        if name.startswith("model.") and is_adapter(name) and not reader.has(name):
            return spec.take(master_init(name[len("model."):], spec.global_shape(local_shape), cfg.model,
                                         cfg.train.seed))
        return reader.read(name, spec, local_shape, optional)
    return read_or_init


def restore(engine, reader: CheckpointReader, weights_only: bool = False, say=print
            ) -> tuple[int, int, dict, CheckpointReader]:
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
        read = adapters_initialised(reader, engine.cfg) if engine.cfg.lora.rank else reader.read
        engine.load_state_tensors(read, 0, False)
        return 0, 0, {}, reader
    engine.load_state_tensors(reader.read, m["optimizer"]["step"], m["optimizer"]["has_state"])
    engine.load_loss_scale_state(m.get("loss_scale"))
    return m["step"], m["data"]["consumed_samples"], m["data"], reader
