"""LoRA checkpoints outward: read as the merged model, written as a plain megalm checkpoint (``convert
merge-lora``), as Hugging Face weights (``convert to-hf`` merges), or as a PEFT adapter folder (``convert to-peft``).

A LoRA run saves its adapters alone and names its base (``megalm.checkpoint.load.CheckpointReader.base``);
``MergedAdapters`` reads such a checkpoint as the model it computes: W + (alpha / r) B A for every adapted W,
the adapters themselves hidden.
"""
from __future__ import annotations

import json
from pathlib import Path

from megalm.checkpoint.convert_common import prepare_destination, reader_verified_alongside, write_checkpoint
from megalm.checkpoint.format import latest_checkpoint
from megalm.checkpoint.hf_config import hf_config_from_model
from megalm.checkpoint.layout import ConvertError
from megalm.checkpoint.writer import PlannedSafetensorsFile
from megalm.config import Config
from megalm.model.lora import adapter_pairs, is_adapter, merge

# megalm projection -> PEFT target module (Llama-family names, as transformers calls the layers)
PEFT_TARGETS = {"attn.wq": "q_proj", "attn.wk": "k_proj", "attn.wv": "v_proj", "attn.wo": "o_proj",
                "mlp.w_gate": "gate_proj", "mlp.w_up": "up_proj", "mlp.w_out": "down_proj"}
PEFT_PARENTS = {"attn": "self_attn", "mlp": "mlp"}


def holds_adapters(reader) -> bool:
    return any(is_adapter(n) for n in reader.manifest["tensors"])


def lora_settings(reader) -> dict:
    settings = reader.manifest["config"].get("lora") or {}
    if not settings.get("rank"):
        raise ConvertError(f"{reader.folder} holds adapters but its config has no lora.rank: it was not saved by "
                           f"a megalm LoRA run")
    return settings


class MergedAdapters:
    """A LoRA checkpoint read as its merged model (model tensors only; names and shapes of the base)."""

    def __init__(self, reader):
        self.reader = reader
        settings = lora_settings(reader)
        self.scale = settings["alpha"] / settings["rank"]
        names = [n[len("model."):] for n in reader.tensor_names() if n.startswith("model.")]
        self.pairs = {f"model.{w}": tuple(f"model.{x}" for x in ab) for w, ab in adapter_pairs(names).items()}
        self.names = [f"model.{n}" for n in names if not is_adapter(n)]

    def tensor_names(self) -> list[str]:
        return list(self.names)

    def global_shape(self, name: str) -> tuple:
        return self.reader.global_shape(name)

    def dtype_name(self, name: str) -> str:
        return self.reader.dtype_name(name)

    def read(self, name: str, spec=None, local_shape=None, optional: bool = False):
        if name not in self.pairs:
            return self.reader.read(name, spec, local_shape, optional)
        a, b = (self.reader.read(n) for n in self.pairs[name])
        merged = merge(self.reader.read(name), a, b, self.scale)
        return merged if spec is None else spec.view(merged)

    def byte_range(self, name: str, spec=None):
        return None if name in self.pairs else self.reader.byte_range(name, spec)


def open_adapters(src, otherwise: str):
    """(folder, reader, its verification in flight) of the LoRA checkpoint at ``src``; a checkpoint without
    adapters is refused, ``otherwise`` saying what to do instead."""
    folder = latest_checkpoint(src)
    if folder is None:
        raise ConvertError(f"no committed megalm checkpoint under {src}")
    reader, verified = reader_verified_alongside(folder)
    if not holds_adapters(reader):
        raise ConvertError(f"{folder} holds no LoRA adapters: {otherwise}")
    return folder, reader, verified


