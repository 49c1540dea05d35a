"""The FLOP count agrees with torch's own FlopCounterMode on the real model (GQA, SwiGLU, GELU, LM head)."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megalm.config import ModelConfig
from megalm.flops import flops_per_token
from megalm.model.transformer import ModelChunk, init_chunk
from megalm.parallel.topology import TensorParallel


@pytest.mark.parametrize("model", [
    ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=2, ffn_hidden_size=160,
                max_seq_len=64, norm="rmsnorm", activation="swiglu", position="rope", bias=False,
                tie_embeddings=False),
    ModelConfig(vocab_size=256, hidden_size=64, num_layers=3, num_heads=4, max_seq_len=64),
    ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=24,
                qk_norm=True, ffn_hidden_size=160, max_seq_len=64, norm="rmsnorm", activation="swiglu",
                position="rope", bias=False, tie_embeddings=True),
], ids=["llama-gqa", "gpt2", "qwen3-head-dim"])
def test_flops_match_torch_counter(model):
    net = ModelChunk(model, TensorParallel(), range(model.num_layers), True, True)
    init_chunk(net, model, 0)
    b, s = 2, 48
    tokens = torch.randint(0, model.vocab_size, (b, s + 1))
    # The math backend runs attention as visible matmuls; the fused CPU kernel is invisible to the counter.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        net(tokens[:, :-1], tokens[:, 1:]).backward()
    counted = counter.get_total_flops()
    ours = flops_per_token(model, s)
    # Both count matmuls only (softmax, norms and elementwise work are ignored by both): exact agreement.
    assert counted == ours.model * b * s
    # Megatron's convention: the attention core (the math backend's batched matmuls, QK^T and PV, forward and
    # backward) counts half, as a causal kernel computes only the lower triangle; the projections stay whole.
    by_op = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    assert "aten.bmm" in by_op and set(by_op) <= {"aten.mm", "aten.addmm", "aten.bmm"}   # addmm: biases
    assert ours.model_causal * b * s == counted - by_op["aten.bmm"] / 2


def test_recomputation_counts_as_hardware_flops():
    m = ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, max_seq_len=64)
    none, full, selective = (flops_per_token(m, 32, r) for r in ("none", "full", "selective"))
    assert none.model == full.model == selective.model == none.hardware
    assert none.hardware < selective.hardware < full.hardware


@pytest.mark.parametrize("model", [
    ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=2, ffn_hidden_size=160,
                max_seq_len=64, norm="rmsnorm", activation="swiglu", position="rope", bias=False),
    ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, max_seq_len=64),
], ids=["llama-gqa", "gpt2"])
def test_packed_documents_count_the_attention_of_their_own_lengths(model):
    """A sequence packing documents of 20, 12 and 16 tokens: our count with the documents' attention span
    equals FlopCounterMode over the three documents run alone (what a variable-length kernel computes), in both
    conventions, and is below the padded count."""
    import torch

    from megalm.flops import attention_span_of

    net = ModelChunk(model, TensorParallel(), range(model.num_layers), True, True)
    init_chunk(net, model, 0)
    lengths = (20, 12, 16)
    segments = torch.cat([torch.full((n,), i + 1) for i, n in enumerate(lengths)])[None]
    span = attention_span_of(segments)
    assert span == sum(n * n for n in lengths) / sum(lengths)
    counted = causal = 0
    for n in lengths:
        tokens = torch.randint(0, model.vocab_size, (1, n + 1))
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            net(tokens[:, :-1], tokens[:, 1:]).backward()
        counted += counter.get_total_flops()
        causal += counter.get_total_flops() - counter.get_flop_counts()["Global"][torch.ops.aten.bmm] / 2
    ours = flops_per_token(model, 48, attention_span=span)
    assert ours.model * 48 == pytest.approx(counted, rel=1e-9)
    assert ours.model_causal * 48 == pytest.approx(causal, rel=1e-9)
    assert ours.model < flops_per_token(model, 48).model
