"""What every ``megalm convert`` shares: a staged destination, a source verified alongside the conversion, and
``write_checkpoint``, which writes a megalm checkpoint in any layout from a tensor reader."""
from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from megalm.checkpoint.format import commit
from megalm.checkpoint.layout import ConvertError, check_target_layout, plan_layout
from megalm.checkpoint.load import CheckpointReader
from megalm.checkpoint.manifest import add_piece, add_tokenizer, layout_entry, new_manifest, piece_entry
from megalm.checkpoint.writer import PlannedSafetensorsFile, dtype_from_name
from megalm.config import Config, ModelConfig


def prepare_destination(dst: Path) -> Path:
    if dst.exists() and any(dst.iterdir()):
        raise ConvertError(f"{dst} exists and is not empty; megalm convert never overwrites: choose a new --dst")
    tmp = dst.with_name(dst.name + ".converting")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_checkpoint(dst: Path, model: ModelConfig, tensors: dict, read, meta: dict, tp=1, pp=1, vs=1,
                     tokenizer_file=None, label="convert", before_commit=None, locate=None, special=None) -> dict:
    """Write a megalm checkpoint in layout (tp, pp, vs).

    tensors: name -> (dtype, global shape) of every tensor the source holds; ``read(name, spec, local_shape)``
    returns the piece ``spec`` of tensor ``name``. Pieces are pulled file by file in file order, so every file
    is written front to back and hashed as it is written. ``before_commit()`` runs last and may raise to
    abandon the result (the source's own verification, run alongside). ``locate(name, spec)``, when given,
    returns (file, byte offset, byte count) of a piece stored contiguously in the source, which is then copied
    file to file in the kernel (or None).
    """
    check_target_layout(model, tp, pp, vs)
    plan = plan_layout(model, list(tensors), tp, pp, vs)
    for pieces in plan.values():
        for p in pieces:
            if tuple(tensors[p.name][1]) != p.global_shape:
                raise ConvertError(f"{p.name}: source shape {list(tensors[p.name][1])} but the model config needs "
                                   f"{list(p.global_shape)}; the source is another model")
    tmp = prepare_destination(dst)
    dtypes = {n: dtype_from_name(dt) for n, (dt, _) in tensors.items()}
    total = sum(torch.Size(shape).numel() * torch.empty((), dtype=dtypes[n]).element_size()
                for n, (_, shape) in tensors.items())
    start = time.perf_counter()
    with tqdm(total=total, unit="B", unit_scale=True, desc=label, leave=False) as bar:

        def write_file(f):
            out = PlannedSafetensorsFile(tmp / f, [(p.name, dtypes[p.name], p.local_shape) for p in plan[f]])
            for p in plan[f]:
                piece = read(p.name, p.spec, p.local_shape)
                out.put(p.name, piece, locate(p.name, p.spec) if locate is not None else None)
                bar.update(piece.numel() * piece.element_size())
            return out, out.close()

        # Two files at a time: fetching, copying, hashing and the kernel's writes of one file overlap the other's
        # (each step releases the GIL). Memory stays a few pieces.
        with ThreadPoolExecutor(max_workers=min(2, len(plan))) as pool:
            finished = dict(zip(plan, pool.map(write_file, plan)))
    for out, _ in finished.values():
        out.wait_durable()
    digests = {f: digest for f, (_, digest) in finished.items()}
    manifest = new_manifest(layout=layout_entry(tp, pp, 1, vs), **meta)
    manifest["files"] = digests
    for f, pieces in plan.items():
        for p in pieces:
            piece = piece_entry(p.spec, p.local_shape, f, p.name)
            add_piece(manifest, p.name, p.global_shape, tensors[p.name][0], piece)
    add_tokenizer(tmp, manifest, tokenizer_file, special)
    if before_commit is not None:
        before_commit()
    commit(tmp, dst, manifest)
    seconds = time.perf_counter() - start
    print(f"{label}: wrote {total / 1e9:.3f} GB in {len(plan)} files to {dst} in {seconds:.2f}s "
          f"({total / 1e9 / max(seconds, 1e-9):.2f} GB/s)", flush=True)
    return {"bytes": total, "seconds": seconds}


def base_meta(cfg: Config, step: int = 0, consumed: int = 0, has_optimizer_state: bool = False,
              optimizer_step: int = 0) -> dict:
    """``new_manifest``'s arguments (all but the layout) for a converted checkpoint of ``cfg``'s model."""
    return {"step": step, "config": cfg.to_dict(), "data_prefix": cfg.data.prefix, "consumed_samples": consumed,
            "optimizer_name": cfg.optimizer.name, "optimizer_step": optimizer_step,
            "has_optimizer_state": has_optimizer_state}


def reader_verified_alongside(folder):
    """Open a source checkpoint at once and check its files' sha256 in a background thread (hashlib releases
    the GIL), so verification overlaps the conversion; the caller waits on the future before committing."""
    reader = CheckpointReader(folder, verify=False)
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(reader.verify_all)
    pool.shutdown(wait=False)
    return reader, future
