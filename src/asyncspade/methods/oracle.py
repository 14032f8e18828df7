"""Exact top-k tokens with the true current query, selected serially inside the layer: the accuracy bound."""
import torch

from ..kvcache import Batch
from ..scoring import topk_tokens
from .base import Selection, SelectionContext, SelectionMethod


class Oracle(SelectionMethod):
    name = "oracle"

    def select(self, ctx: SelectionContext, layer: int, q: torch.Tensor, batch: Batch) -> Selection:
        c = self.cfg
        keys = ctx.store.keys(layer, batch)
        return Selection(topk_tokens(q, keys, c.sink, batch.lengths - c.recent, c.k_mid, ctx.scale, c.aggregate))

    def selection_rows(self, plan=None):
        return (0.0, 1.0), (0.0, 0.0)             # every candidate key scored with the current query, in-line
