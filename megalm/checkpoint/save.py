"""Save: every rank writes the pieces it owns into one safetensors file; rank 0 commits.

Ownership (``megalm.parallel.shard.writes_piece``): data-parallel rank 0 writes; of replicated tensors,
tensor-parallel rank 0 only; of a tied embedding, the first stage only. The save goes to ``step_N.tmp`` and is
renamed into place after every rank has written and rank 0 has written the manifest; ``COMMITTED`` and the
``latest`` pointer come last, so a crash at any moment leaves the previous checkpoint intact. Each file is
hashed while it is written (``PlannedSafetensorsFile``), never read back.

Phases: ``begin_save`` (collective: the folder), ``write_shard`` (this rank's file, no collective, so it can run
on a thread: ``AsyncSave``), ``finish_save`` (collective: gather, commit, agree). ``save_checkpoint`` runs the
three in a row.
"""
from __future__ import annotations

import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megalm.checkpoint.format import COMMITTED, CheckpointError, checkpoints_root, commit, step_dir_name
from megalm.checkpoint.manifest import add_tokenizer, add_written, piece_entry
from megalm.checkpoint.writer import PlannedSafetensorsFile


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _gather_to_rank0(obj) -> list | None:
    """Every rank's ``obj`` on rank 0 (None elsewhere): no rank but the committer holds the world's reports."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if _rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def _from_rank0(value):
    """Rank 0's ``value`` on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _failure(step: int, path: Path, error: OSError, needed: int) -> str:
    """One line naming the rank, host, path, the reason and the space it needed."""
    try:
        free = f"{shutil.disk_usage(path.parent if not path.exists() else path).free / 1e9:.2f} GB free"
    except OSError:
        free = "free space unknown"
    return (f"could not save the checkpoint of step {step} (rank {_rank()} on {socket.gethostname()}): {path}: "
            f"{error.strerror or error} ({needed / 1e9:.3f} GB to write there, {free}); the previous checkpoint "
            f"stays the latest")


def write_pieces(folder: Path, index: int, owned, strike=None) -> dict:
    """Write (name, local tensor, ShardSpec) triples into ``shard-{index:05d}.safetensors``; return the file's
    sha256 and the manifest entries of its pieces. ``strike(point, piece)``: fault injection."""
    strike = strike or (lambda point, piece=None, path=None: None)
    file_name = f"shard-{index:05d}.safetensors"
    owned = [(name, tensor.detach(), spec) for name, tensor, spec in owned]
    entries = {name: {"shape": list(spec.global_shape(tuple(t.shape))), "dtype": str(t.dtype).replace("torch.", ""),
                      "piece": piece_entry(spec, tuple(t.shape), file_name, name)} for name, t, spec in owned}
    if not owned:
        return {"file": None, "entries": entries, "sha256": None}
    out = PlannedSafetensorsFile(folder / file_name, [(name, t.dtype, tuple(t.shape)) for name, t, _ in owned])
    for piece, (name, tensor, _) in enumerate(owned):
        strike("save_piece", piece)
        out.write(name, tensor)
    digest = out.close()
    strike("save_hashed")
    out.wait_durable()                                 # on disk before the commit renames the folder
    strike("save_durable", path=folder / file_name)
    return {"file": file_name, "entries": entries, "sha256": digest}


@dataclass
class SaveJob:
    """One save in progress: where it goes and what this rank owns (``begin_save`` .. ``finish_save``)."""
    step: int
    root: Path
    tmp: Path
    final: Path
    owned: list
    needed: int
    strike: object
    started: float


def begin_save(run_dir, step: int, owned, strike=None) -> SaveJob:
    """Collective: rank 0 prepares ``step_N.tmp`` and every rank learns whether it could (CheckpointError if not)."""
    strike = strike or (lambda point, piece=None, path=None: None)
    root = checkpoints_root(run_dir)
    final, tmp = root / step_dir_name(step), root / (step_dir_name(step) + ".tmp")
    owned = list(owned)
    needed = sum(t.numel() * t.element_size() for _, t, _ in owned)
    status = None
    if _rank() == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as e:
            status = _failure(step, tmp, e, needed)
    status = _from_rank0(status)
    if status:
        raise CheckpointError(status)
    strike("save_begin")
    return SaveJob(step, root, tmp, final, owned, needed, strike, time.perf_counter())


def write_shard(job: SaveJob) -> dict:
    """This rank's shard of the save (no collective: it may run on a thread); a failure is returned as
    ``{"error": line}``, for ``finish_save`` to agree on."""
    rank = _rank()
    bad = next((name for name, t, _ in job.owned if t.is_floating_point() and not bool(torch.isfinite(t).all())),
               None)
    if bad is not None:       # never commit a checkpoint holding NaN or inf
        return {"error": f"refusing to save the checkpoint of step {job.step}: {bad} holds NaN or inf on rank "
                         f"{rank} ({socket.gethostname()}); the previous checkpoint stays the latest"}
    try:
        return write_pieces(job.tmp, rank, job.owned, job.strike)
    except OSError as e:
        return {"error": _failure(job.step, job.tmp / f"shard-{rank:05d}.safetensors", e, job.needed)}


