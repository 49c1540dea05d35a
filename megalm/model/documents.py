"""Packed documents of a micro-batch, from their segment ids (B, T), each position's document: where each
document starts, the positions that restart there, the block-diagonal causal mask, and ``Documents``, the form
attention takes them in (segment ids for the Triton kernel, the dense mask for the PyTorch path)."""
from __future__ import annotations

import torch


def document_starts(segments: torch.Tensor) -> torch.Tensor:
    """(B, T): the first position of each position's document (where its segment id began)."""
    index = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values


def document_positions(segments: torch.Tensor) -> torch.Tensor:
    """Positions (B, T) that restart at 0 where the segment id changes: each packed document from its start."""
    return torch.arange(segments.shape[1], device=segments.device) - document_starts(segments)


def document_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) boolean: query i may attend to key j when both lie in one document and j <= i."""
    same = segments[:, :, None] == segments[:, None, :]
    return (same & torch.ones_like(same[0], dtype=torch.bool).tril())[:, None]


class Documents:
    """The packed documents as attention takes them: ``segments`` (B, T) for the Triton kernel; the dense mask
    (``document_mask``) for the PyTorch path, built once on first use and shared by every layer."""

    def __init__(self, segments: torch.Tensor):
        self.segments, self._dense = segments, None

    def dense(self) -> torch.Tensor:
        if self._dense is None:
            self._dense = document_mask(self.segments)
        return self._dense
