"""Quest (page-level, synchronous): score pages of post-RoPE keys by the upper bound built from their
channel-wise min/max, keep the top ``k / page_size`` pages."""
import torch

from ..kvcache import Batch
from ..scoring import topk_pages
from .base import Selection, SelectionContext, SelectionMethod


class Quest(SelectionMethod):
    name = "quest"

    @classmethod
    def needs_pages(cls, cfg):
        return True

    def select(self, ctx: SelectionContext, layer: int, q: torch.Tensor, batch: Batch) -> Selection:
        c = self.cfg
        ps = c.page_size
        hi = batch.lengths - c.recent                       # candidate tokens: [sink, hi)
        p_lo, p_hi = c.sink // ps, (hi - 1) // ps + 1       # pages overlapping the candidates
        st = ctx.store
        # the chosen pages' tokens [B, KVH, P * ps]; those outside [sink, hi) are skipped by the attention
        return Selection(topk_pages(q, st.pmin[layer, batch.lo:batch.hi], st.pmax[layer, batch.lo:batch.hi],
                                    p_lo, p_hi, c.k_mid // ps, ctx.scale, c.aggregate, expand=ps))

    def selection_rows(self, plan=None):
        return (0.0, 2.0 / self.cfg.page_size), (0.0, 0.0)       # every page's min and max, in-line
