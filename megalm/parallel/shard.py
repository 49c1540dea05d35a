"""What a rank holds of each tensor, and the rules that follow from it, each written once:

- ``ShardSpec``: which slice of the full ("master") tensor a parameter holds, and whether it is sharded at all;
- tied embeddings: with pp > 1 the first stage's input embedding and the last stage's head are two copies of
  one weight; the first stage's copy is the tensor (saved and counted there), the last stage's is its copy;
- ownership: which rank writes a tensor's piece into a checkpoint, and which rank's gradient counts in the
  global norm.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ShardSpec:
    """Chunk ``index`` of ``parts`` along ``dim`` of the full tensor; ``dim=None`` means replicated (the whole
    tensor on every rank). A tensor-parallel layer keeps its ``dim`` at tp=1 too, with ``parts`` 1."""
    dim: int | None
    parts: int = 1
    index: int = 0

    @property
    def is_sharded(self) -> bool:
        """Whether ranks hold different slices (the only rule for "is this tensor sharded")."""
        return self.dim is not None and self.parts > 1

    @property
    def sharded_dim(self) -> int | None:
        """The dimension the slices are cut along, or None for a tensor every rank holds whole."""
        return self.dim if self.is_sharded else None

    def bounds(self, full_size: int) -> tuple[int, int]:
        """[start, stop) of this slice along ``sharded_dim`` of a tensor of ``full_size`` there."""
        if not self.is_sharded:
            return 0, full_size
        return self.index * full_size // self.parts, (self.index + 1) * full_size // self.parts

    def global_shape(self, local_shape) -> torch.Size:
        shape = list(local_shape)
        if self.dim is not None:
            shape[self.dim] *= self.parts
        return torch.Size(shape)

    def take(self, master: torch.Tensor) -> torch.Tensor:
        """This rank's slice of ``master`` (a contiguous copy)."""
        return self.view(master).clone(memory_format=torch.contiguous_format)

    def view(self, master: torch.Tensor) -> torch.Tensor:
        """This rank's slice of ``master`` as a view (no copy; strided when ``dim`` > 0)."""
        if self.dim is None:
            return master
        if master.shape[self.dim] % self.parts:
            raise ValueError(f"cannot cut dim {self.dim} of a {tuple(master.shape)} tensor into {self.parts} "
                             f"equal parts; the master tensor does not match this layer")
        return master.chunk(self.parts, self.dim)[self.index]


REPLICATED = ShardSpec(None)


def spec_of(param) -> ShardSpec:
    return getattr(param, "shard", REPLICATED)


def is_tied_copy(chunk, name: str, pp: int) -> bool:
    """The last stage's copy of a tied embedding (pp > 1): the first stage's tensor, saved and counted there."""
    return pp > 1 and chunk.last and not chunk.first and name == "embed.weight"


def tied_embedding_params(chunks, pp: int) -> list:
    """The embedding copies that tie the first stage's input to the last stage's head (pp > 1 only)."""
    if pp == 1:
        return []
    return [chunk.embed.weight for chunk in chunks
            if hasattr(chunk, "embed") and chunk.cfg.tie_embeddings and (chunk.first or chunk.last)]


def writes_piece(spec: ShardSpec, tp_rank: int, dp_rank: int = 0) -> bool:
    """Whether this rank stores its piece: data-parallel rank 0 writes; of a replicated tensor, TP rank 0 only."""
    return dp_rank == 0 and (spec.is_sharded or tp_rank == 0)


def counts_in_norm(chunk, name: str, param, pp: int, tp_rank: int) -> bool:
    """Whether this rank's copy of ``param`` contributes to the global gradient norm: TP shards all count (they are
    summed over the TP group); replicated tensors on TP rank 0 only; the tied copy on the first stage only."""
    return not is_tied_copy(chunk, name, pp) and (spec_of(param).is_sharded or tp_rank == 0)
