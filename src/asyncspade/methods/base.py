"""The interface every selection method implements."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import SparseConfig


@dataclass
class Selection:
    """Token positions chosen between the sinks and the recent window, per (row, KV head).

    ``idx [B, KVH, k]`` absolute positions; ``valid`` (same shape, bool) marks the entries to attend, or None if all.
    """
    idx: torch.Tensor
    valid: torch.Tensor | None = None


class SelectionMethod:
    name = "base"
    ahead = False            # the selection is computed before the layer runs (by the selector), not inside it

    @classmethod
    def needs_pages(cls, cfg: SparseConfig) -> bool:
        """Whether, with settings ``cfg``, the KV store must keep Quest page min/max for this method."""
        return False

    def __init__(self, cfg: SparseConfig):
        self.cfg = cfg

    def select(self, ctx, layer: int, q: torch.Tensor, batch) -> Selection | None:
        """Called inside a sparse layer's decode attention with the true current query ``q [B, H, D]`` when some
        row's cache exceeds the budget. Return None for dense attention."""
        raise NotImplementedError

    def observe(self, ctx, layer: int, q: torch.Tensor, batch) -> None:
        """Called after a sparse layer's attention with its real queries ``[B, H, L, D]`` (decode or final prefill
        chunk). Methods that select ahead feed the selector here."""

    def before_layer(self, ctx, layer: int, forecast, batch) -> None:
        """Called when the residual stream enters decoder layer ``layer`` during decode; ``forecast(target)`` is
        the cross-layer forecast ``[B, H, D]`` of a later layer's query computed from that residual."""
