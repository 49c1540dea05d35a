"""megalm's layout-free checkpoint format.

A checkpoint is a folder ``RUN_DIR/checkpoints/step_NNNNNNN/``:

    manifest.json        format, version, step, model/run config, layout it was saved from, data position,
                         RNG state, and for every tensor its global shape, dtype and the pieces that hold it
    shard-RRRRR.safetensors   the pieces rank RRRRR owned (every rank writes its own, in parallel)
    tokenizer.json       the tokenizer the model was trained with (when known)
    COMMITTED            written last; a folder without it is an unfinished save and is never loaded

A piece is a slice of a global tensor along one dimension (``dim``/``offset``), or the whole tensor, so any
layout can read what any other wrote. ``RUN_DIR/checkpoints/latest`` names the newest committed folder and is
replaced atomically.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

FORMAT, VERSION = "megalm-checkpoint", 1
MANIFEST, COMMITTED, LATEST = "manifest.json", "COMMITTED", "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file or the numbers."""


@dataclass(frozen=True)
class Piece:
    file: str            # file name inside the checkpoint folder
    key: str             # key inside the safetensors file
    dim: int | None      # sharded dimension of the global tensor, None for a whole tensor
    offset: int          # start of this piece along dim
    length: int          # its extent along dim


def sha256_file(path: Path, window: int = 1 << 26) -> str:
    """Hashed straight from the page cache through read-only mappings of ``window`` bytes at a time: no copy
    into a buffer, and no more than one window resident in this process whatever the file's size."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for start in range(0, size, window):
            with mmap.mmap(f.fileno(), min(window, size - start), offset=start, access=mmap.ACCESS_READ) as m:
                h.update(m)
    return h.hexdigest()


def sha256_files(paths) -> list[str]:
    """sha256 of several files at once: hashlib releases the GIL, so threads hash on every core."""
    paths = list(paths)
    with ThreadPoolExecutor(max_workers=max(1, min(len(paths), os.cpu_count() or 1))) as pool:
        return list(pool.map(sha256_file, paths))


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def checkpoints_root(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def fsync_path(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def commit(tmp: Path, final: Path, manifest: dict, latest_root: Path | None = None, strike=None) -> Path:
    """Finish a checkpoint written aside in ``tmp``: manifest, rename into place, then (when given) the ``latest``
    pointer of ``latest_root``, then COMMITTED. Each step is atomic, so a crash leaves either the previous state
    or a folder that is not loaded (no COMMITTED; a pointer naming it gives way to the newest committed one), and
    the newest committed checkpoint is always the one the pointer names. ``strike(point)``: fault injection."""
    strike = strike or (lambda point: None)
    text = json.dumps(manifest, indent=1)
    write_text_atomic(tmp / MANIFEST, text)
    fsync_path(tmp)               # the shards' and the manifest's directory entries
    strike("save_rename")
    if final.exists():            # a leftover of the same step, committed or not (callers refuse the rest)
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_path(final.parent)      # the rename itself survives a power loss
    strike("save_pointer")
    if latest_root is not None:
        write_text_atomic(latest_root / LATEST, final.name + "\n")
    strike("save_marker")
    # The marker carries the manifest's sha256: a flipped byte in the manifest (which lists every other file's
    # sha256) is caught too.
    digest = hashlib.sha256(text.encode()).hexdigest()
    write_text_atomic(final / COMMITTED, f"{time.time():.0f}\nmanifest-sha256 {digest}\n")
    return final


def committed_checkpoints(path) -> list[Path]:
    """The committed step folders of a run dir or a checkpoints folder, newest first ([the folder] for a committed
    step folder itself)."""
    path = Path(path)
    if (path / MANIFEST).exists():
        return [path] if (path / COMMITTED).exists() else []
    for root in (checkpoints_root(path), path):
        if root.is_dir():
            found = sorted((p for p in root.glob("step_*") if not p.name.endswith(".tmp") and (p / COMMITTED).exists()),
                           reverse=True)
            if found:
                return found
    return []


def latest_checkpoint(path, notes: list | None = None) -> Path | None:
    """Resolve a run dir, a checkpoints folder or a step folder to a committed step folder (or None). The
    ``latest`` pointer wins while it names a committed folder; when it is missing, empty or names an unfinished
    or missing folder, the newest committed one is used, and ``notes`` (when given) gets a line saying so."""
    path = Path(path)
    committed = committed_checkpoints(path)
    if (path / MANIFEST).exists() or not committed:
        return committed[0] if committed else None
    root = committed[0].parent
    pointer = root / LATEST
    named = _read_pointer(pointer)
    if named and (root / named / COMMITTED).exists():
        return root / named
    if notes is not None:
        why = "missing" if not pointer.exists() else "empty" if not named else f"names {named}, which is not committed"
        notes.append(f"{pointer} is {why}; using the newest committed checkpoint, {committed[0].name}")
    return committed[0]


def _read_pointer(pointer: Path) -> str:
    """The folder name in the ``latest`` pointer; '' when it is missing, empty or not a plain folder name."""
    if not pointer.exists():
        return ""
    try:
        named = pointer.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        return ""
    return named if named and "/" not in named and "\0" not in named and len(named) < 256 else ""


def _check_manifest_digest(ckpt: Path, raw: bytes) -> None:
    """The manifest against the sha256 its COMMITTED marker records (markers older than that record none)."""
    lines = (ckpt / COMMITTED).read_bytes().split(b"\n")
    recorded = [line for line in lines[1:] if line.strip()]
    if not recorded:
        return
    parts = recorded[0].split()
    if len(parts) != 2 or parts[0] != b"manifest-sha256":
        raise CheckpointError(f"{ckpt / COMMITTED} is damaged (its second line is not 'manifest-sha256 HEX'); load "
                              f"an earlier checkpoint")
    if hashlib.sha256(raw).hexdigest().encode() != parts[1]:
        raise CheckpointError(f"{ckpt / MANIFEST} does not match the sha256 in {COMMITTED}: the file is corrupt or "
                              f"truncated; load an earlier checkpoint")


def read_manifest(ckpt: Path, verify: bool = True) -> dict:
    """Read and check a manifest: format, commit marker, every file present with its recorded sha256."""
    ckpt = Path(ckpt)
    if not (ckpt / MANIFEST).exists():
        raise CheckpointError(f"{ckpt} has no {MANIFEST}: not a megalm checkpoint")
    if not (ckpt / COMMITTED).exists():
        raise CheckpointError(f"{ckpt} has no {COMMITTED} marker: the save did not finish; load an earlier step")
    raw = (ckpt / MANIFEST).read_bytes()
    _check_manifest_digest(ckpt, raw)
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt / MANIFEST} is not valid JSON ({e}): the checkpoint is damaged; load an "
                              f"earlier one (megalm checkpoint list shows them)") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{ckpt / MANIFEST} holds a JSON {type(manifest).__name__}, not a megalm manifest")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"{ckpt / MANIFEST}: format {manifest.get('format')!r} version "
                              f"{manifest.get('version')!r}, expected {FORMAT!r} version {VERSION}")
    for name in manifest["files"]:
        if not (ckpt / name).exists():
            raise CheckpointError(f"{ckpt / name} is missing (listed in the manifest); the checkpoint is incomplete")
    if verify:
        verify_files(ckpt, manifest)
    return manifest


def first_mismatch(ckpt: Path, manifest: dict, names) -> str | None:
    """The first of the named files whose sha256 differs from the manifest's, or None (hashed in parallel)."""
    names = list(names)
    for name, digest in zip(names, sha256_files(ckpt / n for n in names)):
        if digest != manifest["files"][name]:
            return name
    return None


def damaged_message(path: Path) -> str:
    return (f"{path} does not match its sha256 in the manifest: the file is corrupt or truncated; load an earlier "
            f"checkpoint")


def verify_files(ckpt: Path, manifest: dict) -> None:
    """Every file against its recorded sha256."""
    bad = first_mismatch(ckpt, manifest, manifest["files"])
    if bad is not None:
        raise CheckpointError(damaged_message(ckpt / bad))


def pieces_of(manifest: dict, name: str) -> list[Piece]:
    entry = manifest["tensors"].get(name)
    return [Piece(**p) for p in entry["pieces"]] if entry else []
