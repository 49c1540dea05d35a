"""`megalm convert` from DeepSpeed ZeRO checkpoints: the streamed conversion equals DeepSpeed's own consolidation."""
import pytest
import torch

from megalm.checkpoint.deepspeed import convert_deepspeed_checkpoint
from megalm.checkpoint.load import CheckpointReader
from megalm.config import load_config
from megalm.runtime.spawn import run_distributed
from tests.conftest import tiny_overrides


def _train_and_save(rank, world, overrides, ds_dir):
    """Three optimizer steps under DeepSpeed, then DeepSpeed's native ZeRO checkpoint and megalm's own."""
    from megalm.config import resolve
    from megalm.engine import build_engine
    from megalm.parallel.topology import build_topology
    from megalm.train.checkpointing import save

    cfg = resolve(load_config(None, overrides), world)
    topo = build_topology(cfg.parallel.tp)
    engine = build_engine(cfg, topo, torch.device("cpu"))
    gen = torch.Generator().manual_seed(topo.dp_rank)          # the same batch on every tp rank of a dp rank
    for _ in range(3):
        tokens = torch.randint(0, cfg.model.vocab_size, (2, 17), generator=gen)
        engine.backward(0, engine.forward(0, tokens[:, :-1], tokens[:, 1:]))
        engine.step(1e-2)
    engine.save_native_checkpoint(ds_dir, tag="step3")
    save(engine, cfg, topo, 3, 0, None)


def make_deepspeed_checkpoint(prefix, tmp_path, stage, tp=1, dp=2):
    extra = {"parallel.zero_stage": stage, "model.vocab_size": 512, "train.global_batch_size": 2 * dp,
             "parallel.tp": tp}
    if stage == 3:
        extra["parallel.deepspeed_config"] = "configs/deepspeed/zero3.json"
    overrides = tiny_overrides(prefix, tmp_path / "run", **extra)
    run_distributed(_train_and_save, tp * dp, overrides, str(tmp_path / "ds"))
    return load_config(None, overrides), tmp_path / "ds"


@pytest.mark.parametrize("stage", [3, 2])
def test_converted_zero_checkpoint_equals_deepspeed_consolidation(tiny_corpus, tmp_path, stage):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    cfg, ds_dir = make_deepspeed_checkpoint(tiny_corpus, tmp_path, stage)
    out = convert_deepspeed_checkpoint(ds_dir, tmp_path / "megalm", cfg.model)
    reference = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag="step3")
    reader = CheckpointReader(out)
    names = {n for n in reader.manifest["tensors"] if n.startswith("model.")}
    assert names == {"model." + k.split(".", 2)[2] for k in reference}
    for key, value in reference.items():
        name = "model." + key.split(".", 2)[2]            # "chunks.0.layers.0..." -> "model.layers.0..."
        assert torch.equal(reader.read(name), value.float()), name
    assert reader.manifest["optimizer"]["step"] == 3 and reader.manifest["optimizer"]["has_state"]
    for key in ("exp_avg", "exp_avg_sq"):
        moment = reader.read(f"optim.{key}.layers.0.attn.wq.weight")
        assert moment.shape == reference["chunks.0.layers.0.attn.wq.weight"].shape and moment.abs().sum() > 0


@pytest.mark.parametrize("stage,tp", [(2, 1), (3, 2)])
def test_cli_from_deepspeed_with_verify(tiny_corpus, tmp_path, stage, tp):
    """megalm convert from-deepspeed --verify: logits of DeepSpeed's own consolidation (zero_to_fp32, loaded
    safely, per model-parallel rank) equal the converted model's; ZeRO-3 and tensor parallelism included."""
    import yaml

    from megalm.checkpoint.convert import ConvertError, main

    cfg, ds_dir = make_deepspeed_checkpoint(tiny_corpus, tmp_path, stage, tp=tp)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    args = ["from-deepspeed", "--src", str(ds_dir), "--dst", str(tmp_path / "out"), "--config", str(config_file),
            "--tag", "step3"]
    assert main(args + ["--verify"]) == 0
    with pytest.raises(ConvertError, match="never overwrites"):
        main(args)
    # ... and on to one consolidated model: whole (unsharded) tensors in Hugging Face's layout, logits verified
    assert main(["to-hf", "--src", str(tmp_path / "out"), "--dst", str(tmp_path / "hf"), "--verify"]) == 0
    from safetensors import safe_open

    files = sorted((tmp_path / "hf").glob("*.safetensors"))
    shapes = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
    transformers = pytest.importorskip("transformers", reason="needs transformers (pip install megalm[test])")
    whole = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(tmp_path / "hf"))
    expected = {name: tuple(t.shape) for name, t in whole.state_dict().items()}
    assert shapes and all(shapes[name] == expected[name] for name in shapes), (shapes, expected)
    assert any(shape == (cfg.model.vocab_size, cfg.model.hidden_size) for shape in shapes.values())


