"""Load with resharding: any rank reads exactly its slice of each global tensor, whatever layout wrote it.

Verification costs each rank a share of the checkpoint, not the whole of it: ``verify_collectively`` splits the
files among the ranks (file i is hashed by rank i mod world), and the ranks agree on the verdict (one small
all-reduce) before any weight is used. A checkpoint lives on a file system every rank reads, so a file one rank
verified is the file every rank reads.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open

from megalm.checkpoint.format import (
    MANIFEST,
    CheckpointError,
    committed_checkpoints,
    damaged_message,
    first_mismatch,
    pieces_of,
    read_manifest,
)


def param_name(tensor_name: str) -> str:
    """'model.X' and 'optim.<state>.X' both describe parameter X."""
    head, _, rest = tensor_name.partition(".")
    return rest if head == "model" else rest.partition(".")[2]


class CheckpointReader:
    """Reads slices of the global tensors of one committed checkpoint folder.

    ``verify``: hash every file now (single-process tools); False leaves it to ``verify_for_rank`` (training,
    evaluation, generation), or to the caller. A LoRA checkpoint holds the adapters alone and names its base
    (``lora_base`` in the manifest): the base's tensors are read from there (``self.base``), and its files are
    verified with this checkpoint's.
    """

    def __init__(self, folder, verify: bool = True):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder, verify=False)
        self._handles, self._layouts = {}, {}
        self.bytes_hashed = 0
        self.base = open_lora_base(self.folder, self.manifest)
        if verify:
            self.verify_all()

    def verify_all(self) -> None:
        """Every file this checkpoint's tensors come from (a LoRA checkpoint's base's too) against its sha256."""
        self.verify_files(sorted(self.manifest["files"]))
        if self.base is not None:
            self.base.verify_all()

    def file_owners(self) -> list[tuple["CheckpointReader", str]]:
        """(reader, file) for every file this checkpoint's tensors come from: its own, then its base's."""
        own = [(self, f) for f in sorted(self.manifest["files"])]
        return own + (self.base.file_owners() if self.base is not None else [])

    def first_mismatch(self, names) -> str | None:
        """The first of the named files whose sha256 differs from the manifest's (None when all agree)."""
        names = list(names)
        self.bytes_hashed += sum((self.folder / name).stat().st_size for name in names)
        return first_mismatch(self.folder, self.manifest, names)

    def verify_files(self, names) -> None:
        bad = self.first_mismatch(names)
        if bad is not None:
            raise CheckpointError(damaged_message(self.folder / bad))

    def tokenizer(self):
        """The checkpoint's tokenizer, its file and special-tokens record checked against their sha256s first;
        None when the checkpoint carries none."""
        from megalm.data.tokenizer import load_tokenizer

        names = [n for n in ("tokenizer.json", "tokenizer.special.json") if n in self.manifest["files"]]
        if "tokenizer.json" not in names:
            return None
        self.verify_files(names)
        return load_tokenizer(self.folder / "tokenizer.json")

    def _open(self, file: str):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(self.folder / file), framework="pt")
            except Exception as e:       # safetensors raises its own error type for a damaged header
                raise CheckpointError(f"{self.folder / file} is not a readable safetensors file ({e}); load an "
                                      f"earlier checkpoint") from None
        return self._handles[file]

    def _holder(self, name: str) -> "CheckpointReader":
        """The reader whose files hold ``name``: this one, or for a LoRA checkpoint's frozen tensors its base."""
        if name not in self.manifest["tensors"] and self.base is not None and self.base.has(name):
            return self.base._holder(name)
        return self

    def tensor_names(self) -> list[str]:
        """Every tensor this checkpoint describes (a LoRA checkpoint's base's included)."""
        own = list(self.manifest["tensors"])
        return own + ([n for n in self.base.tensor_names() if n not in self.manifest["tensors"]]
                      if self.base is not None else [])

    def has(self, name: str) -> bool:
        return name in self.manifest["tensors"] or (self.base is not None and self.base.has(name))

    def global_shape(self, name: str) -> tuple:
        holder = self._holder(name)
        return tuple(holder.manifest["tensors"][name]["shape"])

    def dtype_name(self, name: str) -> str:
        return self._holder(name).manifest["tensors"][name]["dtype"]

    def read(self, name: str, spec=None, local_shape=None, optional: bool = False):
        """This rank's slice of ``name`` as described by ``spec`` (a ShardSpec; None: the whole tensor)."""
        holder = self._holder(name)
        if holder is not self:
            return holder.read(name, spec, local_shape, optional)
        if not self.has(name):
            if optional:
                return None
            raise CheckpointError(f"{self.folder}: tensor {name!r} is not in the checkpoint (saved from another "
                                  f"model?); its tensors include {sorted(self.manifest['tensors'])[:5]}")
        shape = self.global_shape(name)
        if spec is not None and local_shape is not None and tuple(spec.global_shape(local_shape)) != shape:
            raise CheckpointError(
                f"{self.folder}: {name!r} has global shape {list(shape)} in the checkpoint but the model being "
                f"loaded needs {list(spec.global_shape(local_shape))}: the checkpoint is of another model config")
        dim = spec.sharded_dim if spec is not None else None
        start, stop = (0, None) if dim is None else spec.bounds(shape[dim])
        return self._assemble(name, shape, dim, start, stop)

    def byte_range(self, name: str, spec=None) -> tuple[Path, int, int] | None:
        """(file, byte offset, byte count) of this rank's slice of ``name`` when it is one contiguous run of
        bytes in one stored file (a whole tensor, or rows of one piece cut along dim 0); else None. Lets a
        converter copy it file to file in the kernel instead of through memory."""
        if self._holder(name) is not self:
            return self._holder(name).byte_range(name, spec)
        shape = self.global_shape(name)
        rows = shape[0] if shape else 1
        for p in pieces_of(self.manifest, name):
            lo, hi = (0, rows) if p.dim is None else (p.offset, p.offset + p.length)
            if p.dim not in (None, 0):
                return None
            start, end, _ = self._offsets(p.file)[p.key]
            found = rows_byte_range(start, end, lo, hi, rows, spec)
            if found is not None:
                return (self.folder / p.file, *found)
        return None

    def _offsets(self, file: str) -> dict:
        if file not in self._layouts:
            self._layouts[file] = safetensors_offsets(self.folder / file)
        return self._layouts[file]

    def _assemble(self, name, shape, dim, start, stop):
        pieces = pieces_of(self.manifest, name)
        whole = [p for p in pieces if p.dim is None]
        if whole:
            t = self._open(whole[0].file).get_tensor(whole[0].key)
            # A view into the file's mapping (copy-on-write): the caller copies what it keeps; a writer copies
            # only when the slice is strided.
            return t if dim is None else t.narrow(dim, start, stop - start)
        piece_dim = pieces[0].dim
        if dim is not None and dim != piece_dim:
            # Never happens for megalm's own layers (a tensor is always split along the same dim); be explicit.
            full = self._assemble(name, shape, None, 0, None)
            return full.narrow(dim, start, stop - start)
        lo, hi = (start, stop) if dim is not None else (0, shape[piece_dim])
        parts = []
        for p in sorted(pieces, key=lambda p: p.offset):
            a, b = max(lo, p.offset), min(hi, p.offset + p.length)
            if a >= b:
                continue
            index = [slice(None)] * len(shape)
            index[piece_dim] = slice(a - p.offset, b - p.offset)
            parts.append(self._open(p.file).get_slice(p.key)[tuple(index)])
        covered = sum(t.shape[piece_dim] for t in parts)
        if covered != hi - lo:
            raise CheckpointError(f"{self.folder}: pieces of {name!r} cover {covered} of {hi - lo} rows along dim "
                                  f"{piece_dim}: the checkpoint is incomplete")
        return torch.cat(parts, dim=piece_dim) if len(parts) > 1 else parts[0]


