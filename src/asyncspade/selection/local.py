"""The in-process selector: each ahead-of-time selection computed at the moment it becomes possible, right after
layer l produced its query (step-ahead pass) or when the residual enters layer l - lead (cross-layer pass).

This is the synchronous simulation, and also the engine of both workers: the shared-memory worker and the
distributed cache rank each run one over their data, so they select exactly the same tokens.
"""
from __future__ import annotations

import numpy as np
import torch

from ..config import SparseConfig
from ..kvcache import Batch, KVStore
from ..predictor import QueryWindows
from .passes import KeySummaries, temporal_pass, xlayer_pass
from .plan import SelectionPlan


class SyncSelector:
    # nothing is ever late in-process
    steps = late = 0
    wait_s = late_rate = 0.0

    def __init__(self, cfg: SparseConfig, store: KVStore, num_heads: int, sparse_layers: list[int], scale: float):
        self.plan = plan = SelectionPlan.of(cfg, store.max_tokens)
        self.cfg, self.store, self.scale = cfg, store, scale
        self.li = {layer: i for i, layer in enumerate(sparse_layers)}
        n, s, kvh = len(sparse_layers), store.slots, store.kv_heads
        if plan.temporal:
            self.windows = QueryWindows(s, n, num_heads, cfg.window, store.head_dim)
            self.ahead = torch.zeros(s, n, kvh, plan.ahead_width, dtype=torch.int64)
            # per (slot, layer), in numpy (read and written once per sparse layer and step: cheaper than torch ops)
            self.ahead_len = np.full((s, n), -1, dtype=np.int64)     # the cache length each was made for ...
            self.made = np.full((s, n), -1, dtype=np.int64)          # ... and when it was last computed
        if plan.xlayer:
            self.chosen = torch.zeros(s, n, kvh, plan.result_width, dtype=torch.int64)
        self.forecast_q = torch.zeros(n, s, num_heads, store.head_dim)  # the query each latest selection used

    @property
    def width(self) -> int:
        return self.plan.ahead_width

    def reset(self, lo: int, hi: int) -> None:
        """A new sequence takes slots ``[lo, hi)``: forget the previous occupant's queries."""
        if self.plan.temporal:
            self.windows.reset(lo, hi)
            self.ahead_len[lo:hi] = -1
            self.made[lo:hi] = -1

    def on_query(self, layer: int, q: torch.Tensor, batch: Batch) -> None:
        """Layer ``layer`` produced its real queries ``[B, H, L, D]``: select for the next step."""
        li = self.li[layer]
        if not self.cfg.sparse_at(batch.max_len + 1):  # next step is dense for every row: only keep the window
            self.windows.push(li, batch.lo, batch.hi, q)
            return
        rows = slice(batch.lo, batch.hi)
        made, next_len = self.made[rows, li], batch.memo("next_len", lambda: batch.lengths.numpy() + 1)
        refresh = self.plan.refresh
        # each layer refreshes on its own turn (layer index + step, modulo refresh), so a step runs the passes of
        # 1/refresh of the layers instead of all of them every refresh-th step: every step costs the same
        turn = (batch.max_len + 1 + li) % refresh == 0
        if refresh > 1 and not turn and ((made >= 0) & (next_len - made < refresh)).all():
            # every row's candidates (and the positions they reserve for newer tokens) still serve the next step
            self.windows.push(li, batch.lo, batch.hi, q)
            self.ahead_len[rows, li] = next_len
            return
        keys = self.store.k[layer, rows]
        idx, q_hat = temporal_pass(self.plan, self.windows, li, keys, batch.lo, batch.hi, batch.lengths, q,
                                   self.scale, KeySummaries.of(self.store, layer, batch.lo, batch.hi))
        self.ahead[rows, li] = idx
        self.ahead_len[rows, li] = next_len
        self.made[rows, li] = next_len
        if not self.plan.xlayer:
            self.forecast_q[li, batch.lo:batch.hi] = q_hat

    def on_xlayer(self, layer: int, q_x: torch.Tensor, batch: Batch) -> None:
        """The cross-layer forecast of ``layer``'s query for the current step is known: select for it."""
        li = self.li[layer]
        cand = cand_ok = None
        if self.plan.temporal:
            cand = self.ahead[batch.lo:batch.hi, li]
            cand_ok = torch.from_numpy(self.ahead_len[batch.lo:batch.hi, li] == batch.lengths.numpy())
        keys = self.store.k[layer, batch.lo:batch.hi]
        self.chosen[batch.lo:batch.hi, li] = xlayer_pass(self.plan, q_x, keys, batch.lengths, self.scale, cand,
                                                         cand_ok)
        self.forecast_q[li, batch.lo:batch.hi] = q_x

    def get(self, layer: int, batch: Batch, q_now: torch.Tensor | None = None) -> torch.Tensor:
        """The selection for ``layer`` at the current step, ``[B, KVH, k]`` (``q_now`` is not used: it only exists
        for the remote selectors' fault path)."""
        src = self.chosen if self.plan.xlayer else self.ahead
        return src[batch.lo:batch.hi, self.li[layer]]

    def generation(self, layer: int, batch: Batch) -> np.ndarray | None:
        """The cache length each row's step-ahead list was made for (a refinement's candidates; -1: none yet)."""
        if not self.plan.temporal or self.plan.xlayer:
            return None         # the cross-layer pass makes a new list every step
        return self.made[batch.lo:batch.hi, self.li[layer]]

    def answer(self, xlayer: bool, layer: int, q: torch.Tensor,
               batch: Batch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A worker's job: run the cross-layer pass (``xlayer``) or the step-ahead pass for ``batch``. Returns
        (the cache length each row's selection is for ``[B]``, the selection ``[B, KVH, width]``) when the pass made
        the selection the decode loop will take, else None."""
        if xlayer:
            self.on_xlayer(layer, q, batch)
            return batch.lengths, self.get(layer, batch)
        self.on_query(layer, q, batch)
        return (batch.lengths + 1, self.get(layer, batch)) if self.plan.ahead_is_final(batch.max_len) else None

    def forecast(self, layer: int, batch: Batch) -> torch.Tensor:
        """The query ``[B, H, D]`` that chose ``layer``'s current selection for the batch's rows (diagnostics)."""
        return self.forecast_q[self.li[layer], batch.lo:batch.hi]

    def close(self) -> None:
        pass
