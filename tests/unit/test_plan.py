"""megalm plan: layouts the rule book accepts, their memory from exact parameter counts and ZeRO's formulas, and
the rule (or the memory) that rejects the others."""
import json
import time

import pytest

from megalm.bench.plan import main, plan
from megalm.bench.plan_model import GIB, Layout, parameters_per_rank, shared_embedding, state_bytes_per_parameter
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
    assert state_bytes_per_parameter("fp32", 0, dp) == 16                 # torch AdamW on the fp32 weights
    assert state_bytes_per_parameter("fp32", 1, dp) == pytest.approx(8 + 12 / dp)   # DeepSpeed adds a master


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


SHAPE = ["model.vocab_size=4096", "model.hidden_size=256", "model.num_layers=3", "model.num_heads=4",
         "data.seq_len=128", "model.max_seq_len=128", "train.micro_batch_size=2", "train.global_batch_size=4"]


def saved_by_a_real_forward(chunk) -> int:
    """Bytes of the distinct storages autograd saves in one forward of two 128-token samples, less the weights."""
    import torch

    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    tokens = torch.zeros(2, 128, dtype=torch.long)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunk(tokens, tokens)
    weights = {p.untyped_storage().data_ptr() for p in chunk.parameters()}
    return sum(size for ptr, size in seen.items() if ptr not in weights)


@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_activation_counts_on_meta_equal_what_a_real_forward_saves(checkpointing):
    import torch

    from megalm.bench.activations import saved_activation_bytes
    from megalm.config import resolve
    from megalm.parallel.parallelize import build_chunks
    from megalm.parallel.topology import build_topology

    cfg = resolve(load_config("tiny", SHAPE + [f"parallel.activation_checkpointing={checkpointing}"]), 1)
    real = {}
    for layers in (1, 2):
        one = cfg.mutable_copy()
        one.set("model.num_layers", layers)
        chunk = build_chunks(one, build_topology(), torch.device("cpu"))[0]
        real[layers] = saved_by_a_real_forward(chunk)
    per_layer, head = saved_activation_bytes(cfg.model, 1, False, checkpointing, 2, 128)
    if checkpointing == "full":     # checkpoint keeps the block's input, which autograd's hooks do not see
        assert per_layer == 2 * 128 * 256 * 4
    else:
        assert (per_layer, head) == (real[2] - real[1], 2 * real[1] - real[2])


@pytest.mark.parametrize("extra", [[], ["parallel.activation_checkpointing=full"], ["train.micro_batch_size=4"]])
def test_predicted_peak_memory_is_within_10_percent_of_measured_in_one_process(tmp_path, extra):
    from megalm.bench.plan_model import layout_of, memory_per_rank
    from megalm.bench.train import main as bench
    from megalm.config import resolve

    assert bench(["--steps", "1", "--warmup", "1", "--breakdown-steps", "0", "--tp", "0", "--no-baseline",
                  "--memory", "--out", str(tmp_path)] + SHAPE + extra) == 0
    row = next(iter(json.loads((tmp_path / "bench_train.json").read_text())["results"]["rows"].values()))
    cfg = resolve(load_config("tiny", SHAPE + extra), 1)
    lay = layout_of(cfg, 1)
    predicted = memory_per_rank(cfg, lay, cfg.train.global_batch_size // lay.micro_batch_size, "cpu")["total"]
    measured = row["peak_tensor_bytes_max"]
    print(f"{extra}: predicted {predicted / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB")
    assert abs(predicted - measured) / measured < 0.10, (predicted, measured)


def test_a_machine_interpolates_its_measured_collective_table_and_round_trips(tmp_path):
    from megalm.bench.machine import Machine

    machine = Machine(device="cpu", collective_table=[[1024.0, 1e-4], [1 << 20, 1e-3], [8 << 20, 6e-3]],
                      latency_s={"intra": 1e-4, "inter": 2e-4}, bandwidth={"intra": 1e9, "inter": 1e8})
    assert machine.collective_seconds(512, True) == 1e-4                             # below the table: its floor
    middle = (1024 + (1 << 20)) / 2
    assert machine.collective_seconds(middle, True) == pytest.approx((1e-4 + 1e-3) / 2)
    beyond = machine.collective_seconds(15 << 20, True)                               # the last slope onwards
    assert beyond == pytest.approx(6e-3 + (7 << 20) * 5e-3 / (7 << 20))
    assert machine.collective_seconds(1 << 20, False) == pytest.approx(2e-4 + (1 << 20) / 1e8)   # across nodes
    assert Machine.load(machine.save(tmp_path / "machine.json")) == machine


def test_the_fused_loss_kernel_is_counted_as_it_runs_on_a_gpu():
    """At tp = 1 on a GPU the head's loss is the fused kernel: the meta count with its stand-in equals what the real
    kernel function (its chunked PyTorch path, here) keeps, and the head then keeps no logits."""
    from megalm.bench.activations import saved_activation_bytes
    from megalm.config import resolve
    from megalm.kernels.cross_entropy import linear_cross_entropy
    from megalm.model.transformer import ModelChunk, init_chunk, reference_ops
    from megalm.parallel.topology import TensorParallel

    cfg = resolve(load_config("tiny", SHAPE), 1)
    real = {}
    for layers in (1, 2):
        ops = reference_ops()
        ops._linear_cross_entropy = linear_cross_entropy
        chunk = ModelChunk(cfg.model, TensorParallel(), range(layers), True, True, ops)
        init_chunk(chunk, cfg.model, 0)
        real[layers] = saved_by_a_real_forward(chunk)
    fused = saved_activation_bytes(cfg.model, 1, False, "none", 2, 128, fused_loss=True)
    assert fused == (real[2] - real[1], 2 * real[1] - real[2])
    logits = 2 * 128 * 4096 * 4                                 # two more samples' fp32 logits
    grows = {kind: saved_activation_bytes(cfg.model, 1, False, "none", 4, 128, fused_loss=kind)[1]
             - saved_activation_bytes(cfg.model, 1, False, "none", 2, 128, fused_loss=kind)[1] for kind in (0, 1)}
    assert grows[0] >= logits > grows[1]                        # the fused kernel keeps no logits per token
