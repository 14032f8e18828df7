"""StreamingLLM: the sink tokens plus the most recent window; no query involved."""
import torch

from .base import Selection, SelectionMethod


class Streaming(SelectionMethod):
    name = "streaming"

    def select(self, ctx, layer, q, batch):
        k = self.cfg.k_mid
        first = (batch.lengths - self.cfg.recent - k).clamp(min=self.cfg.sink)       # [B]
        idx = first[:, None] + torch.arange(k)                                         # [B, k]
        return Selection(idx[:, None, :].expand(-1, ctx.kv_heads, -1))
