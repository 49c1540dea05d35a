"""DeepSpeed ZeRO 0-3 as the data-parallel engine: the same training as one native process.

Every run trains the tiny model from the same layout-free initialisation on the same data; 2 or 4 gloo processes
under DeepSpeed must reproduce the single-process native engine's loss curve (relative 1e-5) and final weights
(read back from both runs' layout-free checkpoints). SGD with active clipping catches gradient-scale errors
(a loss divided by the accumulation count twice, say) that AdamW's normalised steps would hide; AdamW is the
curve the issue names.
"""
import json

import pytest
import torch

from megalm.checkpoint.format import latest_checkpoint
from megalm.checkpoint.load import CheckpointReader
from megalm.config import ConfigError, load_config
from megalm.runtime.spawn import run_distributed
from megalm.train.loop import train
from megalm.train.metrics import read_metrics
from tests.conftest import STRESS, tiny_overrides

ZERO3_JSON = "configs/deepspeed/zero3.json"    # persistence threshold 0: every tensor really partitioned
STEPS = 20
ADAMW = {"optimizer.name": "adamw", "optimizer.lr": 1e-2, "train.grad_clip": 1.0}
SGD = {"optimizer.name": "sgd", "optimizer.lr": 0.5, "train.grad_clip": 0.5}   # clipping active every step


def _train(rank, world, overrides):
    train(load_config(None, overrides))


def run(prefix, run_dir, world=1, **extra):
    overrides = tiny_overrides(prefix, run_dir, **{"train.steps": STEPS, **extra})
    if world == 1:
        train(load_config(None, overrides))
    else:
        run_distributed(_train, world, overrides)
    return run_dir


def losses(run_dir):
    by_step = {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}
    return [by_step[s] for s in sorted(by_step)]


def weights(run_dir):
    reader = CheckpointReader(latest_checkpoint(run_dir))
    return {n: reader.read(n).float() for n in reader.manifest["tensors"] if n.startswith("model.")}


def assert_same_training(ref, got, adam=False):
    """Loss curves within relative 1e-5. Weights: SGD within rtol 1e-5 / atol 1e-6. Adam divides each update
    by sqrt(exp_avg_sq), so a gradient that is zero in exact arithmetic (the key bias: softmax ignores a
    shift of all scores) turns fp32 reduction-order noise into full-size steps; for AdamW the key biases are
    skipped and the rest compared at rtol 1e-4 / atol 1e-5 (the notes' AdamW noise floor is 8e-6)."""
    a, b = losses(ref), losses(got)
    assert len(a) == len(b) == STEPS
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-5, atol=0)
    wa, wb = weights(ref), weights(got)
    assert wa.keys() == wb.keys()
    rtol, atol = (1e-4, 1e-5) if adam else (1e-5, 1e-6)
    for name in wa:
        if not (adam and name.endswith("attn.wk.bias")):
            torch.testing.assert_close(wb[name], wa[name], rtol=rtol, atol=atol, msg=name)


@pytest.fixture(scope="module")
def native(tiny_corpus, tmp_path_factory):
    """Single-process native reference runs, by name, computed once."""
    cache = {}

    def get(name, **extra):
        if name not in cache:
            cache[name] = run(tiny_corpus, tmp_path_factory.mktemp(f"native-{name}"),
                              **{"parallel.engine": "native", **extra})
        return cache[name]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_on_two_processes_equals_one_process(tiny_corpus, tmp_path, native, stage):
    extra = {"parallel.zero_stage": stage, "parallel.engine": "deepspeed"}
    if stage == 3:
        extra["parallel.deepspeed_config"] = ZERO3_JSON
    assert_same_training(native("adamw", **ADAMW), run(tiny_corpus, tmp_path / "adamw", 2, **ADAMW, **extra),
                         adam=True)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_sgd_with_clipping_equals_one_process(tiny_corpus, tmp_path, native, stage):
    extra = {"parallel.zero_stage": stage, "train.steps": STEPS}
    if stage == 3:
        extra["parallel.deepspeed_config"] = ZERO3_JSON
    assert_same_training(native("sgd", **SGD), run(tiny_corpus, tmp_path, 2, **SGD, **extra))


