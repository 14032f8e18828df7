"""The passes of an ahead-of-time selection, as pure functions of the plan and the data that exists when each
may start. The in-process selector and the workers run these very functions; only *when* they run differs.

- temporal (step-ahead): after layer l of step t has produced its query, forecast q_{t+1} with the temporal ridge
  predictor and pick step t+1's tokens (``ridge``) or a superset of ``superset * k`` candidates (``hybrid``) from
  every key visible now, from the store's 4-bit key sketch (sketch prefilter), or only from the pages the forecast
  ranks highest (page prefilter). A whole step of slack.
- cross-layer: when the residual stream enters layer l - lead of step t, layer l's query computed from it picks the
  exact top-k from every key (``xlayer``) or among the step-ahead candidates (``hybrid``). ``lead`` layers of slack.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..config import SparseConfig
from ..predictor import QueryWindows, forecast
from .. import kernels
from ..scoring import topk_among, topk_pages, topk_tokens
from .plan import SelectionPlan


class KeySummaries(NamedTuple):
    """What the store derives from a slot range's keys for the prefilters (either None when not kept)."""
    pages: tuple[torch.Tensor, torch.Tensor] | None = None      # Quest page (min, max)
    sketch: tuple[torch.Tensor, torch.Tensor] | None = None     # 4-bit key copy (nibbles, scale and min)

    @classmethod
    def of(cls, store, layer: int, lo: int, hi: int) -> "KeySummaries":
        return cls(store.pages(layer, lo, hi), store.sketch(layer, lo, hi))


