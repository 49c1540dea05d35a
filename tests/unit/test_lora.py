"""LoRA: the adapters start the model equal to its base, merged and unmerged give equal logits (fp32, 1e-5) at
tp = 1 and (slow) tp = 2 with sequence parallelism and with K/V heads replicated, the gradients of the adapters
at tp = 2 equal tp = 1's, and only the adapters train."""
import zlib

import pytest
import torch
import torch.nn.functional as F

from megalm.config import ModelConfig
from megalm.model.lora import add_lora, is_adapter, merged_state
from megalm.model.transformer import ModelChunk, full_logits, init_chunk
from megalm.parallel.topology import TensorParallel

MODELS = {
    "gpt": ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=32),
    "llama": ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         norm="rmsnorm", activation="swiglu", position="rope", bias=False, ffn_hidden_size=64),
    "llama-kv1": ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=1,
                             norm="rmsnorm", activation="swiglu", position="rope", bias=False, ffn_hidden_size=64),
}
TARGETS = {"gpt": ("wq", "wk", "wv", "wo", "w_in", "w_out"),
           "llama": ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_out")}
RANK, ALPHA = 4, 8.0


def model(cfg: ModelConfig, tp: TensorParallel, lora: bool = True) -> ModelChunk:
    chunk = ModelChunk(cfg, tp, range(cfg.num_layers), True, True)
    if lora:
        add_lora(chunk, TARGETS["gpt" if cfg.activation == "gelu" else "llama"], RANK, ALPHA, 0.0)
    init_chunk(chunk, cfg, seed=3)
    return chunk


@torch.no_grad()
def trained_looking(chunk: ModelChunk) -> ModelChunk:
    """B set to a nonzero value (as after training), the same full value in every layout."""
    for name, p in chunk.named_parameters():
        if name.endswith(".lora.b"):
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            p.copy_(p.shard.take(torch.randn(tuple(p.shard.global_shape(p.shape)), generator=gen) * 0.3))
    return chunk


def tokens():
    return torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))


def merged_model(cfg: ModelConfig, unmerged: ModelChunk) -> ModelChunk:
    plain = model(cfg, TensorParallel(), lora=False)
    state = merged_state({n: p.detach() for n, p in unmerged.named_parameters()}, ALPHA / RANK)
    assert set(state) == {n for n, _ in plain.named_parameters()}
    plain.load_state_dict(state)
    return plain


@pytest.mark.parametrize("name", list(MODELS))
def test_adapters_start_the_model_equal_to_its_base_and_only_they_train(name):
    cfg = MODELS[name]
    x = tokens()
    with_lora, base = model(cfg, TensorParallel()), model(cfg, TensorParallel(), lora=False)
    torch.testing.assert_close(with_lora(x), base(x), rtol=0, atol=0)
    trainable = {n for n, p in with_lora.named_parameters() if p.requires_grad}
    assert trainable and all(is_adapter(n) for n in trainable)
    projections = 7 if cfg.activation == "swiglu" else 6
    assert len(trainable) == 2 * projections * cfg.num_layers


@pytest.mark.parametrize("name", list(MODELS))
def test_merged_and_unmerged_give_equal_logits(name):
    cfg = MODELS[name]
    unmerged = trained_looking(model(cfg, TensorParallel()))
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(merged_model(cfg, unmerged)(x), unmerged(x), rtol=1e-5, atol=1e-5)
        assert (unmerged(x) - model(cfg, TensorParallel(), lora=False)(x)).abs().max() > 1e-2   # B matters


def _logits_and_adapter_grads(chunk, tp):
    x = tokens()
    logits = full_logits(chunk(x), tp)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
    return logits.detach(), {n: p.grad for n, p in chunk.named_parameters() if p.requires_grad}


def _tp2(rank, world, name, queue):
    import torch.distributed as dist

    from megalm.parallel.topology import build_topology

    cfg = MODELS[name]
    topo = build_topology(2, 1, sequence_parallel=True)
    tp = topo.tensor_parallel
    chunk = trained_looking(model(cfg, tp))
    logits, grads = _logits_and_adapter_grads(chunk, tp)
    reference = trained_looking(model(cfg, TensorParallel()))
    ref_logits, ref_grads = _logits_and_adapter_grads(reference, TensorParallel())
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(logits, merged_model(cfg, reference)(tokens()), rtol=1e-5, atol=1e-5)
    params = dict(chunk.named_parameters())
    for n, g in grads.items():
        torch.testing.assert_close(g, params[n].shard.take(ref_grads[n]), rtol=1e-4, atol=1e-6, msg=n)
    dist.barrier()
    if rank == 0:
        queue.put(len(grads))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_lora_at_tp2_equals_tp1_and_its_merge(name):
    from megalm.runtime.spawn import run_distributed

    queue = torch.multiprocessing.get_context("spawn").SimpleQueue()
    run_distributed(_tp2, 2, name, queue)
    assert queue.get() > 0