def finish_save(job: SaveJob, written: dict, manifest: dict, tokenizer_file=None, keep: int = 2,
                note: str = "") -> Path:
    """Collective: rank 0 gathers every rank's report and commits (or abandons the save everywhere with the same
    CheckpointError; the previous checkpoint stays the latest)."""
    if job.strike("save_gather"):       # fault injection: this rank drops the commit's collectives, as a bug would
        return job.final
    reports = _gather_to_rank0(written)
    status = None
    if _rank() == 0:
        status = next((r["error"] for r in reports if "error" in r), None)
        if status is None:
            try:
                for report in reports:
                    add_written(manifest, report)
                add_tokenizer(job.tmp, manifest, tokenizer_file)
                job.strike("save_manifest")
                commit(job.tmp, job.final, manifest, latest_root=job.root, strike=job.strike)
                job.strike("save_prune")
                _prune(job.root, keep)
                print(f"checkpoint: step {job.step} saved to {job.final} in {time.perf_counter() - job.started:.1f}s"
                      f"{note}", flush=True)
            except OSError as e:
                status = _failure(job.step, job.tmp, e, job.needed)
        if status:
            shutil.rmtree(job.tmp, ignore_errors=True)
    status = _from_rank0(status)
    if status:
        raise CheckpointError(status)
    return job.final


def save_checkpoint(run_dir, step: int, owned, manifest: dict, tokenizer_file=None, keep: int = 2,
                    strike=None) -> Path:
    """Collective: every rank calls it with the tensors it owns; rank 0's ``manifest`` (``new_manifest``) is
    completed with every rank's pieces and committed. A write that fails on any rank (disk full, no permission)
    abandons the save on every rank with the same ``CheckpointError``; the previous checkpoint stays the latest.
    ``strike(point, piece=None)``: fault injection at the named points of the save (``megalm.runtime.faults``)."""
    job = begin_save(run_dir, step, owned, strike)
    return finish_save(job, write_shard(job), manifest, tokenizer_file, keep)


class SnapshotBuffers:
    """Host buffers an asynchronous save copies into, kept from one save to the next (at most one save is in
    flight, so the next snapshot only starts once the previous save's writer is done with them). A CUDA tensor
    goes into page-locked memory with a non-blocking copy, all copies then awaited at once, as PyTorch DCP's
    async save does; a CPU tensor into a plain buffer. ``reused`` counts the copies that found their buffer."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}
        self.reused = 0

    def snapshot(self, owned) -> list:
        out, cuda = [], False
        for name, t, spec in owned:
            t = t.detach()
            buf = self._buffers.get(name)
            if buf is not None and buf.shape == t.shape and buf.dtype == t.dtype:
                self.reused += 1
            else:
                buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
                self._buffers[name] = buf
            buf.copy_(t, non_blocking=t.is_cuda)
            cuda = cuda or t.is_cuda
            out.append((name, buf, spec))
        if cuda:
            torch.cuda.synchronize()
        return out

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


class AsyncSave:
    """A save whose writing runs on a thread: the step is blocked only for the snapshot (a copy of what this rank
    owns, into host memory: ``buffers``, reused between saves) and ``begin_save``; ``finish`` (collective) waits
    for the thread and commits, with the same protocol and the same files as a synchronous save."""

    def __init__(self, run_dir, step: int, owned, manifest: dict, tokenizer_file=None, keep: int = 2,
                 strike=None, buffers: SnapshotBuffers | None = None):
        start = time.perf_counter()
        snapshot = (buffers or SnapshotBuffers()).snapshot(owned)
        self.job = begin_save(run_dir, step, snapshot, strike)
        self.manifest, self.tokenizer_file, self.keep = manifest, tokenizer_file, keep
        self.result: dict = {}
        self.thread = threading.Thread(target=lambda: self.result.update(written=write_shard(self.job)),
                                       name=f"megalm-save-{step}", daemon=True)
        self.thread.start()
        self.blocked_s = time.perf_counter() - start

    def done(self) -> bool:
        return not self.thread.is_alive()

    def finish(self) -> Path:
        waited = time.perf_counter()
        self.thread.join()
        waited = self.waited_s = time.perf_counter() - waited
        note = f" (in the background; the step was blocked {self.blocked_s:.3f}s"
        note += f", and the next one waited {waited:.1f}s for it)" if waited > 0.05 else ")"
        return finish_save(self.job, self.result["written"], self.manifest, self.tokenizer_file, self.keep, note)


def _prune(root: Path, keep: int) -> None:
    committed = sorted(p for p in root.glob("step_*") if (p / COMMITTED).exists() and not p.name.endswith(".tmp"))
    for old in committed[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
