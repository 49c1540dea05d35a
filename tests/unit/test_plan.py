"""megalm plan: layouts the rule book accepts, their memory from exact parameter counts and ZeRO's formulas, and
the rule (or the memory) that rejects the others."""
import json
import time

import pytest

from megalm.bench.plan import GIB, Layout, main, parameters_per_rank, plan, shared_embedding, state_bytes_per_parameter
from megalm.config import ConfigError, ModelConfig, load_config


def test_llama_70b_on_1024_gpus_of_80gb_lists_the_layouts_that_fit_in_seconds(tmp_path, capsys):
    started = time.perf_counter()
    assert main(["--config", "configs/llama-70b.yaml", "--gpus", "1024", "--gpu-memory", "80GB",
                 "--out", str(tmp_path)]) == 0
    seconds = time.perf_counter() - started
    out = capsys.readouterr().out
    assert seconds < 20, seconds                    # 0.7 s for 4,788 layouts here
    result = json.loads((tmp_path / "bench_plan.json").read_text())["results"]
    fits = {row["layout"]: row for row in result["fits"]}
    assert fits and all(row["total"] <= 80 * GIB for row in fits.values())
    assert "tp8 pp4v4 dp32 zero1 sp rc=none mb1" in fits                # Llama-3 70B's published kind of layout
    assert "tp1 pp1 dp1024 zero0 rc=none mb1" not in fits               # 70B x 16 bytes on one rank: 1 TB
    assert any(reason.startswith("memory: needs more than 80 GiB") for reason in result["rejected"])
    assert any("not divisible by parallel.pp x parallel.virtual_stages" in r for r in result["rejected"])
    steps = [row["step_s"] for row in result["fits"]]
    assert steps == sorted(steps)                                     # ranked by estimated step time
    assert "GiB/rank" in out and "closest that does not fit" in out


def test_parameter_counts_are_the_built_models():
    import torch

    from megalm.model.transformer import ModelChunk
    from megalm.parallel.topology import TensorParallel

    for model in (ModelConfig(vocab_size=512, hidden_size=64, num_layers=3, num_heads=4, max_seq_len=64),
                  ModelConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                              ffn_hidden_size=160, norm="rmsnorm", activation="swiglu", position="rope",
                              bias=False, tie_embeddings=False, qk_norm=True, head_dim=24)):
        first, block, last = parameters_per_rank(model, 1)
        whole = ModelChunk(model, TensorParallel(), range(model.num_layers), True, True)
        counted = first + model.num_layers * block + last - shared_embedding(model, 1)   # a tied head: one copy
        assert counted == sum(p.numel() for p in whole.parameters())
        with torch.device("meta"):
            shard = ModelChunk(model, TensorParallel(size=2), range(model.num_layers), True, True)
        first, block, last = parameters_per_rank(model, 2)
        counted = first + model.num_layers * block + last - shared_embedding(model, 2)
        assert counted == sum(p.numel() for p in shard.parameters())


@pytest.mark.parametrize("dp", [1, 8, 64])
def test_model_states_follow_zeros_formulas(dp):
    assert state_bytes_per_parameter("bf16", 0, dp) == 16
    assert state_bytes_per_parameter("bf16", 1, dp) == pytest.approx(4 + 12 / dp)
    assert state_bytes_per_parameter("bf16", 2, dp) == pytest.approx(2 + 14 / dp)
    assert state_bytes_per_parameter("bf16", 3, dp) == pytest.approx(16 / dp)
    assert state_bytes_per_parameter("fp32", 0, dp) == 16


def test_each_rejected_layout_is_named_by_its_rule():
    cfg = load_config("configs/tiny.yaml", ["model.vocab_size=512", "train.global_batch_size=8"])
    result = plan(cfg, 8, 4 * GIB, gpus_per_node=8)
    heads = [r for r in result["rejected"] if "num_heads" in r]
    assert heads, result["rejected"]                      # tiny has 4 heads: tp = 8 cannot split them
    labels = {row["layout"].label() for row in result["fits"]}
    assert "tp8 pp1 dp1 zero0 rc=none mb1" not in labels and "tp2 pp1 dp4 zero0 rc=none mb1" in labels
    assert isinstance(result["fits"][0]["layout"], Layout)


def test_an_unknown_gpu_is_refused_naming_the_table():
    with pytest.raises(ConfigError, match="not in the datasheet table"):
        main(["--config", "configs/tiny.yaml", "--gpus", "8", "--gpu", "Z9000"])
