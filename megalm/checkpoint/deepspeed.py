"""DeepSpeed ZeRO checkpoints (stage 1, 2 or 3, with or without tensor parallelism) into megalm's layout-free
format, streamed.

DeepSpeed's own ``zero_to_fp32`` loads every data-parallel rank's optimizer file whole and concatenates them
(over 1 TB of RAM for an 80B model), and reads one model-parallel rank only. Here each rank's file is
memory-mapped (``torch.load(mmap=True, weights_only=True)``) and one parameter is assembled at a time, its fp32
weight and Adam moments cut from the ranks' flat partitions; pieces go to disk in safetensors files of at most
``max_file_bytes`` each, so memory stays at one file's worth no matter how large the optimizer state.

Layouts, as DeepSpeed 0.19 writes them (``zero_pp_rank_{r}_mp_rank_{m:02d}_optim_states.pt`` for each DP rank r
of each model-parallel rank m; megalm's model-parallel rank is its tensor-parallel rank):
- ZeRO-1/2: per parameter group a flat fp32 vector (the group's parameters back to back, padded at the end)
  cut into dp equal slices; rank r holds slice r (``single_partition_of_fp32_groups``).
- ZeRO-3: every parameter is cut into dp slices of ceil(numel / dp) (the last padded); rank r's flat group
  holds its slice of each parameter back to back (``fp32_flat_groups``).
Adam's ``exp_avg``/``exp_avg_sq`` have the layout of the fp32 weights they belong to. Under tensor parallelism
each mp rank's parameters are its tp slices; they are stored as pieces with their ShardSpecs.
"""
from __future__ import annotations

import dataclasses
import math
import re
import shutil
import time
from pathlib import Path

import torch

from megalm.checkpoint.format import checkpoints_root, commit, step_dir_name
from megalm.checkpoint.layout import ConvertError, check_target_layout, meta_chunks
from megalm.checkpoint.manifest import add_tokenizer, add_written, layout_entry, new_manifest
from megalm.checkpoint.save import write_pieces
from megalm.config import Config
from megalm.data.tokenizer import tokenizer_path
from megalm.parallel.shard import ShardSpec

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
            lines = str(e).splitlines() or [type(e).__name__]
            detail = next((line.strip() for line in lines if "Unsupported global" in line), lines[0])
            raise DeepSpeedCheckpointError(f"{path} cannot be read safely: torch.load(weights_only=True) refused it "
                                           f"({detail}); megalm never unpickles other objects") from None


def _field(state, key: str, path: Path):
    if not isinstance(state, dict) or key not in state:
        found = sorted(map(str, state))[:8] if isinstance(state, dict) else type(state).__name__
        raise DeepSpeedCheckpointError(f"{path} has no {key!r} (found {found}): not a DeepSpeed ZeRO checkpoint "
                                       f"file of a version this converter reads")
    return state[key]


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


def _rank_files(folder: Path) -> dict[int, list[Path]]:
    """model-parallel rank -> its data-parallel ranks' optimizer files, in data-parallel order."""
    files = sorted(folder.glob("*zero_pp_rank_*_mp_rank_*_optim_states.pt"),
                   key=lambda p: int(re.search(r"zero_pp_rank_(\d+)_", p.name).group(1)))
    if not files:
        raise DeepSpeedCheckpointError(f"{folder} has no zero_pp_rank_*_optim_states.pt: not a DeepSpeed ZeRO "
                                       f"checkpoint (ZeRO-0 checkpoints hold the whole model in mp_rank_00)")
    by_mp: dict[int, list[Path]] = {}
    for f in files:
        by_mp.setdefault(int(re.search(r"mp_rank_(\d+)", f.name).group(1)), []).append(f)
    if sorted(by_mp) != list(range(len(by_mp))) or len({len(v) for v in by_mp.values()}) != 1:
        raise DeepSpeedCheckpointError(
            f"{folder}: model-parallel ranks {sorted(by_mp)} with {sorted(len(v) for v in by_mp.values())} "
            f"data-parallel files each; a shard is missing (every mp rank needs the same number of files)")
    return dict(sorted(by_mp.items()))


def _model_states_file(folder: Path, mp_rank: int, first_optim_file: Path) -> Path:
    """ZeRO-1/2 write ``mp_rank_XX_model_states.pt``; ZeRO-3 one per data-parallel rank (shapes alike)."""
    whole = folder / f"mp_rank_{mp_rank:02d}_model_states.pt"
    return whole if whole.exists() else folder / first_optim_file.name.replace("optim_states", "model_states")


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
        self.states = [_field(_load(f), "optimizer_state_dict", f) for f in files]
        first = self.states[0]
        self.stage = int(_field(first, "zero_stage", files[0]))
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


