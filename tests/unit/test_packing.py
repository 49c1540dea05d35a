"""Packed documents: inside one sequence each document's logits and gradients equal those of the document alone
(fp32, 1e-5), with learned positions and with RoPE, at tp = 1 and (slow) tp = 2 with sequence parallelism, on the
PyTorch path (SDPA with the block-diagonal mask) and with the Triton kernel (segment ids, under the interpreter
on a CPU); the boundary target is ignored; data.document_mask and data.pack build the segments."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megalm.config import ModelConfig
from megalm.data.chat_dataset import IGNORE, inputs_and_targets, pack_in_order
from megalm.model.transformer import ModelChunk, full_logits, init_chunk
from megalm.parallel.topology import TensorParallel

MODELS = {
    "gpt": ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=32),
    "llama": ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         norm="rmsnorm", activation="swiglu", position="rope", bias=False, ffn_hidden_size=64),
}


def model(cfg: ModelConfig, tp: TensorParallel, kernel: str = "torch") -> ModelChunk:
    from megalm.model.ops import build_ops

    chunk = ModelChunk(cfg, tp, range(cfg.num_layers), True, True, build_ops(kernel, "torch"))
    assert chunk.ops.impls["attention"] == kernel
    init_chunk(chunk, cfg, seed=3)
    return chunk


def packed_and_alone(chunk: ModelChunk, tp: TensorParallel):
    """(logits, grads) of A and B packed with padding, and of A and B each alone."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 64, (9,), generator=gen), torch.randint(0, 64, (7,), generator=gen)
    pad = torch.zeros(5, dtype=torch.long)                      # 20 inputs: divisible by tp under SP
    batch = torch.stack([torch.cat([a, b, pad]), torch.cat([torch.ones(16), torch.zeros(5)]).long(),
                         torch.cat([torch.full((9,), 1), torch.full((7,), 2), torch.zeros(5)]).long()])[None]
    inputs, targets, segments = inputs_and_targets(batch)
    assert targets[0, 8] == IGNORE                               # the last of A never predicts the first of B

    def run(x, y, seg):
        chunk.zero_grad()
        logits = full_logits(chunk(x, segments=seg), tp)
        F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum").backward()
        return logits.detach(), {n: p.grad.clone() for n, p in chunk.named_parameters()}
    packed_logits, packed_grads = run(inputs, targets, segments)
    alone_logits, alone_grads = [], {}
    for doc in (a, b):
        logits, grads = run(doc[None, :-1], doc[None, 1:], None)
        alone_logits.append(logits[0])
        for n, g in grads.items():
            alone_grads[n] = alone_grads.get(n, 0) + g
    return packed_logits[0], packed_grads, alone_logits, alone_grads


@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("name", list(MODELS))
def test_packed_documents_equal_documents_alone(name, kernel):
    packed, packed_grads, alone, alone_grads = packed_and_alone(model(MODELS[name], TensorParallel(), kernel),
                                                                TensorParallel())
    torch.testing.assert_close(packed[:8], alone[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed[9:15], alone[1], rtol=1e-5, atol=1e-6)
    for n in packed_grads:
        torch.testing.assert_close(packed_grads[n], alone_grads[n], rtol=1e-5, atol=1e-6, msg=n)


def _tp2(rank, world, name, kernel, queue):
    import torch.distributed as dist

    from megalm.parallel.topology import build_topology

    topo = build_topology(2, 1, sequence_parallel=True)
    tp = topo.tensor_parallel
    packed, packed_grads, alone, alone_grads = packed_and_alone(model(MODELS[name], tp, kernel), tp)
    reference = packed_and_alone(model(MODELS[name], TensorParallel()), TensorParallel())
    torch.testing.assert_close(packed[:8], alone[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed[9:15], alone[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed, reference[0], rtol=1e-5, atol=1e-6)       # tp = 2 equals tp = 1
    for n in packed_grads:
        torch.testing.assert_close(packed_grads[n], alone_grads[n], rtol=1e-5, atol=1e-6, msg=n)
    dist.barrier()
    if rank == 0:
        queue.put(len(packed_grads))


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("name", list(MODELS))
def test_packed_documents_at_tp2_with_sequence_parallelism(name, kernel):
    from megalm.runtime.spawn import run_distributed

    queue = torch.multiprocessing.get_context("spawn").SimpleQueue()
    run_distributed(_tp2, 2, name, kernel, queue)
    assert queue.get() > 5


def test_document_mask_segments_follow_the_end_of_document_token(tiny_corpus):
    from megalm.data.dataset import TokenDataset
    from megalm.data.tokenizer import dataset_tokenizer

    eod = dataset_tokenizer(tiny_corpus).eod_id
    data = TokenDataset(tiny_corpus, "train", 256, document_eod=eod)
    sample = next(s for s in (data.sample(k) for k in range(len(data))) if (s[0] == eod).any())
    tokens, mask, segments = sample
    assert mask.all() and segments[0] == 0
    for i in np.flatnonzero(tokens[:-1] == eod):
        assert segments[i + 1] == segments[i] + 1                # a new document after each end-of-document
    _, targets, _ = inputs_and_targets(torch.from_numpy(sample)[None])
    assert all(targets[0, i] == IGNORE for i in np.flatnonzero(tokens[:-1] == eod))


def test_packing_fills_samples_in_order():
    assert pack_in_order(np.array([5, 4, 3, 9, 1, 1]), 10) == [[0, 1], [2], [3, 4], [5]]
    assert pack_in_order(np.array([10, 10]), 10) == [[0], [1]]
