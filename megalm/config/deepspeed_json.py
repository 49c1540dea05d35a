"""A user's DeepSpeed JSON, read during resolution: what it says about megalm's own settings (ZeRO stage,
offload, precision, clipping, batch sizes) is adopted into the config being resolved, or refused when it
contradicts a value the user set. Pure JSON: deepspeed itself is imported only by ``megalm.engine.deepspeed``."""
from __future__ import annotations

import json

from megalm.config.load import deepspeed_json_path
from megalm.config.schema import Config, ConfigError

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def read_deepspeed_json(name: str) -> tuple[dict, str]:
    """(the JSON's content, a label naming its path for messages)."""
    path = deepspeed_json_path(name)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON ({e}); fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config {path} must hold a JSON object at its top level")
    return data, f"DeepSpeed config {path}"


def adopt_deepspeed_json(cfg: Config, dp: int) -> None:
    """Fold the JSON named by parallel.deepspeed_config into ``cfg`` (a config being resolved, not frozen)."""
    user, source = read_deepspeed_json(cfg.parallel.deepspeed_config)
    _adopt_settings(cfg, user, source)
    _adopt_batch(cfg, dp, user, source)


def _adopt_settings(cfg: Config, user: dict, source: str) -> None:
    p, t = cfg.parallel, cfg.train
    for section in ("optimizer", "scheduler"):
        if section in user:
            raise ConfigError(f"{source} has an {section!r} section; megalm builds the optimizer and learning-rate "
                              f"schedule from optimizer.* and lr.* (remove {section!r} from the JSON)")
    zero = user.get("zero_optimization", {})
    stage = zero.get("stage")
    if stage is not None and stage != p.zero_stage:
        if cfg.is_set("parallel.zero_stage"):
            raise ConfigError(f"{source} sets zero_optimization.stage={stage} but parallel.zero_stage="
                              f"{p.zero_stage}; make them agree or leave one unset")
        p.zero_stage = int(stage)
    if zero.get("offload_optimizer", {}).get("device") == "cpu":
        p.zero_offload = True
    wanted = [name for name in ("bf16", "fp16") if user.get(name, {}).get("enabled")]
    if len(wanted) > 1:
        raise ConfigError(f"{source} enables both bf16 and fp16; enable one")
    if wanted and wanted[0] != t.precision:
        if cfg.is_set("train.precision"):
            raise ConfigError(f"{source} enables {wanted[0]} but train.precision={t.precision}; make them agree")
        t.precision = wanted[0]
    if "gradient_clipping" in user:
        clip = float(user["gradient_clipping"])
        if cfg.is_set("train.grad_clip") and clip != t.grad_clip:
            raise ConfigError(f"{source} sets gradient_clipping={clip:g} but train.grad_clip={t.grad_clip:g}; "
                              f"make them agree or leave one unset")
        t.grad_clip = clip
    if p.zero_offload and p.zero_stage < 2:
        raise ConfigError(f"CPU offload needs ZeRO stage 2 or 3 (got {p.zero_stage} from {source})")


def _adopt_batch(cfg: Config, dp: int, user: dict, source: str) -> None:
    """DeepSpeed's train batch = micro batch x gradient accumulation x dp. The JSON's batch keys are adopted where
    the user did not set train.micro_batch_size / train.global_batch_size; what neither gives is completed as
    DeepSpeed itself would (accumulation 1 when only a train or only a micro batch is known; the config's micro
    batch when only an accumulation is). A contradiction names all four numbers of both sides."""
    t = cfg.train
    given = {k: user[k] for k in BATCH_KEYS if user.get(k, "auto") != "auto"}
    if not given:
        return                      # megalm's own numbers, checked by the rule book
    set_micro, set_total = cfg.is_set("train.micro_batch_size"), cfg.is_set("train.global_batch_size")
    clashes = [f"{key}={given[key]} but train.{name}={mine} (set in the config)" for name, key, mine, is_set in (
        ("micro_batch_size", "train_micro_batch_size_per_gpu", t.micro_batch_size, set_micro),
        ("global_batch_size", "train_batch_size", t.global_batch_size, set_total))
        if key in given and is_set and mine != given[key]]
    micro = given.get("train_micro_batch_size_per_gpu", t.micro_batch_size if set_micro else None)
    total = given.get("train_batch_size", t.global_batch_size if set_total else None)
    accum = given.get("gradient_accumulation_steps")
    if micro is None:
        micro = total / ((accum or 1) * dp) if total is not None else t.micro_batch_size
    if accum is None:
        accum = total / (micro * dp) if total is not None else 1
    if total is None:
        total = micro * accum * dp
    whole = all(float(v).is_integer() and v >= 1 for v in (micro, accum, total))
    if clashes or not whole or total != micro * accum * dp:
        mine = t.global_batch_size / (t.micro_batch_size * dp)
        raise ConfigError(
            f"batch sizes disagree{': ' + '; '.join(clashes) if clashes else ''}. DeepSpeed needs train batch = "
            f"micro batch x gradient accumulation x dp, each a whole number >= 1. {source} (completed with "
            f"megalm's values) gives train_batch_size={total:g}, micro batch {micro:g}, gradient accumulation "
            f"{accum:g}, dp={dp}: {micro:g} x {accum:g} x {dp} = {micro * accum * dp:g}; megalm has "
            f"train.global_batch_size={t.global_batch_size}, train.micro_batch_size={t.micro_batch_size}, "
            f"gradient accumulation {mine:g}, dp={dp}. Make them agree, drop the batch keys from the JSON (megalm "
            f"fills them), or leave train.micro_batch_size and train.global_batch_size unset")
    t.micro_batch_size, t.global_batch_size = int(micro), int(total)
