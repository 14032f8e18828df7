"""The inference rank's side of a selector whose passes run in a worker (another process, core or host).

What both transports share lives here: which selections the decode loop may expect (``_asked``), picking them up,
counting late steps, waiting for or reusing a late one, and the fault path: a worker that dies or stops answering
is replaced by an in-process :class:`~asyncspade.selection.local.SyncSelector`, with a warning, and generation goes
on. A subclass only moves data (:mod:`~asyncspade.selection.shm`, :mod:`~asyncspade.selection.dist`).

Every published selection carries a *tag* (transport-defined, ordered within a slot's occupant, one per target cache
length); ``_asked`` holds the tag of the newest job posted per (slot, sparse layer) that will publish the selection
the decode loop takes, so a step no job was posted for (the first step of a sequence adopted from a filled cache) is
served at once with the exact top-k of the current query instead of being waited for.
"""
from __future__ import annotations

import sys
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np
import torch

from ..config import SparseConfig
from ..kvcache import Batch, KVStore
from ..scoring import topk_tokens
from .local import SyncSelector
from .plan import SelectionPlan


def in_process_fallback(why: str, cfg: SparseConfig, store: KVStore, num_heads: int, sparse_layers: list[int],
                        scale: float) -> SyncSelector:
    """A cache rank failed: say so once (stderr and a RuntimeWarning) and hand back an in-process selector."""
    print(f"[asyncspade] warning: {why}; continuing with synchronous selection in-process", file=sys.stderr)
    warnings.warn(why, RuntimeWarning, stacklevel=4)
    return SyncSelector(cfg, store, num_heads, sparse_layers, scale)


