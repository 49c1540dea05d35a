"""LoRA under every layout: fine-tuning losses at tp = 2 with sequence parallelism, pp = 2, and DeepSpeed ZeRO 0-3
on two data-parallel ranks equal one process's (fp32, rtol 1e-5); the ZeRO-3 run's saved adapters are whole (no
zero-size tensors: every value gathered before it is written) and its merged model's logits equal the unmerged
one's (convert merge-lora verifies them)."""
import pytest
import torch

from megalm.checkpoint.format import latest_checkpoint
from megalm.checkpoint.load import CheckpointReader
from megalm.config import load_config
from megalm.runtime.spawn import run_distributed
from megalm.train.loop import train
from megalm.train.metrics import read_metrics
from tests.conftest import tiny_overrides

LLAMA = {"model.norm": "rmsnorm", "model.activation": "swiglu", "model.position": "rope", "model.bias": "false",
         "model.num_kv_heads": 2, "model.vocab_size": 512}
LAYOUTS = {
    "tp2-sp": {"parallel.tp": 2, "parallel.sequence_parallel": "true"},
    "pp2": {"parallel.pp": 2},
    "zero0-dp2": {"parallel.zero_stage": 0, "parallel.engine": "deepspeed"},
    "zero1-dp2": {"parallel.zero_stage": 1, "parallel.engine": "deepspeed"},
    "zero2-dp2": {"parallel.zero_stage": 2, "parallel.engine": "deepspeed"},
    "zero3-dp2": {"parallel.zero_stage": 3, "parallel.engine": "deepspeed"},
}


def _train(rank, world, overrides):
    train(load_config(None, overrides))


@pytest.fixture(scope="module")
def base_and_reference(tiny_corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    train(load_config(None, tiny_overrides(tiny_corpus, folder / "pre", **{**LLAMA, "train.steps": 2})))
    reference = folder / "one"
    train(load_config(None, overrides(tiny_corpus, reference, folder / "pre")))
    curve = [r["loss"] for r in read_metrics(reference) if "loss" in r]
    trained = CheckpointReader(latest_checkpoint(reference))
    assert max(trained.read(n).abs().max() for n in trained.manifest["tensors"] if n.endswith(".lora.b")) > 1e-3
    return folder / "pre", curve                        # B has moved off zero: the adapters trained


def overrides(corpus, run_dir, base, **extra):
    return tiny_overrides(corpus, run_dir, **{**LLAMA, "train.steps": 4, "lora.rank": 4, "lora.alpha": 8,
                                              "checkpoint.load": base, "checkpoint.load_weights_only": "true",
                                              "optimizer.lr": 1e-2, "checkpoint.interval": 4, **extra})


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_lora_losses_in_every_layout_equal_one_process(tiny_corpus, base_and_reference, tmp_path, layout, capsys):
    base, reference = base_and_reference
    run_dir = tmp_path / layout
    run_distributed(_train, 2, overrides(tiny_corpus, run_dir, base, **LAYOUTS[layout]))
    curve = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    torch.testing.assert_close(torch.tensor(curve), torch.tensor(reference), rtol=1e-5, atol=0)
    reader = CheckpointReader(latest_checkpoint(run_dir))
    shapes = [torch.Size(e["shape"]) for e in reader.manifest["tensors"].values()]
    assert shapes and all(s.numel() > 0 for s in shapes)
    assert all(reader.read(n).numel() == torch.Size(reader.manifest["tensors"][n]["shape"]).numel()
               for n in reader.manifest["tensors"])
    if layout == "zero3-dp2":
        from megalm.cli import main

        assert main(["convert", "merge-lora", "--src", str(run_dir), "--dst", str(tmp_path / "merged")]) == 0
        assert "(verified)" in capsys.readouterr().out
