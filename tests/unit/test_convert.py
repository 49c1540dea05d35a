"""``megalm convert``: layouts, Hugging Face round trips with verification, and refusals that lose nothing."""
import json

import pytest
import torch

from megalm.checkpoint.convert import ConvertError, convert_from_hf, convert_layout, convert_to_hf, main
from megalm.checkpoint.format import CheckpointError, latest_checkpoint
from megalm.checkpoint.load import CheckpointReader
from megalm.checkpoint.verify import compare, fixed_batch, hf_logits_fn, megalm_logits_fn
from megalm.config import ModelConfig, load_config
from megalm.train.loop import train
from tests.conftest import tiny_overrides

pytest.importorskip("transformers", reason="needs transformers (pip install megalm[test])")

STYLES = {
    "llama": {"model.norm": "rmsnorm", "model.activation": "swiglu", "model.position": "rope", "model.bias": "false",
              "model.num_kv_heads": 2, "model.tie_embeddings": "false"},
    "gpt2": {"model.norm": "layernorm", "model.activation": "gelu", "model.position": "learned",
             "model.bias": "true", "model.tie_embeddings": "true"},
}


@pytest.fixture(scope="module", params=sorted(STYLES))
def trained(request, tiny_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp(request.param)
    train(load_config(None, tiny_overrides(tiny_corpus, run_dir, **STYLES[request.param], **{"train.steps": 2})))
    return run_dir


def tensors_of(path):
    reader = CheckpointReader(latest_checkpoint(path))
    return {n: reader.read(n) for n in reader.manifest["tensors"]}


def test_layout_conversion_keeps_every_tensor(trained, tmp_path):
    before = tensors_of(trained)
    assert any(n.startswith("optim.exp_avg.") for n in before)        # optimizer state travels too
    convert_layout(trained, tmp_path / "tp2pp2", tp=2, pp=2)
    after = CheckpointReader(tmp_path / "tp2pp2")
    assert after.manifest["layout"]["tp"] == 2 and len(after.manifest["files"]) >= 4
    for name, t in before.items():
        assert torch.equal(after.read(name), t), name


def test_hugging_face_round_trip_and_logits(trained, tmp_path):
    convert_to_hf(trained, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"][0] in ("LlamaForCausalLM", "GPT2LMHeadModel")
    model_cfg = ModelConfig(**CheckpointReader(latest_checkpoint(trained)).manifest["config"]["model"])
    result = compare(megalm_logits_fn(trained), hf_logits_fn(tmp_path / "hf"), fixed_batch(model_cfg), "to-hf")
    assert result["max_abs"] <= 1e-5 and result["kl"] <= 1e-9
    convert_from_hf(tmp_path / "hf", tmp_path / "back", tp=2)
    original, back = tensors_of(trained), tensors_of(tmp_path / "back")
    assert set(back) == {n for n in original if n.startswith("model.")}
    for name, t in back.items():
        assert torch.equal(t, original[name]), name


def test_cli_verify_and_refusals(trained, tmp_path):
    assert main(["layout", "--src", str(trained), "--dst", str(tmp_path / "a"), "--tp", "2", "--verify"]) == 0
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("precious")
    with pytest.raises(ConvertError, match="never overwrites"):
        convert_layout(trained, tmp_path / "b", tp=2)
    assert (tmp_path / "b" / "keep.txt").read_text() == "precious"
    with pytest.raises(ConvertError, match="tp=3"):
        convert_layout(trained, tmp_path / "c", tp=3)
    assert not (tmp_path / "c").exists()


def test_missing_or_corrupt_shard_is_named(trained, tmp_path):
    convert_layout(trained, tmp_path / "a", tp=2)
    shard = tmp_path / "a" / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="shard-00001.safetensors"):
        CheckpointReader(tmp_path / "a")
    shard.unlink()
    with pytest.raises(CheckpointError, match="shard-00001.safetensors is missing"):
        CheckpointReader(tmp_path / "a")


def test_pickled_hugging_face_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 8,
                                                      "hidden_size": 8, "num_hidden_layers": 1,
                                                      "num_attention_heads": 2, "intermediate_size": 8,
                                                      "max_position_embeddings": 8}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ConvertError, match="unpickle"):
        convert_from_hf(tmp_path, tmp_path / "out")


def test_finetune_from_a_hugging_face_model(trained, tiny_corpus, tmp_path):
    """HF -> megalm -> megalm finetune: the run starts at step 0 from exactly the converted weights."""
    from megalm.cli import main as cli

    convert_to_hf(trained, tmp_path / "hf")
    convert_from_hf(tmp_path / "hf", tmp_path / "imported")
    run_dir = tmp_path / "finetuned"
    frozen = {"optimizer.name": "sgd", "optimizer.lr": 0.0, "optimizer.min_lr": 0.0, "train.steps": 2}
    args = tiny_overrides(tiny_corpus, run_dir, **frozen)
    assert cli(["finetune", "--checkpoint", str(tmp_path / "imported")] + args) == 0
    result = CheckpointReader(latest_checkpoint(run_dir))
    assert result.manifest["step"] == 2 and result.manifest["data"]["consumed_samples"] == 8
    source = tensors_of(tmp_path / "imported")
    for name, t in source.items():
        assert torch.equal(result.read(name), t), name


@pytest.mark.slow
def test_bench_convert_reports_every_conversion_beside_its_copy(tmp_path):
    from megalm.bench import convert as bench

    assert bench.main(["--hidden", "256", "--layers", "2", "--vocab", "512", "--repeat", "1",
                       "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_convert.json").read_text())["results"]
    assert set(report["conversions"]) == {"layout tp1 -> tp2 x pp2", "megalm -> Hugging Face",
                                          "Hugging Face -> megalm tp2"}
    for conv in report["conversions"].values():
        assert len(conv["rounds"]) == 1
        assert all(r["alone"] > 0 and r["copy"] > 0 for r in conv["rounds"])
        assert conv["vs_copy"] > 0 and conv["rss_above_import"] >= 0
    assert (tmp_path / "bench_convert.png").stat().st_size > 0
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []      # the scratch checkpoints are gone
