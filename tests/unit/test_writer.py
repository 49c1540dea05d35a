"""PlannedSafetensorsFile: pieces written from memory or copied file to file give the same, correctly hashed file."""
import hashlib
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file

from megalm.checkpoint.load import rows_byte_range, safetensors_offsets
from megalm.checkpoint.writer import PlannedSafetensorsFile
from megalm.parallel.shard import ShardSpec


@pytest.mark.parametrize("how", ["write", "copy_range", "copy_range falling back"])
def test_piece_paths_write_the_same_file(tmp_path, how):
    source = torch.randn(64, 32)
    save_file({"w": source}, str(tmp_path / "src.safetensors"))
    start, end, dtype = safetensors_offsets(tmp_path / "src.safetensors")["w"]
    assert dtype == "F32" and end - start == source.numel() * 4
    out = PlannedSafetensorsFile(tmp_path / "out.safetensors", [("a", torch.float32, (32, 32)),
                                                                  ("b", torch.float32, (7,))])
    rows = rows_byte_range(start, end, 0, 64, 64, None)
    assert rows == (start, end - start)
    piece = source[32:]                                # rank 1 of 2 along dim 0: the second half of the rows
    spec = ShardSpec(0, 2, 1)
    offset, count = rows_byte_range(start, end, 0, 64, 64, spec)
    assert count == piece.numel() * 4
    if how == "write":
        out.write("a", piece)
    elif how == "copy_range":
        out.copy_range("a", piece, tmp_path / "src.safetensors", offset)
    else:
        with mock.patch("os.copy_file_range", side_effect=OSError(18, "cross-device")):
            out.copy_range("a", piece, tmp_path / "src.safetensors", offset)
    out.write("b", torch.arange(7.0))
    digest = out.close()
    out.wait_durable()
    data = (tmp_path / "out.safetensors").read_bytes()
    assert digest == hashlib.sha256(data).hexdigest()
    loaded = load_file(str(tmp_path / "out.safetensors"))
    assert torch.equal(loaded["a"], piece) and torch.equal(loaded["b"], torch.arange(7.0))


def test_rows_byte_range_refuses_what_is_not_contiguous():
    by_columns = ShardSpec(1, 2, 0)
    assert rows_byte_range(100, 612, 0, 16, 16, by_columns) is None
    outside = ShardSpec(0, 2, 1)
    assert rows_byte_range(100, 356, 0, 8, 16, outside) is None        # a piece holding rows 0-7 only