def _tp_dp_zero3(rank, world, overrides):
    """Check first that zero.Init left each rank with ~1/(tp x dp) of the model, then train."""
    from megalm.config import resolve
    from megalm.engine.deepspeed.zero3 import build_deepspeed_chunks
    from megalm.parallel.topology import build_topology

    cfg = resolve(load_config(None, overrides + ["model.vocab_size=512"]), world)
    topo = build_topology(cfg.parallel.tp, cfg.parallel.pp)
    chunks = build_deepspeed_chunks(cfg, topo, torch.device("cpu"))
    held = sum(p.ds_tensor.numel() for c in chunks for p in c.parameters())
    tp_slice = sum(p.ds_numel for c in chunks for p in c.parameters())
    assert all(p.numel() == 0 for c in chunks for p in c.parameters())      # nothing gathered at rest
    assert held <= tp_slice / topo.dp + 64 * len(list(chunks[0].parameters())), (held, tp_slice)
    del chunks
    train(load_config(None, overrides))


@pytest.mark.slow
def test_tp2_dp2_zero3_equals_one_process(tiny_corpus, tmp_path, native):
    overrides = tiny_overrides(tiny_corpus, tmp_path, **{
        "train.steps": STEPS, **SGD, "parallel.tp": 2, "parallel.zero_stage": 3,
        "parallel.deepspeed_config": ZERO3_JSON})
    run_distributed(_tp_dp_zero3, 4, overrides)
    assert_same_training(native("sgd", **SGD), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_pp2_dp2_equals_one_process(tiny_corpus, tmp_path, native, stage):
    """1F1B with 2 micro-batches per rank (m <= pp: ZeRO-3's trap 4), tied embeddings across the stages."""
    batch = {"train.global_batch_size": 8}
    extra = {"parallel.pp": 2, "parallel.zero_stage": stage, **batch}
    if stage == 3:
        extra["parallel.deepspeed_config"] = ZERO3_JSON
    assert_same_training(native("sgd-b8", **SGD, **batch), run(tiny_corpus, tmp_path, 4, **SGD, **extra))


@pytest.mark.slow
@pytest.mark.parametrize("stage,precision", [(3, "fp32"), (0, "bf16")])
def test_resume_equals_uninterrupted_run(tiny_corpus, tmp_path, stage, precision):
    """Bit-exact resume, from an asynchronous save (steps 2 and 4 write in the background; the stop at 5 is
    synchronous, and the run resumes from step 4's). ZeRO-0 in bf16 keeps its fp32 masters and Adam moments
    outside DeepSpeed's per-parameter API (FP16_UnfusedOptimizer's fp32_groups): saved and restored through
    them."""
    extra = {**ADAMW, "train.steps": 8, "parallel.zero_stage": stage, "parallel.engine": "deepspeed",
             "train.precision": precision, "checkpoint.interval": 2}
    if stage == 3:
        extra["parallel.deepspeed_config"] = ZERO3_JSON
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(tiny_corpus, straight, 2, **extra)
    run(tiny_corpus, resumed, 2, **extra, **{"train.stop_at_step": 5})
    saves = [(r["step"], r["checkpoint_async"]) for r in read_metrics(resumed) if "checkpoint_async" in r]
    assert saves == [(2, True), (4, True), (5, False)]
    run(tiny_corpus, resumed, 2, **extra, **{"checkpoint.load": str(resumed / "checkpoints" / "step_0000004")})
    assert losses(straight) == losses(resumed)
    a, b = weights(straight), weights(resumed)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("stage,pp", [(0, 1), (3, 1), (1, 2)] + ([(1, 1), (2, 1)] if STRESS else []))
def test_bf16_trains_and_stays_near_fp32(tiny_corpus, tmp_path, native, stage, pp):
    """bf16 weights (DeepSpeed keeps fp32 masters) on every ZeRO stage at dp=2, and pp=2 x dp=2 under ZeRO-1
    (the combination that crashes or hangs in DeepSpeed's own pipeline engine; megalm drives it with its own
    1F1B schedule): the loss falls, the curve stays within 0.01 nats of the fp32 one (bf16 has 8 mantissa bits;
    measured gap 0.0013-0.0034), and the checkpoint counts exactly STEPS AdamW steps (ZeRO-0's optimizer
    wrapper takes one of its own at start-up, which megalm undoes: with it the gap was 0.033)."""
    batch = {"train.global_batch_size": 8} if pp > 1 else {}
    extra = {"parallel.zero_stage": stage, "parallel.engine": "deepspeed", "parallel.pp": pp,
             "train.precision": "bf16", **batch}
    if stage == 3:
        extra["parallel.deepspeed_config"] = ZERO3_JSON
    fp32 = losses(native("adamw-b8" if batch else "adamw", **ADAMW, **batch))
    bf16 = losses(run(tiny_corpus, tmp_path, 2 * pp, **ADAMW, **extra))
    assert len(bf16) == len(fp32) == STEPS
    assert sum(bf16[-5:]) / 5 < sum(bf16[:5]) / 5 - 0.3
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) < 0.01, list(zip(fp32, bf16))
    assert CheckpointReader(latest_checkpoint(tmp_path)).manifest["optimizer"]["step"] == STEPS


