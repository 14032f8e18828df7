"""The asynchronous cache rank: a worker process that runs the ahead-of-time selections of ``lastq`` /
``asyncspade`` while the decode loop (the inference rank) runs the forward.

Transport (one machine): the KV store, the queries and the results live in shared memory; jobs go through a
fixed-size ring of int64 records; two POSIX semaphores carry the signals (job posted, job done) so neither side
ever busy-spins (the machine has 2 cores).

Protocol, per sparse layer l:
- after layer l's attention the decode loop posts a TEMPORAL job with its real queries; the worker pushes them
  into its query windows, forecasts the next query, scores the keys and publishes the next step's selection
  (``ridge``) or candidate superset (``hybrid``) for cache length ``n + 1``;
- when the residual enters layer l - lead, the decode loop posts an XLAYER job with the cross-layer forecast;
  the worker picks the exact top-k (among the candidates, for ``hybrid``) for cache length ``n``;
- results are double-buffered by the parity of the target cache length, and ``done[slot, l]`` records the
  *tag* of the newest published result — the slot's occupancy serial and the target length, ``serial << 32 |
  length`` — so the decode loop knows without a round trip whether the selection it needs is ready, and a late
  result made for a slot's previous occupant can never be taken for the new one's. If not ready:
  ``on_late="wait"`` blocks on the done semaphore, ``"reuse"`` takes the previous step's set.

The worker runs exactly the functions :class:`~asyncspade.selector.SyncSelector` runs, on the same data, so with
``on_late="wait"`` it selects the same tokens; only *when* they run differs.
"""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import torch
import torch.multiprocessing as mp

from .config import SparseConfig
from .kvcache import Batch, KVStore
from .methods.asyncspade import ahead_width, temporal_pass, xlayer_pass
from .predictor import QueryWindows
from .selector import SyncSelector, in_process_fallback

RESET, TEMPORAL, XLAYER, STOP = 0, 1, 2, 3
HEADER = 6                         # kind, layer index, lo, hi, number of queries, buffer parity


class SharedState:
    """Everything both ranks touch, allocated in shared memory before the worker starts."""

    def __init__(self, cfg: SparseConfig, store: KVStore, num_heads: int, num_sparse: int):
        s, kvh, d = store.slots, store.kv_heads, store.head_dim
        self.width = ahead_width(cfg, store.max_tokens)
        self.qbuf = torch.zeros(2, num_sparse, s, num_heads, cfg.window, d)       # real queries (temporal)
        self.xbuf = torch.zeros(2, num_sparse, s, num_heads, d)                   # cross-layer forecasts
        self.ahead = torch.zeros(2, s, num_sparse, kvh, self.width, dtype=torch.int64)
        self.chosen = torch.zeros(2, s, num_sparse, kvh, cfg.k_mid, dtype=torch.int64)
        self.done_t = torch.full((s, num_sparse), -1, dtype=torch.int64)         # tag of the result published
        self.done_x = torch.full((s, num_sparse), -1, dtype=torch.int64)
        self.jobs_done = torch.zeros(2, num_sparse, dtype=torch.int64)           # per kind (temporal, xlayer)
        self.ring = torch.zeros(8 * num_sparse + 8, HEADER + 2 * s, dtype=torch.int64)   # + lengths, tags
        for t in self.tensors():
            t.share_memory_()

    def tensors(self):
        return [self.qbuf, self.xbuf, self.ahead, self.chosen, self.done_t, self.done_x, self.jobs_done, self.ring]


