"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), tensor-parallel aware.

A targeted projection y = x W^T keeps W frozen and gains y += (alpha / r) * x A^T B^T with A (r, in) and B (out, r).
The adapter is a child module ``lora`` of the projection, so its tensors are named ``<projection>.lora.a`` and
``.lora.b`` in every layout, and are cut like their base:

- column-parallel W (output features split): B is split along its rows like W; A is replicated, and since each
  rank's B sees only its output features, A's gradient is summed over the TP group;
- row-parallel W (input features split): A is split along its columns like W; B is replicated. The update is
  added to the partial product before the reduction (the all-reduce or reduce-scatter sums the ranks' pieces of
  x A^T as it sums x W^T: no collective of its own), and B's gradient is summed over the TP group;
- K/V replicated because kv heads < tp: both replicated, gradients summed, B's rows cut to the rank's head.

A starts as PEFT's kaiming-uniform bound 1/sqrt(in) from a generator seeded by the tensor's name, B as zeros, so
the model starts equal to its base. ``merge`` folds an adapter into full (layout-free) weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megalm.parallel.shard import ShardSpec
from megalm.parallel.tensor.mappings import reduce_grad_over_tp
from megalm.parallel.tensor.random import tp_rng
from megalm.parallel.topology import TensorParallel

# where each projection lives in a block, and whether its base is split by output (column) or input (row)
PROJECTIONS = {"wq": ("attn", "column"), "wk": ("attn", "column"), "wv": ("attn", "column"),
               "wo": ("attn", "row"), "w_gate": ("mlp", "column"), "w_up": ("mlp", "column"),
               "w_in": ("mlp", "column"), "w_out": ("mlp", "row")}


def _param(shape, spec: ShardSpec) -> nn.Parameter:
    p = nn.Parameter(torch.zeros(shape))
    p.shard = spec
    p.tensor_model_parallel = spec.is_sharded     # DeepSpeed's grad-norm bookkeeping, as for the base layers
    p.partition_dim = spec.dim if spec.is_sharded else -1
    p.partition_stride = 1
    return p


class LoRA(nn.Module):
    """The low-rank update of one projection; ``forward(x)`` returns this rank's share of (alpha/r) x A^T B^T:
    its output features (column), its partial sum (row), or the rows ``rows`` of B (replicated K/V)."""

    def __init__(self, base: nn.Module, kind: str, rank: int, alpha: float, dropout: float, tp: TensorParallel):
        super().__init__()
        self.kind, self.rank, self.scale, self.dropout, self.tp = kind, rank, alpha / rank, dropout, tp
        out_local, in_local = tuple(getattr(base.weight, "ds_shape", base.weight.shape))
        replicated = ShardSpec(None)
        if kind == "column":
            self.a = _param((rank, in_local), replicated)
            self.b = _param((out_local, rank), ShardSpec(0, tp.size, tp.rank))
        elif kind == "row":
            self.a = _param((rank, in_local), ShardSpec(1, tp.size, tp.rank))
            self.b = _param((out_local, rank), replicated)
        else:                                          # "replicated": a whole projection on every rank
            self.a = _param((rank, in_local), replicated)
            self.b = _param((out_local, rank), replicated)

    def forward(self, x: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        a, b = self.a, self.b
        if self.kind in ("column", "replicated"):
            a = reduce_grad_over_tp(a, self.tp, kind="lora_grad")
        if self.kind in ("row", "replicated"):
            b = reduce_grad_over_tp(b, self.tp, kind="lora_grad")
        if rows is not None:
            b = b[rows]
        if self.dropout and self.training:
            if self.kind == "row" and self.tp.size > 1:      # a sharded input: each rank draws its own mask
                with tp_rng(0, self.tp, x.device):
                    x = F.dropout(x, self.dropout, True)
            else:
                x = F.dropout(x, self.dropout, True)
        return F.linear(F.linear(x, a), b) * self.scale

    def extra_repr(self) -> str:
        return f"{self.kind}, rank={self.rank}, scale={self.scale:g}, dropout={self.dropout}"


def add_lora(chunk: nn.Module, targets, rank: int, alpha: float, dropout: float) -> None:
    """Give every targeted projection of ``chunk``'s blocks an adapter, and freeze everything else."""
    for param in chunk.parameters():
        param.requires_grad_(False)
    for block in chunk.layers.values():
        for name in targets:
            where, kind = PROJECTIONS[name]
            base = getattr(getattr(block, where), name)
            if where == "attn" and name in ("wk", "wv") and not block.attn.kv_split:
                kind = "replicated"
            base.lora = LoRA(base, kind, rank, alpha, dropout, block.attn.tp)


def lora_update(layer: nn.Module, x: torch.Tensor, rows: slice | None = None):
    """The layer's adapter applied to ``x``, or None when it has none."""
    adapter = getattr(layer, "lora", None)
    return None if adapter is None else adapter(x, rows)


def is_adapter(name: str) -> bool:
    """Whether a (layout-free) tensor name is an adapter's: ``...lora.a`` / ``...lora.b`` (optimizer state too)."""
    return name.endswith((".lora.a", ".lora.b"))


def adapter_pairs(names) -> dict[str, tuple[str, str]]:
    """Base weight name -> (its A, its B) for the adapters among ``names`` (model tensor names, no prefix)."""
    names = set(names)
    pairs = {}
    for name in names:
        if name.endswith(".lora.a"):
            stem = name[: -len(".lora.a")]
            if f"{stem}.lora.b" not in names:
                raise ValueError(f"adapter {stem} has A but no B")
            pairs[f"{stem}.weight"] = (name, f"{stem}.lora.b")
    return pairs


def merge(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale * B A on full tensors, in fp32 (returned in W's dtype)."""
    return (weight.float() + scale * (b.float() @ a.float())).to(weight.dtype)


def merged_state(tensors: dict, scale: float) -> dict:
    """Full (layout-free) model tensors with every adapter folded into its base weight and the adapters gone."""
    pairs = adapter_pairs(tensors)
    out = {}
    for name, t in tensors.items():
        if is_adapter(name):
            continue
        out[name] = merge(t, tensors[pairs[name][0]], tensors[pairs[name][1]], scale) if name in pairs else t
    return out
