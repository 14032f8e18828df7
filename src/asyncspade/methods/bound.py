"""The zero-cost selection bound (benchmarks only): the same sparse forward fed fixed, precomputed indices, so
its TPOT is that of budget-k attention with no selection work at all."""
import torch

from ..kvcache import Batch
from .base import Selection, SelectionContext, SelectionMethod


class Bound(SelectionMethod):
    name = "bound"

    def __init__(self, cfg):
        super().__init__(cfg)
        self._idx: dict[tuple[int, int], torch.Tensor] = {}

    def select(self, ctx: SelectionContext, layer: int, q: torch.Tensor, batch: Batch) -> Selection:
        key = (layer, batch.size)
        idx = self._idx.get(key)
        if idx is None:                      # spread over the candidates once; reused unchanged afterwards
            c = self.cfg
            span = torch.linspace(c.sink, batch.min_len - c.recent - 1, c.k_mid).long()
            idx = self._idx[key] = span.expand(batch.size, ctx.kv_heads, -1).contiguous()
        return Selection(idx)