def _checkpointing_grads(rank, world, overrides, out):
    """One forward/backward of the same batch under ZeRO-3 with each activation-checkpointing mode."""
    from megalm.config import resolve
    from megalm.engine import build_engine
    from megalm.engine.deepspeed.compat import import_deepspeed
    from megalm.parallel.topology import build_topology

    utils = import_deepspeed().utils
    tokens = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(rank))
    grads = {}
    for mode in ("none", "full", "selective"):
        cfg = resolve(load_config(None, overrides + [f"parallel.activation_checkpointing={mode}"]), world)
        topo = build_topology()
        engine = build_engine(cfg, topo, torch.device("cpu"))
        engine.backward(0, engine.forward(0, tokens[:, :-1], tokens[:, 1:]) / 2)
        engine.backward(0, engine.forward(0, tokens[:, :-1], tokens[:, 1:]) / 2)
        grads[mode] = {n: utils.safe_get_full_grad(p).clone() for n, p, _ in engine.named}
    if rank == 0:
        torch.save(grads, out)


@pytest.mark.slow
def test_activation_checkpointing_gives_equal_gradients_under_zero3(tiny_corpus, tmp_path):
    overrides = tiny_overrides(tiny_corpus, tmp_path, **{"parallel.zero_stage": 3, "model.vocab_size": 512,
                                                         "train.global_batch_size": 8,
                                                         "parallel.deepspeed_config": ZERO3_JSON})
    run_distributed(_checkpointing_grads, 2, overrides, str(tmp_path / "grads.pt"))
    grads = torch.load(tmp_path / "grads.pt")
    for mode in ("full", "selective"):
        for name, g in grads["none"].items():
            torch.testing.assert_close(grads[mode][name], g, rtol=1e-6, atol=1e-9, msg=f"{mode}: {name}")
        assert any(g.abs().sum() > 0 for g in grads[mode].values())


@pytest.mark.slow
def test_memory_bench_zero3_bf16_equals_formula():
    """`megalm bench memory` for ZeRO-3 bf16 on 2 ranks: each rank's parameters, gradients, fp32 masters and
    Adam moments equal the ZeRO formula to the byte, the buckets are zero3.json's reduce_bucket_size x 2 bytes,
    and the garbage collector's count of every live tensor storage leaves under 1 KiB unexplained."""
    from megalm.bench.memory import STATES, formula, measure

    ranks = measure(3, "bf16", world=2)
    psi = ranks[0]["psi"]
    assert psi == 134_912
    want = formula(3, "bf16", psi, 2)
    assert want == {"params": 2 * psi / 2, "grads": 2 * psi / 2, "master": 4 * psi / 2, "moments": 8 * psi / 2}
    for got in ranks:
        assert {k: got[k] for k in STATES} == want
        assert got["buffers"] == 2 * got["reduce_bucket_size"] == 2 * 50_000_000
        assert 0 <= got["other"] < 1024, got["largest_other"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU accelerator is megalm's choice only without CUDA")
def test_megalm_selects_deepspeeds_cpu_accelerator_itself():
    """A fresh interpreter without DS_ACCELERATOR (conftest sets it for this session): megalm's import_deepspeed
    sets DS_ACCELERATOR=cpu when there is no CUDA GPU, and DeepSpeed then runs on its CPU accelerator."""
    import os
    import subprocess
    import sys

    script = ("import os; assert 'DS_ACCELERATOR' not in os.environ\n"
              "from megalm.engine.deepspeed.compat import import_deepspeed\n"
              "deepspeed = import_deepspeed()\n"
              "print(os.environ.get('DS_ACCELERATOR'), deepspeed.accelerator.get_accelerator()._name)\n")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-2:] == ["cpu", "cpu"], done.stdout


