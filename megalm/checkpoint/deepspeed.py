"""DeepSpeed ZeRO checkpoints (stage 1, 2 or 3) into megalm's layout-free format, streamed.

DeepSpeed's own ``zero_to_fp32`` loads every data-parallel rank's optimizer file whole and concatenates them
(over 1 TB of RAM for an 80B model). Here each rank's file is memory-mapped (``torch.load(mmap=True)``) and one
parameter is assembled at a time, its fp32 weight and Adam moments cut from the ranks' flat partitions; pieces
go to disk in safetensors files of at most ``max_file_bytes`` each, so memory stays at one file's worth no
matter how large the optimizer state.

Layouts, as DeepSpeed 0.19 writes them (``zero_pp_rank_{r}_mp_rank_00_optim_states.pt`` for each DP rank r):
- ZeRO-1/2: per parameter group a flat fp32 vector (the group's parameters back to back, padded at the end)
  cut into dp equal slices; rank r holds slice r (``single_partition_of_fp32_groups``).
- ZeRO-3: every parameter is cut into dp slices of ceil(numel / dp) (the last padded); rank r's flat group
  holds its slice of each parameter back to back (``fp32_flat_groups``).
Adam's ``exp_avg``/``exp_avg_sq`` have the layout of the fp32 weights they belong to.
"""
from __future__ import annotations

import dataclasses
import math
import re
import shutil
import time
from pathlib import Path

import torch

from megalm.checkpoint.format import FORMAT, VERSION, checkpoints_root, commit, step_dir_name
from megalm.checkpoint.save import write_pieces
from megalm.config import Config
from megalm.parallel.tensor.layers import ShardSpec

WHOLE = ShardSpec(None)
MOMENTS = ("exp_avg", "exp_avg_sq")


class DeepSpeedCheckpointError(RuntimeError):
    """A DeepSpeed checkpoint this converter cannot read; the message says why and what to do."""


def _load(path: Path) -> dict:
    """mmap: tensors stay on disk until sliced. weights_only=True: a checkpoint cannot run code; the few
    non-tensor objects DeepSpeed writes are allowed by name (``_safe_globals``)."""
    with torch.serialization.safe_globals(_safe_globals()):
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:   # noqa: BLE001 - re-raised with the file named
            raise DeepSpeedCheckpointError(f"{path} cannot be read safely (weights_only): {e}") from e


def _as_int(value):
    """Stand-in for DeepSpeed's int enums: the value is all the converter needs, and no DeepSpeed class is
    imported (or trusted) to read a checkpoint."""
    return int(value)


class _Opaque:
    """Stand-in for a DeepSpeed object stored in the checkpoint (a loss scaler...): its fields are kept as plain
    data and never used; no DeepSpeed code runs while reading."""


OPAQUE = ["deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
          "deepspeed.utils.tensor_fragment.fragment_address"]


def _safe_globals() -> list:
    return [(_as_int, "deepspeed.runtime.zero.config.ZeroStageEnum")] + [(_Opaque, name) for name in OPAQUE]


def _rank_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*zero_pp_rank_*_mp_rank_*_optim_states.pt"),
                   key=lambda p: int(re.search(r"zero_pp_rank_(\d+)_", p.name).group(1)))
    if not files:
        raise DeepSpeedCheckpointError(f"{folder} has no zero_pp_rank_*_optim_states.pt: not a DeepSpeed ZeRO "
                                       f"checkpoint (ZeRO-0 checkpoints hold the whole model in mp_rank_00)")
    mp_ranks = {re.search(r"mp_rank_(\d+)", p.name).group(1) for p in files}
    if mp_ranks != {"00"}:
        raise DeepSpeedCheckpointError(f"{folder} was saved with model parallelism (mp ranks {sorted(mp_ranks)}); "
                                       f"this converter reads tp = pp = 1 DeepSpeed checkpoints")
    return files