def page_candidates(cfg: SparseConfig, q: torch.Tensor, pmin: torch.Tensor, pmax: torch.Tensor, hi: torch.Tensor,
                    n_tokens: int, scale: float, reserve: tuple[torch.Tensor, int, int] | None = None) -> torch.Tensor:
    """Token positions of the top ``n_tokens // page_size`` pages overlapping ``[sink, hi)`` by the Quest bound of
    query ``q``: ``[B, KVH, n_tokens']``. Entries outside ``[sink, hi)`` are masked by the caller, or by ``reserve``
    (:func:`~asyncspade.scoring.topk_pages`)."""
    ps = cfg.page_size
    n_pages = max(1, n_tokens // ps)
    return topk_pages(q, pmin, pmax, cfg.sink // ps, (hi - 1) // ps + 1, n_pages, scale, cfg.aggregate,
                      min_width=n_pages, expand=ps, reserve=reserve)


def sketch_candidates(cfg: SparseConfig, q: torch.Tensor, ks: torch.Tensor, kq: torch.Tensor, hi: torch.Tensor,
                      n_tokens: int, scale: float, reserve: tuple[torch.Tensor, int, int] | None = None,
                      aggregate: str | None = None) -> torch.Tensor:
    """Token positions of the best ``n_tokens`` of ``[sink, hi)`` by query ``q``'s aggregated probability (or
    ``aggregate``, see :func:`~asyncspade.kernels.sketch_score`) scored from the key sketch ``(ks, kq)``
    (:meth:`~asyncspade.kvcache.KVStore.sketch`): ``[B, KVH, n_tokens']``, masked or extended by ``reserve`` as
    :func:`~asyncspade.scoring.topk_tokens`."""
    b, h, d = q.shape
    qg = q.float().reshape(b, ks.shape[1], h // ks.shape[1], d)
    p = kernels.sketch_score(qg, ks, kq, scale, cfg.sink, hi, int(hi.max()), aggregate or cfg.aggregate)
    mask_hi, gap, limit = reserve if reserve is not None else (None, 0, 0)
    return kernels.topk(p, n_tokens, hi=mask_hi, gap=gap, limit=limit)


def proposed(plan: SelectionPlan, q: torch.Tensor, keys: torch.Tensor, hi: torch.Tensor, n: int, scale: float,
             summaries: KeySummaries, reserve: tuple[torch.Tensor, int, int] | None = None) -> torch.Tensor:
    """The ``n`` positions of ``[sink, hi)`` that query ``q`` ranks highest through the plan's prefilter (the key
    sketch, or whole pages by their Quest bound), or by exact scores (no prefilter, or a list that holds every
    position: the scores then only order equals)."""
    cfg = plan.cfg
    if n < int(hi.max()) - cfg.sink:
        if plan.prefilter == "sketch" and summaries.sketch is not None:
            return sketch_candidates(cfg, q, *summaries.sketch, hi, n, scale, reserve)
        if plan.prefilter == "pages" and summaries.pages is not None:
            return page_candidates(cfg, q, *summaries.pages, hi, n, scale, reserve)
    return topk_tokens(q, keys, cfg.sink, hi, n, scale, cfg.aggregate, min_width=n, reserve=reserve)


def temporal_pass(plan: SelectionPlan, windows: QueryWindows, li: int, keys: torch.Tensor, lo: int, hi: int,
                  lengths: torch.Tensor, q: torch.Tensor, scale: float,
                  summaries: KeySummaries = KeySummaries()) -> tuple[torch.Tensor, torch.Tensor]:
    """Push the real queries ``q [B, H, L, D]`` of rows ``[lo, hi)``, forecast the next step's query ``q_hat`` and
    return the top-``plan.ahead_width`` positions for the next step ``[B, KVH, width]`` and ``q_hat [B, H, D]``.

    ``keys`` is the slot range's whole key buffer ``[B, KVH, max_tokens, D]``; ``lengths`` the tokens visible now.
    The next step's cache holds ``lengths + 1`` tokens, whose newest ``recent`` are attended anyway.
    With a prefilter, ``summaries`` holds the rows' key sketch or page bounds, and the pass reads those instead of
    every key: a quarter (sketch) or an eighth (pages) of the bytes of a full key scan.
    """
    cfg, width = plan.cfg, plan.ahead_width
    windows.push(li, lo, hi, q)
    w, count = windows.get(li, lo, hi)
    q_hat = forecast(w, count, cfg.ridge_kind, cfg.order, cfg.ridge)
    hi_next = lengths + 1 - cfg.recent
    if plan.refine:
        return candidates(plan, q_hat, keys, hi_next, scale, summaries), q_hat
    if plan.hybrid and width >= int(hi_next.max()) - cfg.sink:
        # the superset holds every candidate position: nothing to rank (the cross-layer pass masks those >= hi)
        pos = torch.arange(cfg.sink, cfg.sink + width).clamp(max=keys.shape[2] - 1)
        return pos.expand(keys.shape[0], keys.shape[1], width).clone(), q_hat
    if plan.prefilter != "none":
        # a page may reach past the store's end: clamp (such positions are >= hi, masked downstream)
        cand = proposed(plan, q_hat, keys, hi_next, plan.prefilter_tokens, scale,
                        summaries).clamp(max=keys.shape[2] - 1)
        if plan.hybrid:                                        # the prefilter's tokens are the superset
            return cand, q_hat
        valid = (cand >= cfg.sink) & (cand < hi_next.view(-1, 1, 1))
        return topk_among(q_hat, keys, cand, width, scale, cfg.aggregate, valid=valid), q_hat
    return topk_tokens(q_hat, keys, cfg.sink, hi_next, width, scale, cfg.aggregate, min_width=width), q_hat


def candidates(plan: SelectionPlan, q: torch.Tensor, keys: torch.Tensor, hi: torch.Tensor, scale: float,
               summaries: KeySummaries = KeySummaries()) -> torch.Tensor:
    """The candidates a forecast query ``q`` proposes for the in-line refinement, ``[B, KVH, plan.ahead_width]``:
    the best ``superset * k`` positions of ``[sink, hi)`` (:func:`proposed`), then the ``plan.gap`` positions from
    ``hi`` on, which the cache reaches before the next refresh. Entries at or past ``hi`` among the first (a page's
    tail) are -1, so no position is ever a candidate twice; positions the refinement cannot take (outside
    ``[sink, hi')`` at its step, -1 among them) are skipped there."""
    reserve = (hi, plan.gap, keys.shape[2])   # picks at or past hi are -1; the gap's positions from hi on follow
    return proposed(plan, q, keys, hi, plan.ahead_width - plan.gap, scale, summaries, reserve)


def check_tokens(plan: SelectionPlan, q: torch.Tensor, sketch: tuple[torch.Tensor, torch.Tensor],
                 lengths: torch.Tensor, cand: torch.Tensor, scale: float) -> torch.Tensor:
    """The ``cfg.check`` best tokens of ``[sink, lengths - recent)`` for the layer's true query ``q``, scored from the
    key sketch, to join the candidates ``cand``: ``[B, KVH, check]`` (-1 for those already among the candidates, so
    no position is there twice). The tokens a query attends to most can be ones no earlier query did: no forecast
    proposes them, and missing one costs more than missing hundreds of the weakest (BENCHMARKS.md section 0)."""
    cfg = plan.cfg
    hi = lengths - cfg.recent
    n = min(cfg.check, int(hi.max()))           # a short cache: no more than it has (a pick is never repeated)
    # ranked by how close some head comes to its best score (no softmax): the refinement re-ranks them exactly
    extra = sketch_candidates(cfg, q, *sketch, hi, n, scale, reserve=(hi, 0, 0), aggregate="logit")
    return kernels.drop_seen(cand, extra, int(lengths.max()))


def refine(plan: SelectionPlan, q: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor, cand: torch.Tensor,
           scale: float, gathered: bool = False) -> torch.Tensor:
    """In-line, with the layer's true query ``q [B, H, D]``: the exact top-k of the candidates ``cand`` that lie in
    ``[sink, lengths - recent)``, ``[B, KVH, k]`` in position order (entries outside those bounds, picked only when
    fewer candidates qualify, are skipped by the attention's limits). ``keys``: the slot range's keys, or with
    ``gathered`` the candidates' own keys in order (:class:`~.candidate_keys.CandidateKeys`)."""
    cfg = plan.cfg
    b, h, d = q.shape
    qg = q.float().reshape(b, keys.shape[1], h // keys.shape[1], d).contiguous()
    s = kernels.score(qg, keys, scale, lo=cfg.sink, hi=lengths - cfg.recent, idx=cand, aggregate=cfg.aggregate,
                      gathered=gathered)
    return kernels.topk(s, cfg.k_mid, idx=cand)


def xlayer_pass(plan: SelectionPlan, q_x: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor, scale: float,
                cand: torch.Tensor | None, cand_ok: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k for the current step (cache of ``lengths`` tokens) with the cross-layer query ``q_x [B, H, D]``, over
    every candidate key, or only among the step-ahead candidates ``cand [B, KVH, M]``.

    ``cand_ok [B]`` marks the rows whose candidates were made for this step; the others (a sequence adopted from a
    filled cache has had no step-ahead pass yet) score every key."""
    cfg = plan.cfg
    hi = lengths - cfg.recent
    if plan.refine:                       # xlayer alone, refined in-line: propose candidates from every key
        return candidates(plan, q_x, keys, hi, scale)
    if cand is None or (cand_ok is not None and not bool(cand_ok.any())):
        return topk_tokens(q_x, keys, cfg.sink, hi, cfg.k_mid, scale, cfg.aggregate)
    valid = (cand >= cfg.sink) & (cand < hi.view(-1, 1, 1))
    idx = topk_among(q_x, keys, cand, cfg.k_mid, scale, cfg.aggregate, valid=valid)
    if cand_ok is not None and not bool(cand_ok.all()):
        stale = (~cand_ok).nonzero().flatten()
        idx[stale] = topk_tokens(q_x[stale], keys[stale], cfg.sink, hi[stale], cfg.k_mid, scale, cfg.aggregate,
                                 min_width=cfg.k_mid)
    return idx