# ---- configuration rules: no processes needed ----------------------------------------------------------

def _cfg(tmp_path, unset=(), **extra):
    """The tiny config; ``unset``: keys left out, so the user never set them."""
    items = tiny_overrides("unused", tmp_path, **{"model.vocab_size": 512, **extra})
    return load_config(None, [i for i in items if i.partition("=")[0] not in unset])


def _resolved(cfg, dp):
    """What a launch of dp processes resolves, and the DeepSpeed dict it then hands to deepspeed.initialize."""
    from megalm.config import resolve
    from megalm.engine.deepspeed.config import deepspeed_config_dict

    resolved = resolve(cfg, dp, cuda=False)
    return resolved, deepspeed_config_dict(resolved, dp)


BATCH = ("train.micro_batch_size", "train.global_batch_size")


def test_user_json_batch_mismatch_names_all_four(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2}))
    with pytest.raises(ConfigError) as err:
        _resolved(_cfg(tmp_path, **{"parallel.deepspeed_config": path}), dp=2)
    for word in ("train_batch_size=16", "micro batch", "gradient accumulation", "dp=2"):
        assert word in str(err.value)


def test_user_json_fills_and_megalm_fills_the_rest(tmp_path):
    cfg, ds = _resolved(_cfg(tmp_path, **{"parallel.deepspeed_config": "configs/deepspeed/zero3_offload.json"}), 2)
    assert cfg.parallel.zero_stage == 3 and cfg.parallel.zero_offload
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == \
        (4, 2, 1)
    assert ds["bf16"]["enabled"] is False and ds["gradient_clipping"] == cfg.train.grad_clip
    for name in ("zero1", "zero2", "zero3"):
        _, ds = _resolved(_cfg(tmp_path, **{"parallel.deepspeed_config": f"configs/deepspeed/{name}.json"}), 1)
        assert ds["zero_optimization"]["stage"] == int(name[-1])
    with pytest.raises(ConfigError, match="zero_stage=2"):
        _resolved(_cfg(tmp_path, **{"parallel.deepspeed_config": "configs/deepspeed/zero3.json",
                                    "parallel.zero_stage": 2}), 1)


