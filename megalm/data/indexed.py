"""The indexed dataset on disk: PREFIX.bin holds every token id, PREFIX.idx says where each document starts.

PREFIX.idx, little-endian::

    offset  size  field
    0       8     magic b"MEGALMID"
    8       4     format version (uint32), currently 1
    12      1     dtype code of PREFIX.bin (see _DTYPES)
    13      3     padding
    16      8     number of documents N (uint64)
    24      8     number of tokens T (uint64) == size of PREFIX.bin / itemsize
    32      8     largest token id (int64, -1 when T == 0), so a vocabulary check costs O(1)
    40      4     CRC-32 of PREFIX.bin, checked by ``IndexedDataset.verify``
    44      4     padding
    48      8(N+1) document offsets in tokens (uint64): document i is tokens [off[i], off[i+1])

PREFIX.bin is the documents' token ids back to back, in the smallest dtype that holds the vocabulary. Both
files are written under temporary names and renamed into place at the end, so a crash never leaves a
half-written dataset under the final name; the writer streams both (its memory does not grow with the corpus).
Opening checks everything that costs no pass over the tokens.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import struct
import zlib

import numpy as np

from megalm.data.errors import DataError

MAGIC = b"MEGALMID"
VERSION = 1
_HEADER = struct.Struct("<8sIB3xQQqI4x")
HEADER_SIZE = _HEADER.size  # 48
_DTYPES = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 3: np.dtype("<i4"), 4: np.dtype("<u4"), 5: np.dtype("<i8")}
_CODES = {dt: code for code, dt in _DTYPES.items()}
_RERUN = "re-run megalm preprocess"


def best_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else int32."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<i4")


def _paths(prefix) -> tuple[pathlib.Path, pathlib.Path]:
    return pathlib.Path(f"{prefix}.bin"), pathlib.Path(f"{prefix}.idx")


class IndexedDatasetWriter:
    """Append documents, then ``finalize()``; use as a context manager to clean up on error."""

    def __init__(self, prefix: str | os.PathLike, dtype):
        self.dtype = np.dtype(dtype).newbyteorder("<")
        if self.dtype not in _CODES:
            raise DataError(f"dtype {np.dtype(dtype)} cannot be stored: use one of "
                            f"{', '.join(str(d) for d in _DTYPES.values())}")
        self.bin_path, self.idx_path = _paths(prefix)
        tag = f".tmp-{os.getpid()}"
        self._bin_tmp = self.bin_path.with_name(self.bin_path.name + tag)
        self._idx_tmp = self.idx_path.with_name(self.idx_path.name + tag)
        self._ends_tmp = self.idx_path.with_name(self.idx_path.name + tag + ".ends")
        self._bin = open(self._bin_tmp, "wb")
        self._ends = open(self._ends_tmp, "wb")     # each document's end offset, streamed, not held
        self._num_docs = self._num_tokens = 0
        self._max_id = -1
        self._crc = 0
        self._limit = np.iinfo(self.dtype).max

    def add_document(self, ids) -> None:
        """Append one document's token ids (the caller appends the end-of-document token)."""
        arr = np.asarray(ids)
        self.add_documents(arr, [arr.size if arr.ndim == 1 else -1])

    def add_documents(self, flat, lengths) -> None:
        """Append documents given as their token ids back to back and each one's length: one write per call."""
        arr = np.asarray(flat)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise DataError(f"a document must be a 1-D sequence of integer token ids, got shape {arr.shape} "
                            f"dtype {arr.dtype}")
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.ndim != 1 or np.any(lengths < 0) or lengths.sum() != arr.size:
            raise DataError(f"document lengths {lengths[:8].tolist()}... do not add up to the {arr.size} ids given")
        if arr.size:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi > self._limit:
                bad = lo if lo < 0 else hi
                raise DataError(f"token id {bad} does not fit the dataset dtype {self.dtype} "
                                f"(0..{self._limit}): write with a wider dtype (best_dtype(vocab_size))")
            self._max_id = max(self._max_id, hi)
        data = arr.astype(self.dtype, copy=False).tobytes()
        self._bin.write(data)
        self._crc = zlib.crc32(data, self._crc)
        self._ends.write((self._num_tokens + np.cumsum(lengths)).astype("<u8").tobytes())
        self._num_docs += len(lengths)
        self._num_tokens += arr.size

    def finalize(self) -> None:
        """Write PREFIX.idx and move both files into place (PREFIX.bin first, then PREFIX.idx)."""
        self._bin.close()
        self._ends.close()
        header = _HEADER.pack(MAGIC, VERSION, _CODES[self.dtype], self._num_docs, self._num_tokens,
                              self._max_id, self._crc)
        with open(self._idx_tmp, "wb") as f, open(self._ends_tmp, "rb") as ends:
            f.write(header)
            f.write(np.zeros(1, dtype="<u8").tobytes())
            shutil.copyfileobj(ends, f, 1 << 20)
        self._ends_tmp.unlink()
        os.replace(self._bin_tmp, self.bin_path)
        os.replace(self._idx_tmp, self.idx_path)

    def abort(self) -> None:
        self._bin.close()
        self._ends.close()
        for p in (self._bin_tmp, self._idx_tmp, self._ends_tmp):
            p.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


