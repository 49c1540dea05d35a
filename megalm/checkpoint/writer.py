"""A safetensors file written piece by piece, for conversions with bounded memory.

Every tensor's name, dtype and shape are known before any data arrives (they follow from the model config), so
the header is written first, the file is sized, and each tensor is then written at its offset as soon as it is
available, in any order. Peak memory is one tensor, whatever the model's size. The result is an ordinary
safetensors file.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def dtype_from_name(name: str) -> torch.dtype:
    return getattr(torch, name.replace("torch.", ""))


class PlannedSafetensorsFile:
    def __init__(self, path, entries: list[tuple[str, torch.dtype, tuple]]):
        """entries: (key, dtype, shape) of every tensor the file will hold, in file order."""
        self.path = Path(path)
        header, offset, self.slots = {}, 0, {}
        for key, dtype, shape in entries:
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[key] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.slots[key] = (offset, nbytes, dtype, tuple(shape))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)                           # data starts 8-byte aligned
        self.data_start = 8 + len(raw)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        head = struct.pack("<Q", len(raw)) + raw
        os.write(self.fd, head)
        self.pending = set(self.slots)
        # While tensors arrive in file order the sha256 is computed as they are written (no second read).
        self._hash, self._next = hashlib.sha256(head), 0

    def write(self, key: str, tensor: torch.Tensor) -> None:
        offset, nbytes, dtype, shape = self.slots[key]
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path.name}: {key} has shape {tuple(tensor.shape)}, planned {shape}")
        data = memoryview(tensor.detach().to("cpu", dtype).contiguous().view(torch.uint8).numpy()).cast("B")
        assert data.nbytes == nbytes
        written = 0
        while written < nbytes:                                 # pwrite may write less than asked
            written += os.pwrite(self.fd, data[written:], self.data_start + offset + written)
        self.pending.discard(key)
        if self._hash is not None and offset == self._next:
            self._hash.update(data)
            self._next += nbytes
        else:
            self._hash = None                                   # out of order: hash the file at close

    def close(self) -> str:
        """fsync and close; returns the file's sha256."""
        if self.pending:
            os.close(self.fd)
            raise ValueError(f"{self.path.name}: tensors never written: {sorted(self.pending)[:5]}")
        os.fsync(self.fd)
        os.close(self.fd)
        if self._hash is None:
            from megalm.checkpoint.format import sha256_file

            return sha256_file(self.path)
        return self._hash.hexdigest()
