"""The one builder of a checkpoint's manifest: what training saves, what a conversion writes and what a DeepSpeed
checkpoint becomes all go through these functions, so every manifest has the same fields."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from megalm.checkpoint.format import FORMAT, VERSION, sha256_file

RNG_POLICY = {"policy": "torch.manual_seed(train.seed + step) before every step"}


def layout_entry(tp: int = 1, pp: int = 1, dp: int = 1, virtual_stages: int = 1, sequence_parallel: bool = False,
                 zero_stage: int = 0, engine: str = "native", **extra) -> dict:
    """The layout a checkpoint was saved from (informative: any layout reads any other)."""
    return {"tp": tp, "pp": pp, "dp": dp, "virtual_stages": virtual_stages, "sequence_parallel": sequence_parallel,
            "zero_stage": zero_stage, "engine": engine, **extra}


def new_manifest(step: int, config: dict, layout: dict, data_prefix, consumed_samples: int, optimizer_name: str,
                 optimizer_step: int, has_optimizer_state: bool, loss_scale: dict | None = None) -> dict:
    """A manifest with no tensors or files yet (``add_piece``/``add_written``/``add_tokenizer`` fill them)."""
    return {"format": FORMAT, "version": VERSION, "step": step, "config": config, "layout": layout,
            "data": {"prefix": data_prefix, "consumed_samples": consumed_samples},
            "optimizer": {"name": optimizer_name, "step": optimizer_step, "has_state": has_optimizer_state},
            "loss_scale": loss_scale, "rng": RNG_POLICY, "tensors": {}, "files": {}}


def piece_entry(spec, local_shape: tuple, file: str, key: str) -> dict:
    """The manifest's description of one stored piece: which slice of the global tensor ``spec`` denotes."""
    dim = spec.sharded_dim
    offset = spec.index * local_shape[dim] if dim is not None else 0
    length = local_shape[dim] if dim is not None else (local_shape[0] if local_shape else 1)
    return {"file": file, "key": key, "dim": dim, "offset": offset, "length": length}


def add_piece(manifest: dict, name: str, global_shape, dtype: str, piece: dict) -> None:
    slot = manifest["tensors"].setdefault(name, {"shape": list(global_shape), "dtype": dtype, "pieces": []})
    slot["pieces"].append(piece)


def add_written(manifest: dict, written: dict) -> None:
    """Record one ``write_pieces`` report (a file, its sha256 and the pieces it holds) in the manifest."""
    if written["file"]:
        manifest["files"][written["file"]] = written["sha256"]
    for name, entry in written["entries"].items():
        add_piece(manifest, name, entry["shape"], entry["dtype"], entry["piece"])


def add_tokenizer(folder: Path, manifest: dict, tokenizer_file, special=None) -> None:
    """Copy ``tokenizer_file`` (when there is one) into a checkpoint being written with its special-tokens record
    (``special``, else the record beside the file when there is one), their sha256s into the manifest."""
    from megalm.data.tokenizer import special_path

    if not (tokenizer_file and Path(tokenizer_file).exists()):
        return
    shutil.copyfile(tokenizer_file, folder / "tokenizer.json")
    manifest["files"]["tokenizer.json"] = sha256_file(folder / "tokenizer.json")
    record = folder / "tokenizer.special.json"
    if special is not None:
        record.write_text(json.dumps(special.to_dict(), indent=1))
    elif Path(special_path(tokenizer_file)).is_file():
        shutil.copyfile(special_path(tokenizer_file), record)
    if record.exists():
        manifest["files"][record.name] = sha256_file(record)