class RemoteSelector(ABC):
    """Posts jobs, picks up published selections, counts late steps, falls back in-process on a fault. A transport
    implements the abstract methods at the end: it moves jobs and results, and reports faults."""

    def __init__(self, cfg: SparseConfig, store: KVStore, num_heads: int, sparse_layers: list[int], scale: float,
                 on_late: str = "wait", timeout_s: float = 10.0):
        if on_late not in ("wait", "reuse"):
            raise ValueError("on_late must be 'wait' or 'reuse'")
        self.plan = SelectionPlan.of(cfg, store.max_tokens)
        self.cfg, self.store, self.scale, self.on_late = cfg, store, scale, on_late
        self.num_heads, self.sparse_layers, self.timeout_s = num_heads, sparse_layers, timeout_s
        self.li = {layer: i for i, layer in enumerate(sparse_layers)}
        self._asked = np.full((store.slots, len(sparse_layers)), -1, dtype=np.int64)
        self.fallback: SyncSelector | None = None
        self._fb: np.ndarray | None = None  # after a fault: cache length of each in-process (pass, slot, layer) result
        self.steps = 0            # selections handed to the decode loop
        self.late = 0             # of which were not ready in time
        self.wait_s = 0.0         # total time the decode loop blocked on the worker

    # ------------------------------------------------------------------ posting jobs
    def reset(self, lo: int, hi: int) -> None:
        if self._in_process():
            self._fb[:, lo:hi] = -1
            return self.fallback.reset(lo, hi)
        self._asked[lo:hi] = -1
        self._post_reset(lo, hi)

    def on_query(self, layer: int, q: torch.Tensor, batch: Batch) -> None:
        li, rows, lengths = self.li[layer], slice(batch.lo, batch.hi), batch.lengths.numpy()
        if not self._in_process() and self._post_query(li, layer, q, batch):
            if self.plan.ahead_is_final(batch.max_len):          # the worker will publish a selection
                self._asked[rows, li] = self._tags(batch.lo, batch.hi, lengths + 1)
            return
        self.fallback.on_query(layer, q, batch)
        self._fb[0, rows, li] = lengths + 1

    def on_xlayer(self, layer: int, q_x: torch.Tensor, batch: Batch) -> None:
        li, rows, lengths = self.li[layer], slice(batch.lo, batch.hi), batch.lengths.numpy()
        if not self._in_process() and self._post_xlayer(li, layer, q_x, batch):
            self._asked[rows, li] = self._tags(batch.lo, batch.hi, lengths)
            return
        self.fallback.on_xlayer(layer, q_x, batch)
        self._fb[1, rows, li] = lengths

    # ------------------------------------------------------------------ picking up results
    def get(self, layer: int, batch: Batch, q_now: torch.Tensor | None = None) -> torch.Tensor:
        if self._in_process():
            return self._fallback_get(layer, batch, q_now)
        li, rows, lengths = self.li[layer], slice(batch.lo, batch.hi), batch.lengths.numpy()
        need = self.cfg.sparse_at(lengths)                # rows that attend sparsely this step
        tags = self._tags(batch.lo, batch.hi, lengths)[need]
        self.steps += 1
        if np.any(self._asked[rows, li][need] != tags):
            # no job could produce this selection (a sequence adopted with its cache already filled, no step
            # before): waiting would only time out, so this once select with the current query
            self.late += 1
            return self._exact(layer, batch, q_now)

        def ready() -> bool:
            return bool(np.all(self._published(li, rows)[need] == tags))
        if not ready():
            self.late += 1
            t0 = time.perf_counter()
            # reuse: the previous step's set of the same occupant (tags are ordered within an occupant)
            if self.on_late == "reuse" and np.all(self._published(li, rows)[need] >= tags - 1):
                self.wait_s += time.perf_counter() - t0
                return self._take(li, batch, lengths - 1)
            ok = self._wait(ready)
            self.wait_s += time.perf_counter() - t0
            if not ok:
                return self._fallback_get(layer, batch, q_now)
        return self._take(li, batch, lengths)

    def generation(self, layer: int, batch: Batch) -> None:
        return None             # a worker's lists arrive without one: the gathered keys compare every entry

    @property
    def late_rate(self) -> float:
        return self.late / self.steps if self.steps else 0.0

    # ------------------------------------------------------------------ faults
    def _in_process(self) -> bool:
        """True once selection runs in-process; starts it if a background thread reported a fault."""
        if self.fallback is None and (why := self._async_fault()) is not None:
            self._start_fallback(why)
        return self.fallback is not None

    def _start_fallback(self, why: str) -> None:
        if self.fallback is not None:
            return
        self.fallback = in_process_fallback(why, self.cfg, self.store, self.num_heads, self.sparse_layers,
                                            self.scale)
        # the in-process windows start empty and the passes the worker missed (earlier layers of the step in
        # progress) left nothing behind: until a pass has run in-process for a step, that step selects exactly
        self._fb = np.full((2,) + self._asked.shape, -1, dtype=np.int64)
        self._shutdown()

    def _fallback_get(self, layer: int, batch: Batch, q_now: torch.Tensor | None) -> torch.Tensor:
        li, rows, lengths = self.li[layer], slice(batch.lo, batch.hi), batch.lengths.numpy()
        need = self.cfg.sparse_at(lengths)
        ok = ((not self.plan.temporal or np.all(self._fb[0, rows, li][need] == lengths[need]))
              and (not self.plan.xlayer or np.all(self._fb[1, rows, li][need] == lengths[need])))
        if ok:
            return self.fallback.get(layer, batch)
        return self._exact(layer, batch, q_now)     # the in-process selector has not caught up with this layer

    def _exact(self, layer: int, batch: Batch, q_now: torch.Tensor | None) -> torch.Tensor:
        """The exact top-k of the current query: for steps no ahead-of-time selection exists for."""
        if q_now is None:
            raise RuntimeError("selection unavailable")
        c = self.cfg
        keys = self.store.k[layer, batch.lo:batch.hi]
        return topk_tokens(q_now, keys, c.sink, batch.lengths - c.recent, c.k_mid, self.scale, c.aggregate)

    # ------------------------------------------------------------------ the transport
    @abstractmethod
    def _tags(self, lo: int, hi: int, lengths: np.ndarray) -> np.ndarray:
        """The tags of selections for rows ``[lo, hi)`` and target cache ``lengths``."""

    @abstractmethod
    def _post_reset(self, lo: int, hi: int) -> None:
        """Tell the worker that new sequences take slots ``[lo, hi)``."""

    @abstractmethod
    def _post_query(self, li: int, layer: int, q: torch.Tensor, batch: Batch) -> bool:
        """Post a step-ahead job; False when the transport failed (the fallback has then started)."""

    @abstractmethod
    def _post_xlayer(self, li: int, layer: int, q_x: torch.Tensor, batch: Batch) -> bool:
        """Post a cross-layer job; False when the transport failed (the fallback has then started)."""

    @abstractmethod
    def _published(self, li: int, rows: slice) -> np.ndarray:
        """The tags of the newest selections published for sparse layer ``li`` and slots ``rows``."""

    @abstractmethod
    def _wait(self, ready: Callable[[], bool]) -> bool:
        """Block until ``ready()``; on a fault start the fallback and return False."""

    @abstractmethod
    def _take(self, li: int, batch: Batch, target: np.ndarray) -> torch.Tensor:
        """The published selection ``[B, KVH, k]`` for cache lengths ``target`` (this step's, or the previous)."""

    def _async_fault(self) -> str | None:
        """A fault that a background thread noticed, if any."""
        return None

    @abstractmethod
    def _shutdown(self) -> None:
        """Stop the worker after a fault (no further message over a broken link)."""

    @abstractmethod
    def close(self) -> None:
        """Stop the worker; idempotent."""
