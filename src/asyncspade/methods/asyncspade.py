"""AsyncSpade: exact top-k tokens scored with a *forecast* query, selected ahead of the layer that uses them.

Forecasters (``cfg.predictor``):
- ``ridge``  (the paper): after layer l of step t has produced its query, forecast q_{t+1} with the temporal ridge
  predictor and pick step t+1's tokens from every key visible now. A whole step of slack.
- ``xlayer``: when the residual stream enters layer l - lead of step t, compute layer l's query from it and pick
  from every key. ``lead`` layers of slack, much closer to the true query.
- ``hybrid`` (default): the step-ahead ridge pass keeps ``superset * k`` candidates, and the cross-layer query picks
  the exact top-k among them. The full scan enjoys a step of slack; the late refinement touches only the superset.

The method only routes the runtime's hooks to the selector (``ctx.selector``); the passes, and which of them run
(the selector's plan), live in :mod:`asyncspade.selection`, so the in-process selector and the workers on another
core run the very same code; only *when* it runs changes.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..kvcache import Batch
from .base import Selection, SelectionContext, SelectionMethod


SKETCH_ROW = (32 + 8) / 128   # a token of the key sketch (head_dim / 2 bytes of nibbles, fp32 scale and min) in
                               # key rows of bf16 at head_dim 64


class AsyncSpade(SelectionMethod):
    name = "asyncspade"
    ahead = True

    @classmethod
    def needs_pages(cls, cfg):
        return cfg.prefilter == "pages"          # the step-ahead pass pre-selects pages by their Quest bound

    @classmethod
    def needs_sketch(cls, cfg):
        # the step-ahead pass scores every token from the 4-bit key copy; the in-line check does, with the true query
        return cfg.prefilter == "sketch" or (cfg.refine and cfg.check > 0)

    def selection_rows(self, plan=None):
        """In-line: the refinement's candidates (keys), and with ``check`` the key sketch. Ahead: the step-ahead
        pass's page bounds, sketch or every key, once per ``refresh`` steps, and the cross-layer pass's keys (its
        candidates, or every key)."""
        c = self.cfg
        refresh = plan.refresh if plan is not None else 1
        refined = plan is not None and plan.refine
        inline = (plan.result_width if refined else 0.0, SKETCH_ROW if refined and c.check else 0.0)
        temporal = plan is None or plan.temporal
        per_token = {"pages": 2.0 / c.page_size, "sketch": SKETCH_ROW, "none": 1.0}[c.prefilter]
        scan = per_token / refresh if temporal else 0.0
        rescore = 0.0           # ridge with a prefilter, unrefined: the proposed tokens scored with the forecast
        if plan is not None and plan.prefilter != "none" and not plan.refine and not plan.hybrid:
            rescore = plan.prefilter_tokens / refresh
        xlayer = 0.0, 0.0
        if plan is not None and plan.xlayer:
            xlayer = (plan.ahead_width, 0.0) if plan.temporal else (0.0, 1.0)
        return inline, (rescore + xlayer[0], scan + xlayer[1])

    def select(self, ctx: SelectionContext, layer: int, q: torch.Tensor, batch: Batch) -> Selection:
        return Selection(ctx.selector.get(layer, batch, q), candidates=ctx.selector.plan.refine)

    def observe(self, ctx: SelectionContext, layer: int, q: torch.Tensor, batch: Batch) -> None:
        # the forecaster reads the last `window` queries: keeping them is needed only from `window` steps before
        # the first step that may decode sparsely (below, decode is dense and pays nothing for selection)
        if ctx.selector.plan.temporal and self.cfg.sparse_at(batch.max_len + 1 + self.cfg.window):
            ctx.selector.on_query(layer, q, batch)

    def before_layer(self, ctx: SelectionContext, layer: int, forecast: Callable[[int], torch.Tensor],
                     batch: Batch) -> None:
        for target in ctx.xlayer_targets.get(layer, ()):     # filled only when the plan has a cross-layer pass
            ctx.selector.on_xlayer(target, forecast(target), batch)
