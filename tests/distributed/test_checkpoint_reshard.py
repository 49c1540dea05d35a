"""A checkpoint saved at tp=2 x pp=2 resumes in other layouts, and training continues as if it never moved.

Reference: the tp=2 x pp=2 run that never stopped. Each other layout loads the step-10 checkpoint (resharding
on load) and runs steps 11-20; its losses must equal the reference's within 1e-6 relative (fp32), and its final
weights and optimizer state the reference's within fp32 reduction-order noise.
"""
import shutil

import pytest
import torch

from megalm.checkpoint.format import latest_checkpoint
from megalm.checkpoint.load import CheckpointReader
from megalm.config import load_config
from megalm.runtime.spawn import run_distributed
from megalm.train.loop import train
from megalm.train.metrics import read_metrics
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.timeout(900)
SAVED_AT, STEPS = 10, 20
LAYOUT = {"model.num_layers": 4, "model.num_kv_heads": 2, "model.norm": "rmsnorm", "model.activation": "swiglu",
          "model.position": "rope", "model.bias": "false", "model.tie_embeddings": "true",
          "train.global_batch_size": 8, "train.steps": STEPS}


def _train(rank, world, overrides):
    train(load_config(None, overrides))


def launch(world, overrides):
    if world == 1:
        train(load_config(None, overrides))
    else:
        run_distributed(_train, world, overrides)


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.fixture(scope="module")
def saved(tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    moving = {"parallel.tp": 2, "parallel.pp": 2, **LAYOUT}
    launch(4, tiny_overrides(tiny_corpus, root / "never_moved", **moving))
    launch(4, tiny_overrides(tiny_corpus, root / "saved", **moving, **{"train.stop_at_step": SAVED_AT}))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("world,layout", [
    (1, {}),
    (2, {"parallel.pp": 2}),
    (4, {"parallel.tp": 4}),
    (4, {"parallel.pp": 4}),
    (4, {"parallel.tp": 2, "parallel.dp": 2}),
    (2, {"parallel.dp": 2, "parallel.deepspeed_config": "configs/deepspeed/zero3.json"}),
], ids=["one-process", "tp1-pp2", "tp4", "pp4", "tp2-dp2", "dp2-zero3"])
def test_resume_in_another_layout_continues_exactly(tiny_corpus, saved, tmp_path, world, layout):
    run_dir = tmp_path / "run"
    shutil.copytree(saved / "saved", run_dir)
    checkpoint = CheckpointReader(latest_checkpoint(run_dir))
    assert checkpoint.manifest["step"] == SAVED_AT and checkpoint.manifest["layout"]["tp"] == 2
    launch(world, tiny_overrides(tiny_corpus, run_dir, **{**LAYOUT, **layout}))
    expected, got = losses(saved / "never_moved"), losses(run_dir)
    for step in range(SAVED_AT + 1, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-6), (step, got[step], expected[step])
    final_a = CheckpointReader(latest_checkpoint(saved / "never_moved"))
    final_b = CheckpointReader(latest_checkpoint(run_dir))
    assert final_b.manifest["layout"]["tp"] == layout.get("parallel.tp", 1)
    for name in final_a.manifest["tensors"]:
        torch.testing.assert_close(final_b.read(name), final_a.read(name), rtol=1e-5, atol=1e-6)


def _restore_and_count(rank, world, overrides, queue):
    """Resume this layout's engine from the run dir; report the bytes this rank hashed (or the error it raised)."""
    from megalm.checkpoint.format import CheckpointError
    from megalm.engine import build_engine
    from megalm.train.checkpointing import restore
    from megalm.train.loop import prepare

    cfg, rt, reader, _ = prepare(load_config(None, overrides))
    engine = build_engine(cfg, rt.topo, rt.device, init=False)
    try:
        restore(engine, reader)
        queue.put((rank, reader.bytes_hashed, None))
    except CheckpointError as e:
        queue.put((rank, reader.bytes_hashed, str(e)))


def restore_on_four(tiny_corpus, run_dir, layout):
    queue = torch.multiprocessing.get_context("spawn").SimpleQueue()
    run_distributed(_restore_and_count, 4, tiny_overrides(tiny_corpus, run_dir, **{**LAYOUT, **layout}), queue)
    return sorted(queue.get() for _ in range(4))


@pytest.mark.slow
@pytest.mark.parametrize("layout", [{"parallel.tp": 2, "parallel.pp": 2}, {"parallel.tp": 2, "parallel.dp": 2},
                                    {"parallel.dp": 4}], ids=["tp2-pp2", "tp2-dp2", "dp4"])
def test_resume_hashes_a_share_of_the_checkpoint_per_rank(tiny_corpus, saved, tmp_path, layout):
    """The ranks split the files (4 shards and the tokenizer's two files here) and agree on the verdict, so the
    bytes hashed per rank do not grow with the world size (before: every rank hashed every file), whatever the
    layout reads: at dp=4 every rank reads every shard, and still hashes about a quarter."""
    run_dir = tmp_path / "run"
    shutil.copytree(saved / "saved", run_dir)
    folder = latest_checkpoint(run_dir)
    whole = sum((folder / name).stat().st_size for name in CheckpointReader(folder, verify=False).manifest["files"])
    results = restore_on_four(tiny_corpus, run_dir, layout)
    assert all(error is None for _, _, error in results), results
    hashed = [count for _, count, _ in results]
    assert all(0 < count <= 0.4 * whole for count in hashed), (hashed, whole)
    assert sum(hashed) == whole                                   # every file hashed once, by one rank


@pytest.mark.slow
def test_a_damaged_shard_is_named_by_every_rank_before_any_weight_is_used(tiny_corpus, saved, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(saved / "saved", run_dir)
    shard = latest_checkpoint(run_dir) / "shard-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    results = restore_on_four(tiny_corpus, run_dir, {"parallel.tp": 2, "parallel.pp": 2})
    errors = {error for _, _, error in results}
    assert len(errors) == 1 and "shard-00003.safetensors does not match its sha256" in errors.pop()
