"""``--verify``: the same fixed batch through the model before and after a conversion; the logits must agree."""
from __future__ import annotations

import torch

from megalm.checkpoint.format import latest_checkpoint
from megalm.checkpoint.load import CheckpointReader
from megalm.config import Config, ModelConfig
from megalm.model.transformer import ModelChunk
from megalm.parallel.topology import TensorParallel

MAX_ABS, MAX_KL = 1e-5, 1e-9


class VerifyError(RuntimeError):
    """The converted model does not compute what the source computed."""


def single_model(path) -> tuple[ModelChunk, ModelConfig]:
    """The whole model of a megalm checkpoint in one process, fp32."""
    reader = CheckpointReader(latest_checkpoint(path) or path)
    model_cfg = Config.from_dict(reader.manifest["config"]).model
    model = ModelChunk(model_cfg, TensorParallel(), range(model_cfg.num_layers), True, True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(reader.read(f"model.{name}", p.shard, tuple(p.shape)).float())
    return model.eval(), model_cfg


def hf_logits_fn(path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return lambda tokens: model(tokens).logits


def fixed_batch(model_cfg: ModelConfig, vocab: int | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab or model_cfg.vocab_size, (2, min(16, model_cfg.max_seq_len)), generator=gen)


@torch.no_grad()
def compare(before, after, tokens, what: str) -> dict:
    a, b = before(tokens).double(), after(tokens).double()
    if a.shape != b.shape:
        raise VerifyError(f"{what}: logits of shape {tuple(a.shape)} before and {tuple(b.shape)} after")
    max_abs = float((a - b).abs().max())
    kl = float(torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True,
                                          reduction="none").sum(-1).mean())
    print(f"verify {what}: max |logit difference| {max_abs:.3e} (limit {MAX_ABS:g}), KL {kl:.3e} "
          f"(limit {MAX_KL:g})", flush=True)
    if not (max_abs <= MAX_ABS and kl <= MAX_KL):
        raise VerifyError(f"{what}: converted model disagrees with the source (max |diff| {max_abs:.3e}, KL "
                          f"{kl:.3e}); the output is kept for inspection but should not be used")
    return {"max_abs": max_abs, "kl": kl}


def megalm_logits_fn(path):
    model, _ = single_model(path)
    return lambda tokens: model(tokens)
