"""The interface every selection method implements, and what it may use of the runtime that drives it."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from ..config import SparseConfig
from ..kvcache import Batch, KVStore
from ..selection.base import Selector


@dataclass
class Selection:
    """Token positions chosen between the sinks and the recent window, per (row, KV head).

    ``idx [B, KVH, k]`` absolute positions; ``valid`` (same shape, bool) marks the entries to attend, or None if all
    (entries outside ``[sink, cache - recent)`` are never attended). ``candidates``: ``idx`` holds candidates (more
    than k) the layer's true query picks the exact top-k from, in-line.
    """
    idx: torch.Tensor
    valid: torch.Tensor | None = None
    candidates: bool = False


class SelectionContext(Protocol):
    """What a method may use of the runtime that drives it (:class:`~asyncspade.runtime.SparseRuntime`)."""
    store: KVStore                          # keys (and page min/max) of every layer and slot
    selector: Selector | None               # methods that select ahead: where their selections are computed
    scale: float                            # the attention's softmax scale
    kv_heads: int
    xlayer_targets: dict[int, list[int]]    # layer -> the later layers whose queries its incoming residual forecasts


class SelectionMethod:
    name = "base"
    ahead = False            # the selection is computed before the layer runs (by the selector), not inside it

    @classmethod
    def needs_pages(cls, cfg: SparseConfig) -> bool:
        """Whether, with settings ``cfg``, the KV store must keep Quest page min/max for this method."""
        return False

    @classmethod
    def needs_sketch(cls, cfg: SparseConfig) -> bool:
        """Whether, with settings ``cfg``, the KV store must keep the 4-bit key sketch for this method."""
        return False

    @classmethod
    def store_needs(cls, cfg: SparseConfig) -> dict[str, bool]:
        """What the KV store must derive from the keys for this method: :class:`~asyncspade.kvcache.KVStore`'s
        ``track_pages`` and ``track_sketch``."""
        return {"track_pages": cls.needs_pages(cfg), "track_sketch": cls.needs_sketch(cfg)}

    def __init__(self, cfg: SparseConfig):
        self.cfg = cfg

    def selection_rows(self, plan=None) -> tuple[tuple[float, float], tuple[float, float]]:
        """Rows (a key row, or a page's min or max row: one KV head set of head_dim values each) the selection of one
        sparse layer reads per sequence and decode step, each as ``(fixed, per cached token)``: ``(in-line,
        ahead)``. In-line reads sit on the decode loop's critical path; ahead reads are a selector's."""
        return (0.0, 0.0), (0.0, 0.0)

    def inline_rows(self, plan=None, synchronous: bool = True) -> tuple[float, float]:
        """K/V rows one sparse layer's decode step reads per sequence on the critical path, as ``(fixed, per cached
        token)``: attending the budget plus the in-line selection (and the ahead one when it runs in the decode
        loop's thread). The cost model weighs them against dense attention's ``(0, 2)``."""
        (i0, i1), (a0, a1) = self.selection_rows(plan)
        if not synchronous:
            a0 = a1 = 0.0
        return 2 * self.cfg.budget + i0 + a0, i1 + a1

    def select(self, ctx: SelectionContext, layer: int, q: torch.Tensor, batch: Batch) -> Selection | None:
        """Called inside a sparse layer's decode attention with the true current query ``q [B, H, D]`` when some
        row's cache exceeds the budget. Return None for dense attention."""
        raise NotImplementedError

    def observe(self, ctx: SelectionContext, layer: int, q: torch.Tensor, batch: Batch) -> None:
        """Called after a sparse layer's attention with its real queries ``[B, H, L, D]`` (decode or final prefill
        chunk). Methods that select ahead feed the selector here."""

    def before_layer(self, ctx: SelectionContext, layer: int, forecast: Callable[[int], torch.Tensor],
                     batch: Batch) -> None:
        """Called when the residual stream enters decoder layer ``layer`` during decode; ``forecast(target)`` is
        the cross-layer forecast ``[B, H, D]`` of a later layer's query computed from that residual."""