def _parameters(model_states: dict):
    """(group, DeepSpeed name, shape) of every trainable parameter, in the order ZeRO flattened them."""
    for group, shapes in enumerate(model_states["param_shapes"]):
        for name, shape in shapes.items():
            yield group, name, torch.Size(shape)


def _megalm_name(ds_name: str) -> str:
    """DeepSpeed saw megalm's chunks as ``chunks.{c}.…``; the layout-free name drops the wrapper."""
    return re.sub(r"^(module\.)?chunks\.\d+\.", "", ds_name)


class _Ranks:
    """The memory-mapped flat groups (fp32 weights and moments) of every data-parallel rank."""

    def __init__(self, files: list[Path]):
        self.states = [_load(f)["optimizer_state_dict"] for f in files]
        first = self.states[0]
        self.stage = int(first["zero_stage"])
        key = "fp32_flat_groups" if self.stage == 3 else "single_partition_of_fp32_groups"
        base = "optimizer_state_dict" if self.stage == 3 else "base_optimizer_state"
        self.flat = [s[key] for s in self.states]
        self.moments = [s[base]["state"] for s in self.states]
        self.dp = len(self.states)
        self.has_moments = all(k in self.moments[0].get(0, {}) for k in MOMENTS)
        step = self.moments[0].get(0, {}).get("step")
        self.step = int(step) if step is not None else None

    def vector(self, rank: int, group: int, key: str | None) -> torch.Tensor:
        return self.flat[rank][group] if key is None else self.moments[rank][group][key]


def _stage3_values(ranks: _Ranks, group: int, offset: int, shape: torch.Size, key):
    part = math.ceil(shape.numel() / ranks.dp)
    pieces = [ranks.vector(r, group, key).narrow(0, offset, part) for r in range(ranks.dp)]
    return torch.cat(pieces)[:shape.numel()].view(shape).float(), offset + part


