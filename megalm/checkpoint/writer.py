"""A safetensors file written piece by piece, for conversions with bounded memory.

Every tensor's name, dtype and shape are known before any data arrives (they follow from the model config), so
the header is written first, the file is sized, and each tensor is then written at its offset as soon as it is
available, in any order. Peak memory is one tensor, whatever the model's size. The result is an ordinary
safetensors file.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def dtype_from_name(name: str) -> torch.dtype:
    return getattr(torch, name.replace("torch.", ""))


def _load_sync_file_range():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):                          # not Linux: fsync alone does the work
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing these bytes to disk now, without waiting and without dropping them from
    the page cache (Linux sync_file_range), so that the final fsync finds little left to do."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def _bytes_of(tensor: torch.Tensor, dtype: torch.dtype) -> memoryview:
    return memoryview(tensor.detach().to("cpu", dtype).contiguous().view(torch.uint8).numpy()).cast("B")


class PlannedSafetensorsFile:
    def __init__(self, path, entries: list[tuple[str, torch.dtype, tuple]], sha256: bool = True):
        """entries: (key, dtype, shape) of every tensor the file will hold, in file order. sha256=False: no
        digest (files for another format, such as Hugging Face's, that records none)."""
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
        # While tensors arrive in file order the sha256 is computed as they are written (no second read), on a
        # thread of its own (hashlib releases the GIL) so that hashing one piece overlaps fetching the next.
        self.sha256 = sha256
        self._hash, self._next = (hashlib.sha256(head) if sha256 else None), 0
        self._hasher, self._hashing = ThreadPoolExecutor(max_workers=1), None

    def write(self, key: str, tensor: torch.Tensor) -> None:
        offset, nbytes, dtype, shape = self._slot(key, tensor)
        data = _bytes_of(tensor, dtype)
        assert data.nbytes == nbytes
        written = 0
        while written < nbytes:                                 # pwrite may write less than asked
            written += os.pwrite(self.fd, data[written:], self.data_start + offset + written)
        self._written(key, offset, nbytes, data)

    def put(self, key: str, tensor: torch.Tensor, source: tuple | None = None) -> None:
        """Write ``key``: copied file to file when ``source`` = (file, byte offset, byte count) locates exactly
        these bytes in a source file, else from memory."""
        if source is not None and source[2] == tensor.numel() * tensor.element_size():
            self.copy_range(key, tensor, source[0], source[1])
        else:
            self.write(key, tensor)

    def copy_range(self, key: str, tensor: torch.Tensor, source: Path, source_offset: int) -> None:
        """Write ``key`` by copying its bytes from ``source`` at ``source_offset`` file to file in the kernel
        (copy_file_range: about half the CPU of a pwrite from memory). ``tensor`` holds the same bytes (a view
        of the source's mapping); it is only hashed."""
        offset, nbytes, dtype, shape = self._slot(key, tensor)
        if tensor.dtype != dtype or not tensor.is_contiguous() or not hasattr(os, "copy_file_range"):
            return self.write(key, tensor)
        src = os.open(source, os.O_RDONLY)
        try:
            done = 0
            while done < nbytes:
                n = os.copy_file_range(src, self.fd, nbytes - done, source_offset + done,
                                       self.data_start + offset + done)
                if n == 0:
                    raise ValueError(f"{source}: ended {nbytes - done} bytes early while copying {key}")
                done += n
        except OSError:        # across file systems, or a kernel without it: copy through memory instead
            return self.write(key, tensor)
        finally:
            os.close(src)
        self._written(key, offset, nbytes, _bytes_of(tensor, dtype))

    def _slot(self, key: str, tensor: torch.Tensor):
        offset, nbytes, dtype, shape = self.slots[key]
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path.name}: {key} has shape {tuple(tensor.shape)}, planned {shape}")
        return offset, nbytes, dtype, shape

    def _written(self, key: str, offset: int, nbytes: int, data: memoryview) -> None:
        _start_writeback(self.fd, self.data_start + offset, nbytes)
        self.pending.discard(key)
        self._wait_for_hash()                                   # at most one piece held for hashing
        if self._hash is not None and offset == self._next:
            self._hashing = self._hasher.submit(self._hash.update, data)   # data keeps the piece alive
            self._next += nbytes
        else:
            self._hash = None                                   # out of order: hash the file at close

    def _wait_for_hash(self) -> None:
        if self._hashing is not None:
            self._hashing.result()
            self._hashing = None

    def close(self) -> str | None:
        """Finish the file and return its sha256 (None if not asked for). The fsync runs on the file's own thread,
        so the disk writes this file back while the caller fills the next one; ``wait_durable()`` joins it
        before anything is committed."""
        self._wait_for_hash()
        if self.pending:
            os.close(self.fd)
            self._hasher.shutdown()
            raise ValueError(f"{self.path.name}: tensors never written: {sorted(self.pending)[:5]}")
        if not self.sha256:
            digest = None
        elif self._hash is None:
            from megalm.checkpoint.format import sha256_file

            digest = sha256_file(self.path)
        else:
            digest = self._hash.hexdigest()
        self._durable = self._hasher.submit(self._fsync_and_close)
        self._hasher.shutdown(wait=False)
        return digest

    def _fsync_and_close(self) -> None:
        try:
            os.fsync(self.fd)
        finally:
            os.close(self.fd)

    def wait_durable(self) -> None:
        """Block until the file is on disk (raises what fsync raised)."""
        self._durable.result()
