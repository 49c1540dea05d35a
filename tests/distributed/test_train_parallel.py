"""End to end through ``megalm.train``: every layout's loss curve equals the single-process run's, checkpoints
written in one layout generate the same text in another, and bad layouts fail on every rank alike."""
import pytest
import torch

from megalm.config import ConfigError, load_config
from megalm.testing import run_distributed
from megalm.train.loop import train
from megalm.train.metrics import read_metrics
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.timeout(600)
STEPS = 20


def _train(rank, world, overrides):
    train(load_config(None, overrides))


def curve(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def overrides(prefix, run_dir, **extra):
    base = {"train.steps": STEPS, "model.num_kv_heads": 2, "model.norm": "rmsnorm", "model.activation": "swiglu",
            "model.position": "rope", "model.bias": "false", "train.global_batch_size": 8, "model.num_layers": 4}
    base.update(extra)
    return tiny_overrides(prefix, run_dir, **base)


@pytest.fixture(scope="module")
def reference(tiny_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    train(load_config(None, overrides(tiny_corpus, run_dir)))
    return run_dir, curve(run_dir)


@pytest.mark.parametrize("world,layout", [
    (2, {"parallel.tp": 2}),
    (2, {"parallel.tp": 2, "parallel.sequence_parallel": "true"}),
    (2, {"parallel.pp": 2}),
    (2, {"parallel.dp": 2}),
    pytest.param(4, {"parallel.tp": 2, "parallel.pp": 2, "parallel.sequence_parallel": "true"},
                 marks=pytest.mark.slow),
    pytest.param(2, {"parallel.pp": 2, "parallel.virtual_stages": 2}, marks=pytest.mark.slow),
], ids=["tp2", "tp2-sp", "pp2", "dp2", "tp2-pp2-sp", "pp2-interleaved"])
def test_loss_curve_equals_single_process(tiny_corpus, tmp_path, reference, world, layout):
    run_dir = tmp_path / "parallel"
    run_distributed(_train, world, overrides(tiny_corpus, run_dir, **layout))
    expected = reference[1]
    got = curve(run_dir)
    assert len(got) == len(expected) == STEPS + 0
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=0)


def _generate(rank, world, run_dir, layout, queue):
    from megalm.generate import generate_ids
    from megalm.inference import checkpoint_config, load_model

    cfg, reader = checkpoint_config(run_dir, layout)
    rt, engine = load_model(cfg, reader)
    ids = generate_ids(engine, rt.topo, [5, 6, 7], 12, temperature=0.0, valid_vocab=cfg.model.vocab_size)
    queue.put((rank, ids))


def test_generation_from_tp2_checkpoint_equals_tp1(tiny_corpus, tmp_path):
    run_distributed(_train, 2, overrides(tiny_corpus, tmp_path, **{"parallel.tp": 2, "train.steps": 4}))
    ctx = torch.multiprocessing.get_context("spawn")
    outputs = {}
    for world, layout in [(1, []), (2, ["parallel.tp=2"]), (2, ["parallel.pp=2"])]:
        queue = ctx.SimpleQueue()
        run_distributed(_generate, world, str(tmp_path), layout, queue)
        results = [queue.get() for _ in range(world)]
        assert len({tuple(ids) for _, ids in results}) == 1          # every rank agrees
        outputs[tuple(layout)] = results[0][1]
    assert len(outputs[()]) == 15
    assert outputs[("parallel.tp=2",)] == outputs[()] == outputs[("parallel.pp=2",)]


def _bad_layout(rank, world, overrides, queue):
    try:
        train(load_config(None, overrides))
        queue.put((rank, "no error"))
    except ConfigError as e:
        queue.put((rank, str(e)))


@pytest.mark.parametrize("layout,needle", [
    ({"parallel.tp": 2, "model.num_heads": 3, "model.hidden_size": 48}, "num_heads=3"),
    ({"parallel.tp": 4}, "world size 2"),
    ({"parallel.pp": 2, "model.num_layers": 3}, "num_layers=3"),
])
def test_bad_layout_fails_on_every_rank_with_the_same_message(tiny_corpus, tmp_path, layout, needle):
    queue = torch.multiprocessing.get_context("spawn").SimpleQueue()
    run_distributed(_bad_layout, 2, overrides(tiny_corpus, tmp_path, **layout), queue)
    messages = dict(queue.get() for _ in range(2))
    assert messages[0] == messages[1] and needle in messages[0], messages
    assert not (tmp_path / "checkpoints").exists()                # nothing was started, nothing written


@pytest.mark.slow
@pytest.mark.parametrize("world,layout", [
    (8, {"parallel.tp": 2, "parallel.pp": 2, "parallel.zero_stage": 1}),
    (8, {"parallel.tp": 2, "parallel.pp": 2, "parallel.sequence_parallel": "true",
         "parallel.deepspeed_config": "configs/deepspeed/zero3.json"}),
    (2, {"parallel.deepspeed_config": "configs/deepspeed/zero3_offload.json"}),
    (4, {"parallel.pp": 2, "parallel.engine": "deepspeed", "parallel.zero_stage": 0}),
    (4, {"parallel.pp": 2, "parallel.zero_stage": 2}),
    (4, {"parallel.pp": 2, "parallel.virtual_stages": 2, "parallel.zero_stage": 1}),
], ids=["tp2-pp2-dp2-zero1", "tp2-pp2-dp2-sp-zero3", "dp2-zero3-offload", "pp2-dp2-zero0", "pp2-dp2-zero2",
        "pp2-interleaved-dp2-zero1"])
def test_deepspeed_layouts_equal_single_process(tiny_corpus, tmp_path, reference, world, layout):
    """DeepSpeed as the data-parallel engine with all three dimensions at once (8 processes), and ZeRO-3 with
    CPU offload: the first 6 steps of the 20-step schedule equal the single-process run's."""
    run_dir = tmp_path / "deepspeed"
    run_distributed(_train, world, overrides(tiny_corpus, run_dir, **layout, **{"train.stop_at_step": 6}))
    got = curve(run_dir)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(reference[1][:6]), rtol=1e-5, atol=0)
