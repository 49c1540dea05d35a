"""``--verify``: the same fixed batches through the model before and after a conversion; the logits must agree.

Three batches: two short random sequences, one at the longest length asked for (``--verify-seq-len``, default
1024, capped at model.max_seq_len: RoPE scaling and learned positions act there), and one holding the last token
of the vocabulary. The limit is relative to the logits' scale: max |difference| <= 1e-5 x max(1, max |logit|),
plus KL(before || after) of the next-token distributions <= 1e-9 (mean over positions); the worst position is
reported. A model small enough to be initialised at std 0.02 has logits near 0, where an absolute limit alone
would let a wrong model pass.
"""
from __future__ import annotations

import torch

from megalm.checkpoint.format import latest_checkpoint
from megalm.checkpoint.load import CheckpointReader
from megalm.config import Config, ModelConfig
from megalm.model.transformer import ModelChunk
from megalm.parallel.topology import TensorParallel

MAX_REL, MAX_KL = 1e-5, 1e-9


class VerifyError(RuntimeError):
    """The converted model does not compute what the source computed."""


def single_model(path) -> tuple[ModelChunk, ModelConfig]:
    """The whole model of a megalm checkpoint in one process, fp32."""
    reader = CheckpointReader(latest_checkpoint(path) or path)
    cfg = Config.from_dict(reader.manifest["config"])
    model_cfg = cfg.model
    model = ModelChunk(model_cfg, TensorParallel(), range(model_cfg.num_layers), True, True)
    if cfg.lora.rank:                                    # a LoRA checkpoint: its base and adapters, unmerged
        from megalm.config.rules import lora_targets
        from megalm.model.lora import add_lora

        add_lora(model, lora_targets(cfg), cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout)
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


def verification_batches(model_cfg: ModelConfig, longest: int = 1024) -> list[torch.Tensor]:
    """Short random, long random, and one ending in the last token of the vocabulary."""
    gen = torch.Generator().manual_seed(1234)
    vocab, long = model_cfg.vocab_size, max(2, min(longest, model_cfg.max_seq_len))
    short = torch.randint(0, vocab, (2, min(16, model_cfg.max_seq_len)), generator=gen)
    edge = short[:1].clone()
    edge[0, -1], edge[0, 0] = vocab - 1, vocab - 1
    return [short, torch.randint(0, vocab, (1, long), generator=gen), edge]


@torch.no_grad()
def compare(before, after, tokens, what: str) -> dict:
    """One batch: the largest difference relative to the logits' scale, the mean KL, and where it is worst."""
    a, b = before(tokens).double(), after(tokens).double()
    if a.shape != b.shape:
        raise VerifyError(f"{what}: logits of shape {tuple(a.shape)} before and {tuple(b.shape)} after")
    diff = (a - b).abs()
    scale = max(1.0, float(a.abs().max()))
    worst = int(diff.amax(-1).argmax())
    where = (worst // a.shape[1], worst % a.shape[1])
    kl = float(torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True,
                                          reduction="none").sum(-1).mean())
    result = {"max_abs": float(diff.max()), "relative": float(diff.max()) / scale, "kl": kl,
              "worst": where, "shape": tuple(tokens.shape)}
    print(f"verify {what} on {tuple(tokens.shape)}: max |logit difference| {result['max_abs']:.3e} = "
          f"{result['relative']:.3e} of the logits' scale {scale:.3g} (limit {MAX_REL:g}), KL {kl:.3e} (limit "
          f"{MAX_KL:g}), worst at sequence {where[0]} position {where[1]}", flush=True)
    if not (result["relative"] <= MAX_REL and kl <= MAX_KL):
        raise VerifyError(f"{what}: the converted model disagrees with the source on a {tuple(tokens.shape)} batch "
                          f"(max |diff| {result['max_abs']:.3e}, {result['relative']:.3e} of the logits' scale; KL "
                          f"{kl:.3e}; worst at sequence {where[0]} position {where[1]}); nothing was committed")
    return result


def verify(before, after, model_cfg: ModelConfig, what: str, longest: int = 1024) -> list[dict]:
    """Every verification batch; raises VerifyError at the first that disagrees."""
    return [compare(before, after, tokens, what) for tokens in verification_batches(model_cfg, longest)]


def megalm_logits_fn(path):
    model, _ = single_model(path)
    return lambda tokens: model(tokens)
