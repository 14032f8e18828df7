"""StreamingLLM: the sink tokens plus the most recent window; no query involved."""
import torch

from ..kvcache import Batch
from .base import Selection, SelectionContext, SelectionMethod


class Streaming(SelectionMethod):
    name = "streaming"

    def select(self, ctx: SelectionContext, layer: int, q: torch.Tensor, batch: Batch) -> Selection:
        k = self.cfg.k_mid
        first = (batch.lengths - self.cfg.recent - k).clamp(min=self.cfg.sink)       # [B]
        idx = first[:, None] + torch.arange(k)                                         # [B, k]
        return Selection(idx[:, None, :].expand(-1, ctx.kv_heads, -1))
