"""Save: every rank writes the pieces it owns into one safetensors file; rank 0 commits.

Ownership: data-parallel rank 0 writes; of replicated tensors, tensor-parallel rank 0 only; of a tied embedding,
the first stage only. The save goes to ``step_N.tmp`` and is renamed into place after every rank has written
and rank 0 has written the manifest; ``COMMITTED`` and the ``latest`` pointer come last, so a crash at any
moment leaves the previous checkpoint intact.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import save_file

from megalm.checkpoint.format import (
    COMMITTED,
    FORMAT,
    VERSION,
    add_tokenizer,
    add_written,
    checkpoints_root,
    commit,
    fsync_path,
    piece_entry,
    sha256_file,
    step_dir_name,
)


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _gather_objects(obj):
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def write_pieces(folder: Path, rank: int, owned) -> dict:
    """Write this rank's owned (name, local tensor, ShardSpec) triples; return their manifest entries."""
    tensors, entries = {}, {}
    file_name = f"shard-{rank:05d}.safetensors"
    for name, tensor, spec in owned:
        local = tuple(tensor.shape)
        tensors[name] = tensor.detach().to("cpu").contiguous()
        entries[name] = {"shape": list(spec.global_shape(local)), "dtype": str(tensor.dtype).replace("torch.", ""),
                         "piece": piece_entry(spec, local, file_name, name)}
    if tensors:
        save_file(tensors, str(folder / file_name))
        fsync_path(folder / file_name)             # on disk before the commit renames the folder
    return {"file": file_name if tensors else None, "entries": entries,
            "sha256": sha256_file(folder / file_name) if tensors else None}


def save_checkpoint(run_dir, step: int, owned, meta: dict, tokenizer_file=None, keep: int = 2) -> Path:
    """Collective: every rank calls it with the tensors it owns. ``meta`` goes into the manifest as is."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    root = checkpoints_root(run_dir)
    final = root / step_dir_name(step)
    tmp = root / (step_dir_name(step) + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    start = time.perf_counter()
    written = write_pieces(tmp, rank, owned)
    reports = _gather_objects(written)
    if rank == 0:
        manifest = {"format": FORMAT, "version": VERSION, "step": step, **meta, "tensors": {}, "files": {}}
        for report in reports:
            add_written(manifest, report)
        add_tokenizer(tmp, manifest, tokenizer_file)
        commit(tmp, final, manifest, latest_root=root)
        _prune(root, keep)
        print(f"checkpoint: step {step} saved to {final} in {time.perf_counter() - start:.1f}s", flush=True)
    _barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    committed = sorted(p for p in root.glob("step_*") if (p / COMMITTED).exists() and not p.name.endswith(".tmp"))
    for old in committed[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