class IndexedDataset:
    """Read-only, memory-mapped view of PREFIX.bin/.idx; ``ds[i]`` is document i's token ids."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        self.bin_path, self.idx_path = _paths(prefix)
        for p in (self.idx_path, self.bin_path):
            if not p.is_file():
                raise DataError(f"{p} not found: run megalm preprocess --output-prefix {self.prefix}")
        raw = self.idx_path.read_bytes()
        # Names the caches built from this index: a rewritten dataset never reuses a stale one.
        self.fingerprint = hashlib.blake2b(raw, digest_size=8).hexdigest()
        (self.dtype, num_docs, self.num_tokens, self.max_token_id, self.crc32) = self._parse_header(raw)
        self.offsets = self._parse_offsets(raw, num_docs)
        self.doc_lengths = np.diff(self.offsets).astype(np.int64)
        self._check_bin_size()
        if self.num_tokens:
            self._tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        else:  # mmap refuses empty files
            self._tokens = np.zeros(0, dtype=self.dtype)

    def _parse_header(self, raw: bytes):
        idx = self.idx_path
        if len(raw) < HEADER_SIZE:
            raise DataError(f"{idx} holds {len(raw)} bytes, less than the {HEADER_SIZE}-byte header: the "
                            f"file is truncated; {_RERUN}")
        magic, version, code, num_docs, num_tokens, max_id, crc = _HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise DataError(f"{idx} starts with {magic!r}, not the megalm magic {MAGIC!r}: it is corrupt or "
                            f"not a megalm indexed dataset; {_RERUN}")
        if version != VERSION:
            raise DataError(f"{idx} has format version {version}, but this megalm reads version {VERSION}: "
                            f"{_RERUN} with this version of megalm")
        if code not in _DTYPES:
            raise DataError(f"{idx} names dtype code {code}, which is not one of {sorted(_DTYPES)}: the file "
                            f"is corrupt; {_RERUN}")
        dtype = _DTYPES[code]
        if max_id > np.iinfo(dtype).max or max_id < -1 or (max_id == -1) != (num_tokens == 0):
            raise DataError(f"{idx} says the largest token id is {max_id}, impossible for {num_tokens} "
                            f"tokens of dtype {dtype}: the file is corrupt; {_RERUN}")
        return dtype, num_docs, num_tokens, max_id, crc

    def _parse_offsets(self, raw: bytes, num_docs: int) -> np.ndarray:
        idx = self.idx_path
        expected = HEADER_SIZE + 8 * (num_docs + 1)
        if len(raw) != expected:
            what = "truncated" if len(raw) < expected else "corrupt (it has trailing bytes)"
            raise DataError(f"{idx} holds {len(raw)} bytes but its header promises {num_docs} documents "
                            f"({expected} bytes): the file is {what}; {_RERUN}")
        offsets = np.frombuffer(raw, dtype="<u8", count=num_docs + 1, offset=HEADER_SIZE).astype(np.int64)
        if offsets[0] != 0 or offsets[-1] != self.num_tokens or np.any(np.diff(offsets) < 0):
            raise DataError(f"{idx} has document offsets that do not run from 0 up to its {self.num_tokens} "
                            f"tokens: the file is corrupt; {_RERUN}")
        return offsets

    def _check_bin_size(self) -> None:
        size = self.bin_path.stat().st_size
        expected = self.num_tokens * self.dtype.itemsize
        if size != expected:
            what = "truncated" if size < expected else "corrupt (it has trailing bytes)"
            raise DataError(f"{self.bin_path} holds {size} bytes but {self.idx_path} says {expected} "
                            f"({self.num_tokens} tokens of {self.dtype}): the file is {what}; {_RERUN}")

    def verify(self) -> None:
        """Check PREFIX.bin against the CRC-32 in the header: one pass over the tokens."""
        crc, step = 0, 1 << 24
        for start in range(0, self.num_tokens, step):
            crc = zlib.crc32(self._tokens[start:start + step].tobytes(), crc)
        if crc != self.crc32:
            raise DataError(f"{self.bin_path} does not match the checksum in {self.idx_path} "
                            f"(crc32 {crc:#010x} != {self.crc32:#010x}): the file is corrupt; {_RERUN}")

    def __len__(self) -> int:
        return len(self.doc_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range for {n} documents in {self.prefix}")
        i %= n
        return self._tokens[self.offsets[i]:self.offsets[i + 1]]

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the whole concatenated file (a view into the memory map)."""
        return self._tokens[start:stop]
