"""The DeepSpeed config dict of a run, built from a resolved config: megalm's batch, precision, ZeRO and clipping
settings, with the user's JSON (parallel.deepspeed_config) merged over them where it speaks. Resolution
(``megalm.config.resolve``) has already adopted what the JSON says about megalm's own settings, so nothing here
changes the config. Pure Python: no deepspeed import."""
from __future__ import annotations

import copy
import math

import torch

from megalm.config import Config
from megalm.config.deepspeed_json import BATCH_KEYS, read_deepspeed_json
from megalm.flops import matmul_params


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else copy.deepcopy(value)
    return out


def bucket_elements(cfg: Config) -> int:
    """DeepSpeed's reduce/all-gather bucket when the user's JSON names none: the configs/deepspeed/ value (5e7
    elements), but never much more than this rank's share of the model. DeepSpeed's own default (5e8) makes
    ZeRO-1 hold a 2 GB fp32 bucket per rank whatever the model's size."""
    m = cfg.model
    per_rank = sum(matmul_params(m).values()) // (cfg.parallel.tp * cfg.parallel.pp) if m.vocab_size else 0
    return int(min(50_000_000, max(per_rank, 1_000_000)))


def deepspeed_config_dict(cfg: Config, dp: int) -> dict:
    """The dict handed to ``deepspeed.initialize`` (and ``zero.Init``) for this run."""
    user = read_deepspeed_json(cfg.parallel.deepspeed_config)[0] if cfg.parallel.deepspeed_config else {}
    p, t = cfg.parallel, cfg.train
    bucket = bucket_elements(cfg)
    zero = {"stage": p.zero_stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if p.zero_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if p.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    ours = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accumulation_steps(dp),
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        # fp16: dynamic loss scaling (loss_scale 0) as megalm's own engine does it: halved at every overflow
        # (hysteresis 1), doubled after train.loss_scale_window clean steps
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0,
                 "initial_scale_power": int(math.log2(t.initial_loss_scale)),
                 "loss_scale_window": t.loss_scale_window, "hysteresis": 1, "min_loss_scale": 1},
        "zero_allow_untested_optimizer": True,   # megalm hands DeepSpeed a torch.optim instance (no JIT build)
        "zero_force_ds_cpu_optimizer": False,    # ... also under offload (no cpu_adam build)
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    merged = _deep_merge(ours, user)
    merged.update({k: ours[k] for k in BATCH_KEYS})
    merged["zero_optimization"]["stage"] = p.zero_stage
    return merged
