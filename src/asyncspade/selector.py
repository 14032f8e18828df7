"""Where ahead-of-time selections (``lastq``, ``asyncspade``) are computed.

:class:`SyncSelector` computes each selection in-process at the moment it becomes possible: right after layer l
produced its query (temporal pass) or when the residual enters layer l - lead (cross-layer pass). This is the
synchronous simulation; the asynchronous cache-rank worker runs the same passes on another core and must select
exactly the same tokens.
"""
from __future__ import annotations

import sys
import warnings

import torch

from .config import SparseConfig
from .kvcache import Batch, KVStore
from .methods.asyncspade import ahead_width, temporal_pass, xlayer_pass
from .predictor import QueryWindows


class SyncSelector:
    def __init__(self, cfg: SparseConfig, store: KVStore, num_heads: int, sparse_layers: list[int], scale: float):
        self.cfg, self.store, self.scale = cfg, store, scale
        self.li = {layer: i for i, layer in enumerate(sparse_layers)}
        n, s, kvh = len(sparse_layers), store.slots, store.kv_heads
        self.temporal = cfg.predictor in ("ridge", "hybrid")
        self.xlayer = cfg.predictor in ("xlayer", "hybrid")
        self.width = ahead_width(cfg, store.max_tokens)
        if self.temporal:
            self.windows = QueryWindows(s, n, num_heads, cfg.window, store.head_dim)
            self.ahead = torch.zeros(s, n, kvh, self.width, dtype=torch.int64)
            self.ahead_len = torch.full((s, n), -1, dtype=torch.int64)     # cache length each was made for
        if self.xlayer:
            self.chosen = torch.zeros(s, n, kvh, cfg.k_mid, dtype=torch.int64)
        self.forecast_q = torch.zeros(n, s, num_heads, store.head_dim)  # the query each latest selection used

    def reset(self, lo: int, hi: int) -> None:
        """A new sequence takes slots ``[lo, hi)``: forget the previous occupant's queries."""
        if self.temporal:
            self.windows.reset(lo, hi)
            self.ahead_len[lo:hi] = -1

    def on_query(self, layer: int, q: torch.Tensor, batch: Batch) -> None:
        """Layer ``layer`` produced its real queries ``[B, H, L, D]``: select for the next step."""
        li = self.li[layer]
        if not self.cfg.sparse_at(batch.max_len + 1):  # next step is dense for every row: only keep the window
            self.windows.push(li, batch.lo, batch.hi, q)
            return
        keys = self.store.k[layer, batch.lo:batch.hi]
        idx, q_hat = temporal_pass(self.cfg, self.windows, li, keys, batch.lo, batch.hi, batch.lengths, q,
                                   self.scale, self.width, self.store.pages(layer, batch.lo, batch.hi))
        self.ahead[batch.lo:batch.hi, li] = idx
        self.ahead_len[batch.lo:batch.hi, li] = batch.lengths + 1
        if not self.xlayer:
            self.forecast_q[li, batch.lo:batch.hi] = q_hat

    def on_xlayer(self, layer: int, q_x: torch.Tensor, batch: Batch) -> None:
        """The cross-layer forecast of ``layer``'s query for the current step is known: select for it."""
        li = self.li[layer]
        cand = cand_ok = None
        if self.temporal:
            cand = self.ahead[batch.lo:batch.hi, li]
            cand_ok = self.ahead_len[batch.lo:batch.hi, li] == batch.lengths
        keys = self.store.k[layer, batch.lo:batch.hi]
        self.chosen[batch.lo:batch.hi, li] = xlayer_pass(self.cfg, q_x, keys, batch.lengths, self.scale, cand,
                                                         cand_ok)
        self.forecast_q[li, batch.lo:batch.hi] = q_x

    def get(self, layer: int, batch: Batch, q_now: torch.Tensor | None = None) -> torch.Tensor:
        """The selection for ``layer`` at the current step, ``[B, KVH, k]`` (``q_now`` is not used: it only exists
        for the asynchronous selector's fault path)."""
        src = self.chosen if self.xlayer else self.ahead
        return src[batch.lo:batch.hi, self.li[layer]]

    def forecast(self, layer: int, batch: Batch) -> torch.Tensor:
        """The query ``[B, H, D]`` that chose ``layer``'s current selection for the batch's rows (diagnostics)."""
        return self.forecast_q[self.li[layer], batch.lo:batch.hi]

    late_rate = 0.0
    wait_s = 0.0
    steps = late = 0

    def close(self) -> None:
        pass


def in_process_fallback(why: str, cfg: SparseConfig, store: KVStore, num_heads: int, sparse_layers: list[int],
                        scale: float) -> SyncSelector:
    """A cache rank failed: say so once (stderr and a RuntimeWarning) and hand back an in-process selector."""
    print(f"[asyncspade] warning: {why}; continuing with synchronous selection in-process", file=sys.stderr)
    warnings.warn(why, RuntimeWarning, stacklevel=4)
    return SyncSelector(cfg, store, num_heads, sparse_layers, scale)


def make_selector(kind: str, cfg: SparseConfig, store: KVStore, num_heads: int, sparse_layers: list[int],
                  scale: float, on_late: str = "wait"):
    """``sync``: in-process at the moment each selection becomes possible; ``async``: the cache-rank worker
    process over shared memory; ``dist``: a cache rank over torch.distributed that keeps its own key copy."""
    if kind == "sync":
        return SyncSelector(cfg, store, num_heads, sparse_layers, scale)
    if kind == "async":
        from .cache_rank import AsyncSelector
        return AsyncSelector(cfg, store, num_heads, sparse_layers, scale, on_late=on_late)
    if kind == "dist":
        from .cache_rank_dist import DistSelector
        return DistSelector(cfg, store, num_heads, sparse_layers, scale, on_late=on_late)
    raise ValueError(f"unknown selector {kind!r}; choose sync, async or dist")