def _worker_main(cfg, store, shared, sparse_layers, scale, job_sem, done_sem, parent_pid):
    """The cache rank's loop: take a job, run it, publish, signal. Exits on STOP or when the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)          # Ctrl-C is the parent's to handle
    torch.set_num_threads(1)
    windows = QueryWindows(store.slots, len(sparse_layers), shared.qbuf.shape[3], cfg.window, store.head_dim)
    ring = shared.ring.numpy()
    done_t, done_x, jobs_done = shared.done_t.numpy(), shared.done_x.numpy(), shared.jobs_done.numpy()
    tail, s = 0, store.slots
    done_sem.release()                                    # ready
    with torch.inference_mode():
        while True:
            if not job_sem.acquire(timeout=1.0):
                if os.getppid() != parent_pid:
                    return
                continue
            rec = ring[tail % len(ring)].copy()
            tail += 1
            kind, li, lo, hi, nq, par = (int(x) for x in rec[:HEADER])
            lengths = torch.from_numpy(rec[HEADER + lo:HEADER + hi].copy())
            tags = rec[HEADER + s + lo:HEADER + s + hi]                 # serial << 32 | length, per row
            if kind == STOP:
                return
            if kind == RESET:
                windows.reset(lo, hi)
            elif kind == TEMPORAL:
                layer = sparse_layers[li]
                q = shared.qbuf[par, li, lo:hi, :, cfg.window - nq:]
                idx, _ = temporal_pass(cfg, windows, li, store.k[layer, lo:hi], lo, hi, lengths, q, scale,
                                       shared.width, store.pages(layer, lo, hi))
                tgt = lengths + 1
                for b in range(hi - lo):          # rows may differ in parity: publish row by row
                    shared.ahead[int(tgt[b]) % 2, lo + b, li] = idx[b]
                done_t[lo:hi, li] = tags + 1
                jobs_done[0, li] += 1
            elif kind == XLAYER:
                layer = sparse_layers[li]
                q_x = shared.xbuf[par, li, lo:hi]
                cand = cand_ok = None
                if cfg.predictor == "hybrid":
                    cand = torch.stack([shared.ahead[int(lengths[b]) % 2, lo + b, li] for b in range(hi - lo)])
                    cand_ok = torch.from_numpy(done_t[lo:hi, li] == tags)   # made for this step of this occupant
                idx = xlayer_pass(cfg, q_x, store.k[layer, lo:hi], lengths, scale, cand, cand_ok)
                for b in range(hi - lo):
                    shared.chosen[int(lengths[b]) % 2, lo + b, li] = idx[b]
                done_x[lo:hi, li] = tags
                jobs_done[1, li] += 1
            done_sem.release()


class AsyncSelector:
    """The inference rank's side: posts jobs, picks up published selections, counts late steps."""

    def __init__(self, cfg: SparseConfig, store: KVStore, num_heads: int, sparse_layers: list[int], scale: float,
                 on_late: str = "wait", timeout_s: float = 10.0):
        if on_late not in ("wait", "reuse"):
            raise ValueError("on_late must be 'wait' or 'reuse'")
        self.cfg, self.store, self.scale, self.on_late = cfg, store, scale, on_late
        self.num_heads, self.sparse_layers, self.timeout_s = num_heads, sparse_layers, timeout_s
        self.li = {layer: i for i, layer in enumerate(sparse_layers)}
        self.temporal = cfg.predictor in ("ridge", "hybrid")
        self.xlayer = cfg.predictor in ("xlayer", "hybrid")
        self.width = ahead_width(cfg, store.max_tokens)
        store.share_memory_()
        self.shared = SharedState(cfg, store, num_heads, len(sparse_layers))
        self._ring = self.shared.ring.numpy()
        self._done_t, self._done_x = self.shared.done_t.numpy(), self.shared.done_x.numpy()
        self._jobs_done = self.shared.jobs_done.numpy()
        self._posted = np.zeros((2, len(sparse_layers)), dtype=np.int64)
        # target cache length of the newest job posted per (kind, slot, layer): a step no job was posted for
        # (e.g. the first step of a sequence adopted from a filled cache) must not be waited for
        self._asked = np.full((2, store.slots, len(sparse_layers)), -1, dtype=np.int64)
        self._serial = np.zeros(store.slots, dtype=np.int64)      # bumped when a new sequence takes the slot
        self._head = 0
        ctx = mp.get_context("spawn")
        self.job_sem, self.done_sem = ctx.Semaphore(0), ctx.Semaphore(0)
        self.proc = ctx.Process(target=_worker_main, daemon=True, name="asyncspade-cache-rank",
                                args=(cfg, store, self.shared, sparse_layers, scale, self.job_sem, self.done_sem,
                                      os.getpid()))
        self.proc.start()
        self.fallback: SyncSelector | None = None
        t_end = time.perf_counter() + 300               # a cold start imports torch: seconds, more on a busy box
        while not self.done_sem.acquire(timeout=0.1):
            if not self.proc.is_alive() or time.perf_counter() > t_end:
                self._start_fallback("the cache-rank worker failed to start")
                break
        self.steps = 0            # selections handed to the decode loop
        self.late = 0             # of which were not ready in time
        self.wait_s = 0.0         # total time the decode loop blocked on the worker

    # ------------------------------------------------------------------ posting jobs
    def _tags(self, lo: int, hi: int, lengths: np.ndarray) -> np.ndarray:
        return (self._serial[lo:hi] << 32) + lengths

    def _post(self, kind: int, li: int, lo: int, hi: int, nq: int, par: int, lengths=None) -> bool:
        if self.fallback is not None:
            return False
        rec = self._ring[self._head % len(self._ring)]
        rec[:HEADER] = (kind, li, lo, hi, nq, par)
        if lengths is not None:
            s = self.store.slots
            rec[HEADER + lo:HEADER + hi] = lengths
            rec[HEADER + s + lo:HEADER + s + hi] = self._tags(lo, hi, lengths)
        self._head += 1
        self.job_sem.release()
        return True

    def _reserve(self, kind: int, li: int) -> int | None:
        """Buffer parity for the next job of this kind and layer; at most two jobs in flight per (kind, layer),
        so a buffer is never overwritten before the worker has read it."""
        while self._posted[kind, li] - self._jobs_done[kind, li] >= 2:
            if not self._block("buffer"):
                return None
        return int(self._posted[kind, li] % 2)

    def reset(self, lo: int, hi: int) -> None:
        if self.fallback is not None:
            return self.fallback.reset(lo, hi)
        self._serial[lo:hi] += 1
        self._asked[:, lo:hi] = -1
        self._post(RESET, 0, lo, hi, 0, 0)

    def on_query(self, layer: int, q: torch.Tensor, batch: Batch) -> None:
        if self.fallback is not None:
            return self.fallback.on_query(layer, q, batch)
        li = self.li[layer]
        par = self._reserve(0, li)
        if par is None:
            return self.fallback.on_query(layer, q, batch)
        nq = min(q.shape[2], self.cfg.window)
        self.shared.qbuf[par, li, batch.lo:batch.hi, :, self.cfg.window - nq:] = q[:, :, -nq:]
        self._posted[0, li] += 1
        self._asked[0, batch.lo:batch.hi, li] = self._tags(batch.lo, batch.hi, batch.lengths.numpy() + 1)
        self._post(TEMPORAL, li, batch.lo, batch.hi, nq, par, batch.lengths.numpy())

    def on_xlayer(self, layer: int, q_x: torch.Tensor, batch: Batch) -> None:
        if self.fallback is not None:
            return self.fallback.on_xlayer(layer, q_x, batch)
        li = self.li[layer]
        par = self._reserve(1, li)
        if par is None:
            return self.fallback.on_xlayer(layer, q_x, batch)
        self.shared.xbuf[par, li, batch.lo:batch.hi] = q_x
        self._posted[1, li] += 1
        self._asked[1, batch.lo:batch.hi, li] = self._tags(batch.lo, batch.hi, batch.lengths.numpy())
        self._post(XLAYER, li, batch.lo, batch.hi, 1, par, batch.lengths.numpy())

    # ------------------------------------------------------------------ picking up results
    def get(self, layer: int, batch: Batch, q_now: torch.Tensor | None = None) -> torch.Tensor:
        if self.fallback is not None:
            if batch.max_len > self._fallback_len:         # the in-process selector has caught up
                return self.fallback.get(layer, batch)
            return self._fallback_get(layer, batch, q_now)
        li = self.li[layer]
        done, src = (self._done_x, self.shared.chosen) if self.xlayer else (self._done_t, self.shared.ahead)
        lengths = batch.lengths.numpy()
        need = self.cfg.sparse_at(lengths)                # rows that attend sparsely this step
        rows = slice(batch.lo, batch.hi)
        tags = self._tags(batch.lo, batch.hi, lengths)[need]
        if not np.all(self._asked[int(self.xlayer), rows, li][need] == tags):
            return self._fallback_get(layer, batch, q_now)        # nothing was scheduled for this step
        self.steps += 1
        if not np.all(done[rows, li][need] == tags):
            self.late += 1
            t0 = time.perf_counter()
            # reuse: the previous step's set of the same occupant (tags are ordered within a serial)
            reuse = self.on_late == "reuse" and np.all(done[rows, li][need] >= tags - 1)
            if reuse:
                par = (lengths - 1) % 2
                self.wait_s += time.perf_counter() - t0
                return self._pick(src, par, batch, li)
            while not np.all(done[rows, li][need] == tags):
                if not self._block("selection"):
                    self.wait_s += time.perf_counter() - t0
                    return self._fallback_get(layer, batch, q_now)
            self.wait_s += time.perf_counter() - t0
        return self._pick(src, lengths % 2, batch, li)

    def _pick(self, src: torch.Tensor, par, batch: Batch, li: int) -> torch.Tensor:
        rows = torch.arange(batch.lo, batch.hi)
        return src[torch.from_numpy(np.asarray(par, dtype=np.int64)), rows, li][..., :self.cfg.k_mid].clone()

    def _block(self, what: str) -> bool:
        """Wait for the worker to finish a job; False (and fall back) if it died or stopped answering."""
        t_end = time.perf_counter() + self.timeout_s
        while time.perf_counter() < t_end:
            if self.done_sem.acquire(timeout=0.05):
                return True
            if not self.proc.is_alive():
                break
        self._start_fallback(f"the cache-rank worker {'died' if not self.proc.is_alive() else 'stopped answering'}"
                             f" while the decode loop waited for a {what}")
        return False

    # ------------------------------------------------------------------ faults
    def _start_fallback(self, why: str) -> None:
        if self.fallback is not None:
            return
        self.fallback = in_process_fallback(why, self.cfg, self.store, self.num_heads, self.sparse_layers,
                                            self.scale)
        self._fallback_len = int(self.store.lengths.max()) + 1      # covers the step in progress
        self._stop_worker()

    def _fallback_get(self, layer: int, batch: Batch, q_now: torch.Tensor | None) -> torch.Tensor:
        """No selection to pick up (after a fault the windows are gone; or no job was posted for this step):
        select with the current query (exact). After a fault later steps rebuild the windows in-process."""
        from .scoring import topk_tokens
        c = self.cfg
        if q_now is None:
            raise RuntimeError("selection unavailable")
        keys = self.store.k[layer, batch.lo:batch.hi]
        return topk_tokens(q_now, keys, c.sink, batch.lengths - c.recent, c.k_mid, self.scale, c.aggregate)

    @property
    def late_rate(self) -> float:
        return self.late / self.steps if self.steps else 0.0

    def _stop_worker(self) -> None:
        if self.proc.is_alive():
            try:
                self._post_stop()
                self.proc.join(timeout=2)
            finally:
                if self.proc.is_alive():
                    self.proc.kill()
                    self.proc.join(timeout=2)

    def _post_stop(self) -> None:
        rec = self._ring[self._head % len(self._ring)]
        rec[:HEADER] = (STOP, 0, 0, 0, 0, 0)
        self._head += 1
        self.job_sem.release()

    def close(self) -> None:
        self._stop_worker()
        # drop the semaphores now: their finalizer unlinks them; at a signal-driven exit (uvicorn re-raises SIGTERM)
        # no finalizer runs and the resource tracker would report them leaked
        self.job_sem = self.done_sem = None
