"""Load with resharding: any rank reads exactly its slice of each global tensor, whatever layout wrote it."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from megalm.checkpoint.format import CheckpointError, pieces_of, read_manifest


class CheckpointReader:
    """Reads slices of the global tensors of one committed checkpoint folder."""

    def __init__(self, folder, verify: bool = True):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder, verify=verify)
        self._handles = {}

    def _open(self, file: str):
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.folder / file), framework="pt")
        return self._handles[file]

    def has(self, name: str) -> bool:
        return name in self.manifest["tensors"]

    def global_shape(self, name: str) -> tuple:
        return tuple(self.manifest["tensors"][name]["shape"])

    def read(self, name: str, spec=None, local_shape=None, optional: bool = False):
        """This rank's slice of ``name`` as described by ``spec`` (a ShardSpec; None: the whole tensor)."""
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
        dim = spec.dim if spec is not None and spec.dim is not None and spec.parts > 1 else None
        start, stop = (0, None) if dim is None else (spec.index * shape[dim] // spec.parts,
                                                      (spec.index + 1) * shape[dim] // spec.parts)
        return self._assemble(name, shape, dim, start, stop)

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