def convert_merge_lora(src, dst) -> dict:
    """A LoRA checkpoint's merged model as a plain megalm checkpoint (no adapters, no base to keep beside it),
    in the layout the base was saved in; the training state is not carried (a merged model starts afresh)."""
    folder, reader, verified = open_adapters(src, "there is nothing to merge")
    merged = MergedAdapters(reader)
    config = {**reader.manifest["config"], "lora": {**reader.manifest["config"]["lora"], "rank": 0}}
    cfg = Config.from_dict(config)
    layout = reader.base.manifest["layout"]
    tensors = {n: (merged.dtype_name(n), merged.global_shape(n)) for n in merged.tensor_names()}
    meta = {"step": reader.manifest["step"], "config": config, "data_prefix": reader.manifest["data"]["prefix"],
            "consumed_samples": 0, "optimizer_name": cfg.optimizer.name, "optimizer_step": 0,
            "has_optimizer_state": False}
    return write_checkpoint(Path(dst), cfg.model, tensors, merged.read, meta, layout["tp"], layout["pp"],
                            layout.get("virtual_stages", 1), folder / "tokenizer.json", "convert merge-lora",
                            before_commit=verified.result, locate=merged.byte_range)


def peft_key(name: str) -> tuple[str, str]:
    """megalm adapter tensor ``layers.L.attn.wq.lora.a`` -> (PEFT key, target module)."""
    layer, rest = name.split(".", 2)[1:]
    projection, which = rest.rsplit(".lora.", 1)
    if projection not in PEFT_TARGETS:
        raise ConvertError(f"{name}: no PEFT module for megalm projection {projection}")
    parent, _ = projection.split(".")
    target = PEFT_TARGETS[projection]
    ab = "lora_A" if which == "a" else "lora_B"
    return f"base_model.model.model.layers.{layer}.{PEFT_PARENTS[parent]}.{target}.{ab}.weight", target


def convert_to_peft(src, dst) -> dict:
    """A LoRA checkpoint's adapters as a PEFT folder (adapter_config.json, adapter_model.safetensors) for the
    Hugging Face model ``convert to-hf`` writes from the base checkpoint. Llama-family models only: GPT-2 fuses
    q, k and v into one Conv1D, on which separate adapters have no PEFT form."""
    folder, reader, verified = open_adapters(src, "train with lora.rank > 0, or use convert to-hf")
    settings = lora_settings(reader)
    model = Config.from_dict(reader.manifest["config"]).model
    if hf_config_from_model(model)["model_type"] == "gpt2":
        raise ConvertError("convert to-peft: GPT-2 fuses q, k and v into one Conv1D (c_attn), where megalm's "
                           "separate adapters have no PEFT form; use convert to-hf, which merges them")
    names = sorted(n[len("model."):] for n in reader.manifest["tensors"] if n.startswith("model.") and is_adapter(n))
    keys = [peft_key(n) for n in names]
    tensors = [reader.read(f"model.{n}") for n in names]
    empty = [n for n, t in zip(names, tensors) if t.numel() == 0]
    if empty:
        raise ConvertError(f"{folder}: adapters {empty[:3]} are empty; the checkpoint is damaged")
    tmp = prepare_destination(Path(dst))
    out = PlannedSafetensorsFile(tmp / "adapter_model.safetensors",
                                 [(k, t.dtype, tuple(t.shape)) for (k, _), t in zip(keys, tensors)], sha256=False)
    for (key, _), t in zip(keys, tensors):
        out.put(key, t.contiguous(), None)
    out.close()
    out.wait_durable()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": settings["rank"],
              "lora_alpha": settings["alpha"], "lora_dropout": settings["dropout"],
              "target_modules": sorted({target for _, target in keys}), "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "inference_mode": True,
              "base_model_name_or_path": str(reader.base.folder) if reader.base else None}
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=1))
    verified.result()
    dst = Path(dst)
    if dst.exists():
        dst.rmdir()
    tmp.rename(dst)
    total = sum(t.numel() * t.element_size() for t in tensors)
    print(f"convert to-peft: {len(tensors)} adapter tensors ({total / 1e6:.2f} MB) to {dst}", flush=True)
    return {"bytes": total, "tensors": len(tensors)}
