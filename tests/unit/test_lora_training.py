"""LoRA fine-tuning end to end: only the adapters train and hold optimizer state, the base stays bit-unchanged;
a checkpoint holds the adapters alone (none empty) and names its base; resuming it equals the uninterrupted run;
merged and unmerged give equal logits (convert merge-lora, to-hf); the PEFT export loads in peft with equal
logits; runs without a base, unknown targets and conversions that cannot be exact are refused."""
import json
from pathlib import Path

import pytest
import torch

from megalm.checkpoint.format import latest_checkpoint
from megalm.checkpoint.load import CheckpointReader
from megalm.config import ConfigError, load_config, resolve
from megalm.train.loop import train
from megalm.train.metrics import read_metrics
from tests.conftest import tiny_overrides

LLAMA = {"model.norm": "rmsnorm", "model.activation": "swiglu", "model.position": "rope", "model.bias": "false",
         "model.num_kv_heads": 2, "model.vocab_size": 512}


def lora_overrides(corpus, run_dir, base, **extra):
    return tiny_overrides(corpus, run_dir, **{**LLAMA, "train.steps": 4, "lora.rank": 4, "lora.alpha": 8,
                                              "checkpoint.load": base, "checkpoint.load_weights_only": "true",
                                              "optimizer.lr": 1e-2, "lr.decay": "constant", **extra})


@pytest.fixture(scope="module")
def base(tiny_corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("base") / "pre"
    train(load_config(None, tiny_overrides(tiny_corpus, run, **{**LLAMA, "train.steps": 2})))
    return run


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def test_the_base_stays_bit_unchanged_and_only_adapters_hold_optimizer_state(tiny_corpus, tmp_path, capsys):
    from megalm.engine import build_engine
    from megalm.model.lora import is_adapter
    from megalm.parallel.topology import build_topology

    states = {}
    for rank in (4, 0):
        overrides = tiny_overrides(tiny_corpus, tmp_path, **{**LLAMA, "lora.rank": rank})
        cfg = resolve(load_config(None, overrides), 1)
        engine = build_engine(cfg, build_topology(), torch.device("cpu"))
        before = {n: p.detach().clone() for n, p in engine.chunks[0].named_parameters()}
        tokens = torch.randint(0, 512, (3, 2, 33), generator=torch.Generator().manual_seed(0))
        for batch in tokens:
            engine.backward(0, engine.forward(0, batch[:, :-1], batch[:, 1:]))
            engine.step(1e-2)
        after = dict(engine.chunks[0].named_parameters())
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        held = {n for n, p in after.items() if engine.optimizer.state.get(p)}
        if rank:
            assert changed == held == {n for n in before if is_adapter(n)} != set()
        else:
            assert held == set(before)
        states[rank] = (sum(p.numel() for p in after.values() if p.requires_grad),
                        sum(t.numel() * t.element_size() for t in engine.model_states()["moments"]))
    print(f"trainable parameters: LoRA r=4 {states[4][0]:,} vs full {states[0][0]:,}; Adam moments "
          f"{states[4][1] / 1e3:.1f} kB vs {states[0][1] / 1e3:.1f} kB")
    assert states[4][0] < states[0][0] / 5 and states[4][1] < states[0][1] / 5


def test_adapters_alone_are_saved_and_resume_equals_the_uninterrupted_run(tiny_corpus, base, tmp_path):
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    train(load_config(None, lora_overrides(tiny_corpus, whole, base)))
    train(load_config(None, lora_overrides(tiny_corpus, halves, base, **{"train.stop_at_step": 2})))
    train(load_config(None, lora_overrides(tiny_corpus, halves, base)))
    assert losses(halves) == losses(whole) and len(losses(whole)) == 4

    reader = CheckpointReader(latest_checkpoint(whole))
    stored = reader.manifest["tensors"]
    assert stored and all(".lora." in n for n in stored)                   # the base is not copied
    assert all(torch.Size(e["shape"]).numel() > 0 for e in stored.values())  # no empty adapters
    assert {n.split(".", 1)[0] for n in stored} == {"model", "optim"}
    assert Path(reader.manifest["lora_base"]["folder"]) == latest_checkpoint(base).resolve()
    pretrained = CheckpointReader(latest_checkpoint(base))
    for name in (n for n in pretrained.manifest["tensors"] if n.startswith("model.")):
        assert torch.equal(reader.read(name), pretrained.read(name))      # read through to the base


def test_merged_and_unmerged_checkpoints_give_equal_logits_and_the_peft_export_loads(tiny_corpus, base, tmp_path,
                                                                                      capsys):
    import peft
    import transformers

    from megalm.checkpoint.verify import fixed_batch, single_model
    from megalm.cli import main

    run = tmp_path / "ft"
    train(load_config(None, lora_overrides(tiny_corpus, run, base)))
    for kind, dst in (("merge-lora", "merged"), ("to-hf", "hf"), ("to-peft", "peft")):
        assert main(["convert", kind, "--src", str(run), "--dst", str(tmp_path / dst)]) == 0
    assert main(["convert", "to-hf", "--src", str(base), "--dst", str(tmp_path / "hf-base")]) == 0
    unmerged, model_cfg = single_model(run)
    merged, _ = single_model(tmp_path / "merged")
    assert not any(".lora." in n for n, _ in merged.named_parameters())
    tokens = fixed_batch(model_cfg)
    with torch.no_grad():
        expected = unmerged(tokens)
        torch.testing.assert_close(merged(tokens), expected, rtol=1e-5, atol=1e-5)
        hf_base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf-base"), dtype=torch.float32)
        with_adapter = peft.PeftModel.from_pretrained(hf_base, str(tmp_path / "peft")).eval()
        torch.testing.assert_close(with_adapter(tokens).logits, expected, rtol=1e-5, atol=1e-5)
        hf_merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
        torch.testing.assert_close(hf_merged(tokens).logits, expected, rtol=1e-5, atol=1e-5)
        assert (expected - single_model(base)[0](tokens)).abs().max() > 1e-3      # the adapters did train
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and "down_proj" in config["target_modules"]


def test_runs_and_conversions_that_cannot_be_exact_are_refused(tiny_corpus, base, tmp_path, capsys):
    from megalm.cli import main

    with pytest.raises(ConfigError, match="starts from none"):
        train(load_config(None, tiny_overrides(tiny_corpus, tmp_path / "a", **{**LLAMA, "lora.rank": 4})))
    with pytest.raises(ConfigError, match="lora.targets names 'w_in': a swiglu model has no w_in"):
        train(load_config(None, lora_overrides(tiny_corpus, tmp_path / "b", base, **{"lora.targets": "[wq,w_in]"})))
    assert main(["convert", "merge-lora", "--src", str(base), "--dst", str(tmp_path / "m")]) != 0
    assert "holds no LoRA adapters" in capsys.readouterr().err
    run = tmp_path / "ft"
    train(load_config(None, lora_overrides(tiny_corpus, run, base, **{"train.steps": 1})))
    assert main(["convert", "layout", "--src", str(run), "--dst", str(tmp_path / "l"), "--tp", "2"]) != 0
    assert "merge them first with convert merge-lora" in capsys.readouterr().err
