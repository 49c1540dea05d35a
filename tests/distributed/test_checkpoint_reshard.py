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
from megalm.testing import run_distributed
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
