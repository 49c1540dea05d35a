"""`megalm convert` from DeepSpeed ZeRO checkpoints: the streamed conversion equals DeepSpeed's own consolidation."""
import pytest
import torch

from megalm.checkpoint.deepspeed import convert_deepspeed_checkpoint
from megalm.checkpoint.load import CheckpointReader
from megalm.config import load_config
from megalm.testing import run_distributed
from tests.conftest import tiny_overrides


def _train_and_save(rank, world, overrides, ds_dir):
    """Three optimizer steps under DeepSpeed, then DeepSpeed's native ZeRO checkpoint."""
    from megalm.engine import DeepSpeedEngine, build_deepspeed_chunks
    from megalm.parallel.topology import build_topology

    cfg = load_config(None, overrides)
    topo = build_topology()
    engine = DeepSpeedEngine(cfg, topo, build_deepspeed_chunks(cfg, topo, torch.device("cpu")), torch.device("cpu"))
    gen = torch.Generator().manual_seed(rank)
    for _ in range(3):
        tokens = torch.randint(0, cfg.model.vocab_size, (2, 17), generator=gen)
        engine.backward(0, engine.forward(0, tokens[:, :-1], tokens[:, 1:]))
        engine.step(1e-2)
    engine.save_deepspeed_checkpoint(ds_dir, tag="step3")


def make_deepspeed_checkpoint(prefix, tmp_path, stage):
    extra = {"parallel.zero_stage": stage, "model.vocab_size": 512, "train.global_batch_size": 4}
    if stage == 3:
        extra["parallel.deepspeed_config"] = "configs/deepspeed/zero3.json"
    overrides = tiny_overrides(prefix, tmp_path / "run", **extra)
    run_distributed(_train_and_save, 2, overrides, str(tmp_path / "ds"))
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


def test_cli_from_deepspeed_with_verify(tiny_corpus, tmp_path):
    """megalm convert from-deepspeed --verify: logits of DeepSpeed's stored module equal the converted model's."""
    import yaml

    from megalm.checkpoint.convert import ConvertError, main

    cfg, ds_dir = make_deepspeed_checkpoint(tiny_corpus, tmp_path, 2)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    args = ["from-deepspeed", "--src", str(ds_dir), "--dst", str(tmp_path / "out"), "--config", str(config_file),
            "--tag", "step3"]
    assert main(args + ["--verify"]) == 0
    with pytest.raises(ConvertError, match="never overwrites"):
        main(args)
