"""Scoring and top-k: the one piece of selection code shared by every method, synchronous or asynchronous.

Shapes: queries ``[B, H, D]`` (H query heads), keys ``[B, KVH, n, D]``; query head h belongs to KV head h // group.
GQA: per-head softmax over the candidates, then sum (or max) over the heads of a group, so each KV head gets one set
that its whole group shares.
"""
from __future__ import annotations

import torch

from . import kernels
from .kernels.reference import gather_rows

def candidate_mask(lo: int, hi: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, width]`` bool: position ``lo + j`` is a candidate of row b iff ``lo + j < hi[b]``."""
    return (torch.arange(lo, lo + width) < hi[:, None])


def _grouped(q: torch.Tensor, kvh: int) -> torch.Tensor:
    b, h, d = q.shape
    return q.float().reshape(b, kvh, h // kvh, d).contiguous()


def topk_tokens(q: torch.Tensor, keys: torch.Tensor, lo: int, hi: torch.Tensor, k: int, scale: float,
                aggregate: str = "sum", min_width: int = 0,
                reserve: tuple[torch.Tensor, int, int] | None = None) -> torch.Tensor:
    """Exact top-k token positions in ``[lo, hi[b])`` for each (row, KV head): ``[B, KVH, k]`` int64.

    ``keys`` (a store view) holds positions ``0..>=max(hi)``. Rows with fewer than k candidates return some masked
    positions; callers only use the result for rows whose cache exceeds the budget, which always have enough.
    ``min_width`` widens the scored range (masked beyond ``hi``) so the result always has k columns.
    ``reserve = (hi, gap, limit)`` (a candidate list): positions at or past that ``hi`` become -1 and ``gap`` more
    columns follow, ``hi[b] + j`` capped at ``limit - 1`` (:func:`kernels.topk`).
    """
    width = min(max(int(hi.max()) - lo, min_width), keys.shape[2] - lo)
    p = kernels.score(_grouped(q, keys.shape[1]), keys, scale, lo=lo, hi=hi, n=width, aggregate=aggregate)
    # in position order: attention sums in the order it is given, so the same set must always come in one order
    mask_hi, gap, limit = reserve if reserve is not None else (None, 0, 0)
    return kernels.topk(p, min(k, width), lo=lo, hi=mask_hi, gap=gap, limit=limit)


def topk_among(q: torch.Tensor, keys: torch.Tensor, cand_idx: torch.Tensor, k: int, scale: float,
               aggregate: str = "sum", valid: torch.Tensor | None = None) -> torch.Tensor:
    """Exact top-k of the candidate positions ``cand_idx [B, KVH, m]`` (refinement step): ``[B, KVH, k]``.
    ``valid`` (same shape) masks candidates that must not be picked."""
    m = cand_idx.shape[-1]
    cand_idx = cand_idx.contiguous()
    p = kernels.score(_grouped(q, keys.shape[1]), keys, scale, idx=cand_idx,
                      valid=None if valid is None else valid.contiguous(), aggregate=aggregate)
    return kernels.topk(p, min(k, m), idx=cand_idx)


def quest_page_scores(q: torch.Tensor, pmin: torch.Tensor, pmax: torch.Tensor, scale: float) -> torch.Tensor:
    """Quest's upper bound per (row, query head, page): ``sum_c max(q_c min_c, q_c max_c)``, ``[B, KVH, g, P]``.

    Computed as two matmuls, ``q+ . max + q- . min``, which is the same sum term by term.
    """
    b, h, d = q.shape
    kvh = pmin.shape[1]
    qg = q.view(b, kvh, h // kvh, d).to(pmin.dtype)
    s = torch.matmul(qg.clamp(min=0), pmax.transpose(-1, -2)) + torch.matmul(qg.clamp(max=0), pmin.transpose(-1, -2))
    return s.float() * scale


def topk_pages(q: torch.Tensor, pmin: torch.Tensor, pmax: torch.Tensor, p_lo: int, p_hi: torch.Tensor, n_pages: int,
               scale: float, aggregate: str = "sum", min_width: int = 0, expand: int = 1,
               reserve: tuple[torch.Tensor, int, int] | None = None) -> torch.Tensor:
    """Top ``n_pages`` pages in ``[p_lo, p_hi[b])`` by the Quest bound, ``[B, KVH, n_pages]`` page numbers in
    ascending order; with ``expand`` (the page size), the pages' token positions ``[B, KVH, n_pages * expand]``.
    ``min_width`` widens the scored range (masked beyond ``p_hi``) so the result always has n_pages columns.
    ``reserve = (hi, gap, limit)`` (a candidate list of tokens): positions at or past ``hi`` become -1 and ``gap``
    more columns follow, ``hi[b] + j`` capped at ``limit - 1`` (:func:`kernels.topk`)."""
    width = min(max(int(p_hi.max()) - p_lo, min_width), pmin.shape[2] - p_lo)
    p = kernels.score(_grouped(q, pmin.shape[1]), pmin, scale, lo=p_lo, hi=p_hi, n=width, aggregate=aggregate,
                      kmax=pmax)
    mask_hi, gap, limit = reserve if reserve is not None else (None, 0, 0)
    return kernels.topk(p, min(n_pages, width), lo=p_lo, expand=expand, hi=mask_hi, gap=gap, limit=limit)