def test_buckets_follow_the_model_unless_the_json_names_them(tmp_path):
    from megalm.engine.deepspeed.config import bucket_elements
    from megalm.flops import matmul_params

    _, ds = _resolved(_cfg(tmp_path, **{"parallel.zero_stage": 1, "train.global_batch_size": 8}), 2)
    zero = ds["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 1_000_000    # tiny: the 4 MB floor
    big = load_config("llama-7b", ["model.vocab_size=32000", "parallel.tp=2"])
    assert sum(matmul_params(big.model).values()) // 2 > 50_000_000
    assert bucket_elements(big) == 50_000_000                                             # capped as the JSONs
    mid = load_config(None, ["model.vocab_size=32000", "model.hidden_size=512", "model.num_layers=4",
                             "model.num_heads=8"])
    assert bucket_elements(mid) == sum(matmul_params(mid.model).values())                # the model's share
    _, ds = _resolved(_cfg(tmp_path, **{"parallel.deepspeed_config": "configs/deepspeed/zero1.json",
                                        "train.global_batch_size": 8}), 2)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 50_000_000


def test_fp16_on_cpu_says_use_bf16(tmp_path):
    from megalm.config import resolve

    with pytest.raises(ConfigError, match="train.precision=bf16"):
        resolve(_cfg(tmp_path, **{"train.precision": "fp16", "parallel.zero_stage": 1}), 1, cuda=False)


def test_fp16_loss_scaling_settings_reach_deepspeed(tmp_path):
    from megalm.engine.deepspeed.config import deepspeed_config_dict

    cfg = _cfg(tmp_path, **{"train.precision": "fp16", "parallel.zero_stage": 1, "train.initial_loss_scale": 1024,
                            "train.loss_scale_window": 50})
    fp16 = deepspeed_config_dict(cfg, dp=1)["fp16"]           # the dict only: resolving fp16 needs a GPU
    assert fp16["enabled"] and fp16["loss_scale"] == 0            # dynamic
    assert (fp16["initial_scale_power"], fp16["loss_scale_window"], fp16["hysteresis"]) == (10, 50, 1)


def _json_cfg(tmp_path, user: dict, **extra):
    """A config that leaves train.micro_batch_size/global_batch_size unset unless ``extra`` sets them, and a
    user JSON."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    return _cfg(tmp_path, unset=[k for k in BATCH if k not in extra],
                **{"parallel.deepspeed_config": path, **extra})


@pytest.mark.parametrize("user,extra,want", [
    ({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4}, {},
     (16, 2, 4)),
    ({"train_batch_size": 16, "gradient_accumulation_steps": 2}, {}, (16, 4, 2)),
    ({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3}, {}, (12, 2, 3)),
    ({"train_batch_size": 16}, {}, (16, 8, 1)),                      # DeepSpeed's own completion: accumulation 1
    ({"train_micro_batch_size_per_gpu": 2, "train_batch_size": "auto"}, {}, (4, 2, 1)),
    ({"gradient_accumulation_steps": 2}, {}, (32, 8, 2)),              # megalm's default micro batch fills in
    ({"train_batch_size": 16}, {"train.micro_batch_size": 2}, (16, 2, 4)),   # megalm's explicit micro batch kept
    ({"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2},
     {"train.micro_batch_size": 2, "train.global_batch_size": 4}, (4, 2, 1)),  # explicit and agreeing
])
def test_user_json_batch_keys_adopted_where_unset(tmp_path, user, extra, want):
    """A self-consistent JSON's batch keys fill what the user did not set, in the DeepSpeed dict and in the
    resolved config (which the data sampler reads), so micro x accumulation x dp = train batch on both sides."""
    cfg, ds = _resolved(_json_cfg(tmp_path, user, **extra), dp=2)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == want
    assert (cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.grad_accumulation_steps(2)) == want


@pytest.mark.parametrize("user,extra,numbers", [
    ({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3}, {},
     ("train_batch_size=16", "micro batch 2", "gradient accumulation 3", "dp=2", "2 x 3 x 2 = 12")),
    ({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 2}, {},
     ("train_batch_size=10", "micro batch 2", "gradient accumulation 2.5", "dp=2")),
    ({"train_batch_size": 16}, {"train.global_batch_size": 4, "train.micro_batch_size": 2},
     ("train_batch_size=16 but train.global_batch_size=4", "micro batch 2", "gradient accumulation 4", "dp=2")),
    ({"train_micro_batch_size_per_gpu": 4}, {"train.micro_batch_size": 2},
     ("train_micro_batch_size_per_gpu=4 but train.micro_batch_size=2",)),
    # the defect of old: a micro batch set explicitly to the default's value (8) was silently replaced
    ({"train_micro_batch_size_per_gpu": 4}, {"train.micro_batch_size": 8},
     ("train_micro_batch_size_per_gpu=4 but train.micro_batch_size=8 (set in the config)",)),
])
def test_user_json_batch_contradiction_names_the_numbers(tmp_path, user, extra, numbers):
    """Only a real contradiction is refused: a JSON at odds with itself, or with a value the user set."""
    with pytest.raises(ConfigError) as err:
        _resolved(_json_cfg(tmp_path, user, **extra), dp=2)
    for text in numbers + ("train.global_batch_size=", "train.micro_batch_size="):
        assert text in str(err.value), (text, str(err.value))


def test_json_batch_sizes_count_in_validation_before_the_launch(tmp_path):
    """At dp=2, megalm's default batch (micro 8, global 8) is invalid on its own; the JSON's 16 = 2 x 4 x 2 is
    adopted during resolution, before the rule book checks the batch, so the run starts."""
    from megalm.config.rules import validate

    user = {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4}
    with pytest.raises(ConfigError, match="not divisible"):
        validate(_json_cfg(tmp_path, user), 2)
    cfg, _ = _resolved(_json_cfg(tmp_path, user), 2)
    assert (cfg.train.global_batch_size, cfg.train.micro_batch_size) == (16, 2)


def test_the_first_deepspeed_start_says_it_is_compiling_and_where_it_caches(tmp_path, monkeypatch, capsys):
    """An empty extension cache: one line naming the op and the folder; a cache holding the built op: silence."""
    from megalm.engine.deepspeed.compat import announce_jit_builds, import_deepspeed

    import_deepspeed()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert announce_jit_builds(["ShareMemCommBuilder"]) == ["deepspeed_shm_comm"]
    line = capsys.readouterr().out
    assert "DeepSpeed is compiling its deepspeed_shm_comm op" in line and str(tmp_path) in line
    (next(tmp_path.rglob("deepspeed_shm_comm")) / "deepspeed_shm_comm.so").write_bytes(b"")
    assert announce_jit_builds(["ShareMemCommBuilder"]) == []
    assert capsys.readouterr().out == ""


def _writer_only_values(rank, world, overrides, out):
    """After one AdamW step, ``state_tensors`` must give data-parallel rank 0 the values DeepSpeed's own
    all-reduce/all-gather assembles, and every other data-parallel rank None, without calling that API."""
    from megalm.config import resolve
    from megalm.engine import build_engine
    from megalm.parallel.topology import build_topology

    cfg = resolve(load_config(None, overrides), world)
    topo = build_topology(cfg.parallel.tp)
    engine = build_engine(cfg, topo, torch.device("cpu"))
    tokens = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(topo.dp_rank))
    engine.backward(0, engine.forward(0, tokens[:, :-1], tokens[:, 1:]))
    engine.step(1e-2)
    utils = engine._ds_module.utils
    full_api = utils.safe_get_full_fp32_param, utils.safe_get_full_optimizer_state

    def refuse(*args):
        raise AssertionError("state_tensors used DeepSpeed's all-ranks API")
    utils.safe_get_full_fp32_param = utils.safe_get_full_optimizer_state = refuse
    got = [(name, value) for name, value, _ in engine.state_tensors()]
    utils.safe_get_full_fp32_param, utils.safe_get_full_optimizer_state = full_api
    named = {f"model.{n}": p for n, p, _ in engine.named}
    named.update({f"optim.{k}.{n}": (p, k) for n, p, _ in engine.named for k in ("exp_avg", "exp_avg_sq")})
    want = [engine._full_fp32(named[n]) if n.startswith("model.") else engine._full_state(*named[n]) for n, _ in got]
    assert len(got) == len(named)                  # every weight and both of its moments
    if topo.dp_rank == 0:
        for (name, value), expected in zip(got, want):
            assert value is not None and torch.equal(value, expected), name
    else:
        assert all(value is None for _, value in got), [n for n, v in got if v is not None]
    torch.save({"rank": rank, "checked": len(got)}, f"{out}.{rank}")


@pytest.mark.slow
@pytest.mark.parametrize("stage,precision,tp", [(1, "fp32", 1), (2, "bf16", 1), (3, "fp32", 1), (1, "fp32", 2)])
def test_only_the_writing_rank_assembles_a_partitioned_value(tiny_corpus, tmp_path, stage, precision, tp):
    extra = {"parallel.zero_stage": stage, "parallel.engine": "deepspeed", "train.precision": precision,
             "parallel.tp": tp, "model.vocab_size": 512, **ADAMW}
    if stage == 3:
        extra["parallel.deepspeed_config"] = ZERO3_JSON
    world = 2 * tp
    run_distributed(_writer_only_values, world, tiny_overrides(tiny_corpus, tmp_path, **extra),
                    str(tmp_path / "checked"))
    assert all(torch.load(f"{tmp_path / 'checked'}.{r}")["checked"] > 0 for r in range(world))
