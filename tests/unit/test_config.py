"""Config parsing and the validation rules: every message names the numbers and the fix."""
import glob

import pytest

from megalm.config import ConfigError, load_config
from megalm.config.rules import validate


def check(overrides, world=None):
    cfg = load_config(None, overrides)
    validate(cfg, world)
    return cfg


@pytest.mark.parametrize("overrides,world,needles", [
    (["model.num_heads=6", "model.hidden_size=96", "parallel.tp=4"], 4,
     ["num_heads=6", "parallel.tp=4", "use a tp that divides 6"]),
    (["model.num_kv_heads=3", "model.num_heads=6", "model.hidden_size=96", "parallel.tp=2"], 2,
     ["num_kv_heads=3", "tp=2", "use a tp that divides it"]),
    (["model.num_layers=6", "parallel.pp=4"], 4, ["num_layers=6", "4 x 1 = 4", "give parallel.pipeline_layers"]),
    (["model.num_layers=8", "parallel.pp=2", "parallel.virtual_stages=3"], 2, ["2 x 3 = 6", "change one of them"]),
    (["train.global_batch_size=10", "train.micro_batch_size=4"], 1,
     ["global_batch_size=10", "4 x 1 = 4", "multiple of 4"]),
    (["train.global_batch_size=16", "train.micro_batch_size=4"], 3, ["4 x 3 = 12", "multiple of 12"]),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "data.seq_len=127", "model.max_seq_len=128"], 2,
     ["seq_len=127", "tp=2", "sequence length divisible by 2"]),
    (["parallel.tp=2"], 3, ["world size 3", "tp x pp", "launch a multiple of 2 processes"]),
    (["parallel.tp=2", "parallel.dp=2"], 2, ["world size 2", "launch 4 processes or set parallel.dp=1"]),
    (["model.vocab_size=1001", "parallel.tp=2"], 2, ["vocab_size=1001", "pad it to a multiple of 2"]),
    (["parallel.pp=2", "parallel.virtual_stages=2", "model.num_layers=4", "train.global_batch_size=24",
      "train.micro_batch_size=8"], 2, ["multiple of parallel.pp=2", "= 3", "raise train.global_batch_size"]),
    (["parallel.zero_offload=true", "parallel.zero_stage=1"], 1, ["zero_offload", "2 or 3", "(got 1)"]),
    (["data.seq_len=512"], 1, ["data.seq_len=512", "lower data.seq_len or raise model.max_seq_len"]),
    (["kernels.cross_entropy=triton", "parallel.tp=2"], 2,
     ["kernels.cross_entropy=triton", "parallel.tp=1 (got 2)", "Use kernels.cross_entropy=auto or torch"]),
    (["parallel.pp=2", "parallel.pipeline_layers=[5,-1]"], 2, ["pipeline_layers=[5, -1]", "non-negative whole"]),
    (["parallel.pp=2", "parallel.pipeline_layers=[1.5,2.5]"], 2, ["[1.5, 2.5]", "non-negative whole"]),
    (["parallel.pp=2", "parallel.pipeline_layers=[1,2]"], 2, ["must list 2 counts", "(they sum to 3)"]),
    (["parallel.pp=2", "parallel.schedule=gpipe", "parallel.virtual_stages=2"], 2,
     ["parallel.schedule=gpipe", "virtual_stages=2", "set parallel.schedule=interleaved"]),
    (["parallel.pp=2", "parallel.schedule=interleaved"], 2, ["needs parallel.virtual_stages >= 2"]),
    (["parallel.pp=2", "parallel.virtual_stages=2", "train.device=cuda"], 2, ["not supported on NCCL", "pp >= 3"]),
    (["train.initial_loss_scale=3000"], 1, ["train.initial_loss_scale=3000.0", "power of two", "e.g. 65536"]),
])
def test_invalid_layouts_name_numbers(overrides, world, needles):
    with pytest.raises(ConfigError) as err:
        check(overrides, world)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_schedule_auto_follows_virtual_stages_and_explicit_lists_are_kept():
    assert load_config(None, ["parallel.pp=2"]).schedule == "1f1b"
    assert load_config(None, ["parallel.pp=2", "parallel.virtual_stages=2"]).schedule == "interleaved"
    assert load_config(None, ["parallel.pp=2", "parallel.schedule=gpipe"]).schedule == "gpipe"
    cfg = check(["parallel.pp=2", "model.num_layers=4", "parallel.pipeline_layers=[1,3]"], 2)
    assert cfg.parallel.pipeline_layers == [1, 3]


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError, match="did you mean 'model.hidden_size'"):
        load_config(None, ["model.hiden_size=3"])
    with pytest.raises(ConfigError, match="did you mean 'parallel'"):
        load_config(None, ["paralel.tp=2"])


def test_types_are_checked():
    with pytest.raises(ConfigError, match="must be an integer"):
        load_config(None, ["parallel.tp=two"])
    with pytest.raises(ConfigError, match="true or false"):
        load_config(None, ["parallel.sequence_parallel=maybe"])
    with pytest.raises(ConfigError, match="not one of"):
        check(["model.norm=batchnorm"])


def test_presets_resolve_by_name_and_unknown_names_list_them():
    from megalm.config import deepspeed_json_path, resolve_config_file

    assert resolve_config_file("llama-7b").name == "llama-7b.yaml"
    assert load_config("tiny").model.hidden_size == load_config("configs/tiny.yaml").model.hidden_size
    assert deepspeed_json_path("zero3").name == "zero3.json"
    with pytest.raises(ConfigError, match=r"not a preset name \(gpt2-124m, .*tiny\)"):
        load_config("tiny-typo")
    with pytest.raises(ConfigError, match="one of zero1, zero2, zero3, zero3_offload"):
        deepspeed_json_path("zero9")


def test_overrides_apply_in_order_and_parse_types():
    cfg = load_config("configs/tiny.yaml", ["train.steps=7", "optimizer.lr=1e-2", "train.steps=9"])
    assert cfg.train.steps == 9 and cfg.optimizer.lr == 0.01 and cfg.model.vocab_size is None


@pytest.mark.parametrize("path", sorted(glob.glob("configs/*.yaml")))
def test_presets_are_valid(path):
    cfg = load_config(path, ["model.vocab_size=32768"])
    validate(cfg)
    assert cfg.model.vocab_size == 32768


def test_valid_layouts_pass():
    check(["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true", "model.num_kv_heads=1",
           "train.global_batch_size=16"], 8)
    check(["parallel.pp=2", "parallel.virtual_stages=2", "train.global_batch_size=16"], 2)


def test_deepspeed_native_checkpoints_need_deepspeed_and_one_stage():
    with pytest.raises(ConfigError, match="checkpoint.deepspeed_native"):
        check(["checkpoint.deepspeed_native=true"], 1)
    with pytest.raises(ConfigError, match=r"pp=2"):
        check(["checkpoint.deepspeed_native=true", "parallel.zero_stage=1", "parallel.pp=2", "model.num_layers=2",
               "train.global_batch_size=8"], 2)
    check(["checkpoint.deepspeed_native=true", "parallel.zero_stage=1"], 1)