@pytest.mark.slow
@pytest.mark.parametrize("stage", [3, 1])
def test_tensor_parallel_zero_checkpoint_converts(tiny_corpus, tmp_path, stage):
    """tp = 2 x dp = 2 (4 processes): DeepSpeed writes one set of files per model-parallel (= tensor-parallel)
    rank. The conversion equals DeepSpeed's own zero_to_fp32 run on each mp rank (safely loaded) and joined,
    and equals megalm's layout-free checkpoint of the same run, weights and Adam moments."""
    from megalm.checkpoint.deepspeed import deepspeed_consolidated
    from megalm.checkpoint.format import latest_checkpoint

    cfg, ds_dir = make_deepspeed_checkpoint(tiny_corpus, tmp_path, stage, tp=2, dp=2)
    out = convert_deepspeed_checkpoint(ds_dir, tmp_path / "megalm", cfg.model, tag="step3")
    converted, own = CheckpointReader(out), CheckpointReader(latest_checkpoint(tmp_path / "run"))
    assert converted.manifest["layout"]["tp"] == 2 and converted.manifest["layout"]["dp"] == 2
    assert set(converted.manifest["tensors"]) == set(own.manifest["tensors"])
    for name in own.manifest["tensors"]:
        torch.testing.assert_close(converted.read(name), own.read(name).float(), rtol=0, atol=0, msg=name)
    reference = deepspeed_consolidated(ds_dir, cfg.model, tag="step3")
    assert {f"model.{n}" for n in reference} == {n for n in converted.manifest["tensors"] if n.startswith("model.")}
    for name, value in reference.items():
        assert torch.equal(converted.read(f"model.{name}"), value.float()), name
    # A config of another model, or with pipeline stages DeepSpeed's file names cannot tell apart: refused, with
    # the numbers, before anything is written.
    import dataclasses

    from megalm.checkpoint.deepspeed import DeepSpeedCheckpointError

    other = dataclasses.replace(cfg.model, ffn_hidden_size=cfg.model.ffn_hidden_size * 2)
    with pytest.raises(DeepSpeedCheckpointError, match="another model config"):
        convert_deepspeed_checkpoint(ds_dir, tmp_path / "other", other, tag="step3")
    piped = load_config(None, [f"model.num_layers={cfg.model.num_layers}", "parallel.pp=2"])
    piped.model = cfg.model
    with pytest.raises(DeepSpeedCheckpointError, match="parallel.pp=2"):
        convert_deepspeed_checkpoint(ds_dir, tmp_path / "piped", piped, tag="step3")
    assert not (tmp_path / "piped").exists()
    assert not any((tmp_path / "other").rglob("*.safetensors"))


def _train_cli(rank, world, overrides):
    from megalm.train.loop import train

    train(load_config(None, overrides))


@pytest.mark.slow
def test_train_writes_deepspeed_native_checkpoints_that_convert_back(tiny_corpus, tmp_path):
    """`megalm train ... checkpoint.deepspeed_native=true` under ZeRO-3 on 2 processes also writes DeepSpeed's own
    checkpoint; `megalm convert from-deepspeed --verify` of it equals megalm's own checkpoint of the same step."""
    import yaml

    from megalm.checkpoint.convert import main
    from megalm.checkpoint.format import latest_checkpoint

    run = tmp_path / "run"
    overrides = tiny_overrides(tiny_corpus, run, **{
        "parallel.zero_stage": 3, "parallel.deepspeed_config": "configs/deepspeed/zero3.json", "train.steps": 3,
        "train.global_batch_size": 4, "checkpoint.deepspeed_native": "true", "optimizer.name": "adamw"})
    run_distributed(_train_cli, 2, overrides)
    assert (run / "deepspeed" / "latest").read_text().strip() == "global_step3"
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(load_config(None, overrides).to_dict()))
    assert main(["from-deepspeed", "--src", str(run / "deepspeed"), "--dst", str(tmp_path / "out"),
                 "--config", str(config_file), "--verify"]) == 0
    converted, own = CheckpointReader(latest_checkpoint(tmp_path / "out")), CheckpointReader(latest_checkpoint(run))
    assert converted.manifest["step"] == own.manifest["step"] == 3
    assert "tokenizer.json" in converted.manifest["files"]            # the dataset's, as training saved it
    assert set(converted.manifest["tensors"]) == set(own.manifest["tensors"])
    for name in own.manifest["tensors"]:
        assert torch.equal(converted.read(name), own.read(name).float()), name