def _tp_specs(model_config, tp: int, tp_rank: int) -> dict:
    """megalm parameter name -> ShardSpec at tensor-parallel rank ``tp_rank`` of ``tp`` (from a meta model)."""

    return {name: (p.shard, p.shape) for name, p in meta_chunks(model_config, tp, tp_rank, 1, 0)[0].named_parameters()}


def _tensors(ranks: _Ranks, model_states: dict, with_optimizer: bool, specs: dict, tp_rank: int):
    """(layout-free name, fp32 tensor, ShardSpec) for every weight and moment of one model-parallel rank, one
    parameter at a time; replicated parameters come from tensor-parallel rank 0 only."""
    cut = _stage3_values if ranks.stage == 3 else _stage12_values
    offsets: dict[int, int] = {}
    for group, ds_name, shape in _parameters(model_states):
        start = offsets.get(group, 0)
        name = _megalm_name(ds_name)
        if name not in specs:
            raise DeepSpeedCheckpointError(f"DeepSpeed parameter {ds_name!r} has no place in the megalm model of "
                                           f"--config: the checkpoint is of another model")
        spec, local_shape = specs[name]
        if shape != local_shape:
            raise DeepSpeedCheckpointError(
                f"DeepSpeed parameter {ds_name!r} has shape {list(shape)} at model-parallel rank {tp_rank}, but the "
                f"model of --config at tp={spec.parts if spec.dim is not None else 'any'} needs {list(local_shape)}: "
                f"the checkpoint is of another model config")
        value, offsets[group] = cut(ranks, group, start, shape, None)
        if (spec.dim is None or spec.parts == 1) and tp_rank != 0:
            continue
        yield f"model.{name}", value, spec
        for key in MOMENTS if with_optimizer else ():
            yield f"optim.{key}.{name}", cut(ranks, group, start, shape, key)[0], spec


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
    ``out_dir`` (a run dir: ``out_dir/checkpoints/step_N``); returns the step folder. Single process; the
    model-parallel ranks (tensor-parallel, pp = 1) are read one after another.

    ``model_config``: the ModelConfig (or whole Config) the checkpoint was trained with; it goes into the
    manifest so that ``megalm train/eval/generate`` can load the result."""
    ds_dir = Path(ds_dir)
    folder = ds_dir / _resolve_tag(ds_dir, tag)
    if not folder.is_dir():
        raise DeepSpeedCheckpointError(f"{folder} does not exist")
    by_mp = _rank_files(folder)
    cfg = model_config if isinstance(model_config, Config) else Config(model=dataclasses.replace(model_config))
    tp = len(by_mp)
    _check_model_parallel(cfg, tp, folder)
    first = _Ranks(by_mp[0])
    states = _load(_model_states_file(folder, 0, by_mp[0][0]))
    with_optimizer = with_optimizer and first.has_moments
    step = int(states.get("global_steps", first.step or 0))
    manifest = _manifest(cfg, step, tp, first, states, with_optimizer, folder)
    del first, states
    root = checkpoints_root(out_dir)
    final, tmp = root / step_dir_name(step), root / (step_dir_name(step) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    begin = time.perf_counter()
    try:
        _write_model_parallel_ranks(by_mp, folder, cfg, with_optimizer, max_file_bytes, tmp, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)                     # nothing half-written stays behind
        raise
    from megalm.data.blend import tokenizer_prefix
    prefix = tokenizer_prefix(cfg.data)
    add_tokenizer(tmp, manifest, tokenizer_path(prefix) if prefix else None)
    commit(tmp, final, manifest, latest_root=root)
    print(f"convert: {folder} (ZeRO-{manifest['layout']['zero_stage']}, tp {tp}, dp {manifest['layout']['dp']}) "
          f"-> {final} in {time.perf_counter() - begin:.1f}s", flush=True)
    return final


def _write_model_parallel_ranks(by_mp, folder, cfg, with_optimizer, max_file_bytes, tmp, manifest) -> None:
    """Each mp rank's parameters as pieces in safetensors files of at most ``max_file_bytes``; fills manifest."""
    batch_index = 0
    for mp_rank, files in by_mp.items():
        model_states = _load(_model_states_file(folder, mp_rank, files[0]))
        ranks = _Ranks(files)
        specs = _tp_specs(cfg.model, len(by_mp), mp_rank)
        for batch in _batches(_tensors(ranks, model_states, with_optimizer, specs, mp_rank), max_file_bytes):
            add_written(manifest, write_pieces(tmp, batch_index, batch))  # shard-{batch_index:05d}.safetensors
            batch_index += 1
        del ranks, model_states                                   # unmap this mp rank's files