def verify_collectively(reader: CheckpointReader) -> None:
    """Collective when a process group exists: every rank calls it. Each rank hashes its share of the files; one
    all-reduce tells every rank whether some file failed, and every rank names the same file."""
    owners = reader.file_owners()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = [(holder, f) for i, (holder, f) in enumerate(owners) if i % world == rank]
    found = []                              # 1-based indices into owners of the files that fail
    for holder in {id(h): h for h, _ in mine}.values():
        mismatch = holder.first_mismatch(f for h, f in mine if h is holder)
        if mismatch is not None:
            found.append(owners.index((holder, mismatch)) + 1)
    bad = min(found, default=0)
    if world > 1:
        flag = torch.tensor([bad], dtype=torch.long)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        bad = int(flag)
    if bad:
        holder, name = owners[bad - 1]
        raise CheckpointError(damaged_message(holder.folder / name))


def open_lora_base(folder: Path, manifest: dict) -> "CheckpointReader | None":
    """The base checkpoint a LoRA checkpoint's adapters were trained on (None for any other checkpoint), checked
    to be the very one: its manifest's sha256 as recorded at the save."""
    record = manifest.get("lora_base")
    if record is None:
        return None
    base = Path(record["folder"])
    if not (base / MANIFEST).is_file():
        raise CheckpointError(f"{folder} holds LoRA adapters trained on {base}, which is gone: put that checkpoint "
                              f"back where it was to use them")
    digest = hashlib.sha256((base / MANIFEST).read_bytes()).hexdigest()
    if digest != record["manifest_sha256"]:
        raise CheckpointError(f"{folder} holds LoRA adapters trained on {base}, but {base} has changed since "
                              f"(its manifest's sha256 differs): the adapters belong to another base")
    return CheckpointReader(base, verify=False)