def _stage12_values(ranks: _Ranks, group: int, offset: int, shape: torch.Size, key):
    size = ranks.vector(0, group, key).numel()      # every rank's slice of the group has this length
    lo, hi = offset, offset + shape.numel()
    pieces = []
    for r in range(lo // size, (hi - 1) // size + 1):
        a, b = max(lo, r * size), min(hi, (r + 1) * size)
        pieces.append(ranks.vector(r, group, key).narrow(0, a - r * size, b - a))
    return torch.cat(pieces).view(shape).float(), hi


def _tensors(ranks: _Ranks, model_states: dict, with_optimizer: bool):
    """(layout-free name, fp32 tensor, ShardSpec) for every weight and moment, one parameter at a time."""
    cut = _stage3_values if ranks.stage == 3 else _stage12_values
    offsets: dict[int, int] = {}
    for group, ds_name, shape in _parameters(model_states):
        start = offsets.get(group, 0)
        name = _megalm_name(ds_name)
        value, offsets[group] = cut(ranks, group, start, shape, None)
        yield f"model.{name}", value, WHOLE
        for key in MOMENTS if with_optimizer else ():
            yield f"optim.{key}.{name}", cut(ranks, group, start, shape, key)[0], WHOLE


def _batches(tensors, max_bytes: int):
    batch, size = [], 0
    for item in tensors:
        batch.append(item)
        size += item[1].numel() * item[1].element_size()
        if size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _resolve_tag(ds_dir: Path, tag) -> str:
    if tag is not None:
        return str(tag)
    latest = ds_dir / "latest"
    if not latest.exists():
        raise DeepSpeedCheckpointError(f"{ds_dir} has no 'latest' file; pass tag= (a subfolder name)")
    return latest.read_text().strip()


def convert_deepspeed_checkpoint(ds_dir, out_dir, model_config, tag=None, with_optimizer: bool = True,
                                 max_file_bytes: int = 256 << 20) -> Path:
    """Convert DeepSpeed ZeRO-1/2/3 checkpoint ``ds_dir/tag`` into a committed megalm checkpoint under
    ``out_dir`` (a run dir: ``out_dir/checkpoints/step_N``); returns the step folder. Single process.

    ``model_config``: the ModelConfig (or whole Config) the checkpoint was trained with; it goes into the
    manifest so that ``megalm train/eval/generate`` can load the result."""
    ds_dir = Path(ds_dir)
    folder = ds_dir / _resolve_tag(ds_dir, tag)
    if not folder.is_dir():
        raise DeepSpeedCheckpointError(f"{folder} does not exist")
    files = _rank_files(folder)
    model_file = folder / "mp_rank_00_model_states.pt"
    model_states = _load(model_file if model_file.exists() else
                         folder / files[0].name.replace("optim_states", "model_states"))
    ranks = _Ranks(files)
    with_optimizer = with_optimizer and ranks.has_moments
    step = int(model_states.get("global_steps", ranks.step or 0))

    cfg = model_config if isinstance(model_config, Config) else Config(model=dataclasses.replace(model_config))
    root = checkpoints_root(out_dir)
    final, tmp = root / step_dir_name(step), root / (step_dir_name(step) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    manifest = {"format": FORMAT, "version": VERSION, "step": step, "config": cfg.to_dict(),
                "layout": {"tp": 1, "pp": 1, "dp": ranks.dp, "virtual_stages": 1, "sequence_parallel": False,
                           "zero_stage": ranks.stage, "engine": "deepspeed", "converted_from": str(folder)},
                "data": {"prefix": cfg.data.prefix, "consumed_samples": int(model_states.get("global_samples", 0))},
                "optimizer": {"name": "adamw" if ranks.has_moments else "sgd", "step": ranks.step or step,
                              "has_state": with_optimizer},
                "rng": {"policy": "torch.manual_seed(train.seed + step) before every step"},
                "tensors": {}, "files": {}}
    begin = time.perf_counter()
    for i, batch in enumerate(_batches(_tensors(ranks, model_states, with_optimizer), max_file_bytes)):
        written = write_pieces(tmp, i, batch)                 # shard-{i:05d}.safetensors
        manifest["files"][written["file"]] = written["sha256"]
        for name, entry in written["entries"].items():
            manifest["tensors"][name] = {"shape": entry["shape"], "dtype": entry["dtype"], "pieces": [entry["piece"]]}
    commit(tmp, final, manifest, latest_root=root)
    print(f"convert: {folder} (ZeRO-{ranks.stage}, dp {ranks.dp}) -> {final} in "
          f"{time.perf_counter() - begin:.1f}s", flush=True)
    return final


def deepspeed_logits_fn(ds_dir, model_config, tag=None):
    """``--verify``'s "before" side: the model as DeepSpeed itself stored it (``mp_rank_00_model_states.pt``,
    read with weights_only). ZeRO-1/2 keep the whole module there; ZeRO-3 keeps only partitions, and
    consolidating them would mean DeepSpeed's own loader, which unpickles, so it is refused."""
    from megalm.model.transformer import ModelChunk
    from megalm.parallel.topology import TensorParallel

    ds_dir = Path(ds_dir)
    folder = ds_dir / _resolve_tag(ds_dir, tag)
    states = _load(folder / "mp_rank_00_model_states.pt")
    module = {_megalm_name(k): v for k, v in states["module"].items()}
    model = ModelChunk(model_config, TensorParallel(), range(model_config.num_layers), True, True)
    if any(t.numel() == 0 for t in module.values()) or set(module) != set(model.state_dict()):
        raise DeepSpeedCheckpointError(
            f"{folder}: the module states hold partitions (ZeRO-3), not the whole model; --verify cannot "
            f"compare without consolidating through DeepSpeed's loader, which unpickles. Convert without "
            f"--verify, or verify against `deepspeed.utils.zero_to_fp32` on a checkpoint you trust")
    model.load_state_dict({k: v.float() for k, v in module.items()})
    model.eval()
    return lambda tokens: model(tokens)