def _check_model_parallel(cfg: Config, tp: int, folder: Path) -> None:
    """DeepSpeed names files by megalm's model-parallel rank, which is the tensor-parallel rank: the mp ranks are
    the tp ranks, and files of several pipeline stages would collide in one folder."""
    if cfg.parallel.pp > 1:
        raise DeepSpeedCheckpointError(
            f"--config has parallel.pp={cfg.parallel.pp}: DeepSpeed's file names carry no pipeline stage, so a "
            f"pp > 1 DeepSpeed checkpoint cannot be told apart; convert megalm's own checkpoint of that run "
            f"(megalm convert layout), which every megalm run writes")
    try:
        check_target_layout(cfg.model, tp, 1, 1)
    except ConvertError as e:
        raise DeepSpeedCheckpointError(f"{folder} holds {tp} model-parallel ranks (tp={tp}), but {e}") from e


def _manifest(cfg: Config, step: int, tp: int, ranks: _Ranks, model_states: dict, with_optimizer: bool,
              folder: Path) -> dict:
    layout = layout_entry(tp, 1, ranks.dp, zero_stage=ranks.stage, engine="deepspeed", converted_from=str(folder))
    return new_manifest(step, cfg.to_dict(), layout, cfg.data.prefix, int(model_states.get("global_samples", 0)),
                        "adamw" if ranks.has_moments else "sgd", ranks.step or step, with_optimizer)


def deepspeed_consolidated(ds_dir, model_config, tag=None) -> dict:
    """The whole fp32 model (megalm names) as DeepSpeed's own ``zero_to_fp32`` consolidates it: an independent
    reading of the same shards, for ``--verify``. zero_to_fp32 handles one model-parallel rank, so each mp rank's
    files are linked into a folder of their own (renamed to mp_rank_00), consolidated there, and the tensor-
    parallel slices joined along their split dimension. Every ``torch.load`` it makes is forced to
    weights_only=True, with the same stand-ins as the converter: nothing in the checkpoint can run code."""
    import tempfile

    from megalm.engine.deepspeed.compat import import_deepspeed, zero_to_fp32_state_dict

    try:
        import_deepspeed()
    except ImportError as e:
        raise DeepSpeedCheckpointError(f"--verify of a DeepSpeed checkpoint consolidates it with DeepSpeed's "
                                       f"zero_to_fp32, which needs deepspeed installed: {e}") from e
    ds_dir = Path(ds_dir)
    folder = ds_dir / _resolve_tag(ds_dir, tag)
    by_mp = _rank_files(folder)
    tp = len(by_mp)
    slices: dict[str, list] = {}
    for mp_rank, files in by_mp.items():
        with tempfile.TemporaryDirectory() as tmp:
            linked = Path(tmp) / "tag"
            linked.mkdir()
            states = [folder / f"mp_rank_{mp_rank:02d}_model_states.pt"] + [
                folder / f.name.replace("optim_states", "model_states") for f in files]
            for f in files + states:
                if f.exists():
                    (linked / f.name.replace(f"mp_rank_{mp_rank:02d}", "mp_rank_00")).symlink_to(f.resolve())
            with _weights_only_loads():
                state = zero_to_fp32_state_dict(tmp, tag="tag")
        specs = _tp_specs(model_config, tp, mp_rank)
        for ds_name, value in state.items():
            name = _megalm_name(ds_name)
            slices.setdefault(name, []).append((specs[name][0], value))
    whole = {}
    for name, parts in slices.items():
        spec = parts[0][0]
        parts = sorted(parts, key=lambda part: part[0].index)
        whole[name] = torch.cat([v for _, v in parts], dim=spec.dim) if spec.is_sharded else parts[0][1]
    return whole


class _weights_only_loads:
    """Within the block, every torch.load is weights_only=True and knows DeepSpeed's few objects by name."""

    def __enter__(self):
        self.original, self.allowed = torch.load, torch.serialization.safe_globals(_safe_globals())
        original = self.original

        def safe_load(*args, **kwargs):
            return original(*args, **{**kwargs, "weights_only": True})

        torch.load = safe_load
        self.allowed.__enter__()
        return self

    def __exit__(self, *exc):
        torch.load = self.original
        self.allowed.__exit__(*exc)
        return False


def deepspeed_logits_fn(ds_dir, model_config, tag=None):
    """``--verify``'s "before" side: a tp = 1 model holding DeepSpeed's own consolidation of the checkpoint."""
    from megalm.model.transformer import ModelChunk
    from megalm.parallel.topology import TensorParallel

    model = ModelChunk(model_config, TensorParallel(), range(model_config.num_layers), True, True)
    model.load_state_dict({k: v.float() for k, v in deepspeed_consolidated(ds_dir, model_config, tag).items()})
    model.eval()
    return lambda tokens: model(tokens)