def open_readable(folder, say=print) -> CheckpointReader:
    """A reader of ``folder`` (files not yet verified); when its manifest cannot be read (damaged, or a file it
    lists is missing), of the newest older committed checkpoint beside it that can, each one passed over named
    with the reason (``say``: rank 0's printer)."""
    folder = Path(folder)
    candidates = [folder] + [f for f in committed_checkpoints(folder.parent) if f.name < folder.name]
    first_error = None
    for candidate in candidates:
        try:
            reader = CheckpointReader(candidate, verify=False)
        except CheckpointError as error:
            first_error = first_error or error
            say(f"checkpoint: {candidate} cannot be read ({error}); trying the one before it")
            continue
        if candidate != folder:
            say(f"checkpoint: falling back to {candidate} (step {reader.manifest['step']})")
        return reader
    raise CheckpointError(f"{first_error}; and no older committed checkpoint beside it can be read either: start "
                          f"again with a new train.run_dir")


def newest_intact(reader: CheckpointReader, say=print) -> CheckpointReader:
    """Collective. ``reader``'s checkpoint when its files verify, else the newest older committed checkpoint of the
    same folder that does, each one passed over named with the reason (``say``: rank 0's printer)."""
    older = [f for f in committed_checkpoints(reader.folder.parent) if f.name < reader.folder.name]
    while True:
        try:
            verify_collectively(reader)
            return reader
        except CheckpointError as error:
            damaged = reader.folder
            while older:
                try:
                    reader = CheckpointReader(older.pop(0), verify=False)
                    break
                except CheckpointError as unreadable:
                    say(f"checkpoint: skipping {unreadable}")
            else:
                raise CheckpointError(f"{error}; and no older committed checkpoint beside it verifies either: "
                                      f"start again with a new train.run_dir") from None
            say(f"checkpoint: {damaged} is damaged ({error}); falling back to {reader.folder}")


def safetensors_offsets(path: Path) -> dict:
    """key -> (absolute start byte, end byte, dtype name) of every tensor in a safetensors file, from its header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    base = 8 + n
    return {k: (base + v["data_offsets"][0], base + v["data_offsets"][1], v["dtype"])
            for k, v in header.items() if k != "__metadata__"}


def rows_byte_range(start: int, end: int, lo: int, hi: int, rows: int, spec) -> tuple[int, int] | None:
    """Bytes [start, end) of a file hold rows [lo, hi) (along dim 0) of a tensor of ``rows`` rows. Return
    (offset, count) of the rows ``spec`` asks for (all of them for a whole tensor) if they lie inside; else
    None, also when ``spec`` cuts another dim."""
    if spec is not None and spec.is_sharded and spec.dim != 0:
        return None
    want_lo, want_hi = spec.bounds(rows) if spec is not None else (0, rows)
    if not (lo <= want_lo and want_hi <= hi):
        return None
    row_bytes = (end - start) // max(hi - lo, 1)
    return start + (want_lo - lo) * row_bytes, (want_hi - want_lo) * row_bytes
