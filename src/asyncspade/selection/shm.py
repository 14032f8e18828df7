"""The shared-memory transport: a worker process on the same machine runs the ahead-of-time selections of
``lastq`` / ``asyncspade`` while the decode loop (the inference rank) runs the forward.

The KV store, the queries and the results live in shared memory; jobs go through a fixed-size ring of int64
records; two POSIX semaphores carry the signals (job posted, job done) so neither side ever busy-spins (the machine
has 2 cores).

Protocol, per sparse layer l:
- after layer l's attention the decode loop posts a TEMPORAL job with its real queries; when the cross-layer
  pass at layer l - lead of the next step is due, an XLAYER job with the cross-layer forecast;
- the worker runs them on its :class:`~asyncspade.selection.local.SyncSelector` (the in-process selector, over the
  shared store) and publishes the selection the decode loop takes, double-buffered by the parity of its target
  cache length; ``done[slot, l]`` records the *tag* of the newest published result — the slot's occupancy serial
  and the target length, ``serial << 32 | length`` — so the decode loop knows without a round trip whether the
  selection it needs is ready, and a late result made for a slot's previous occupant is never taken for the new
  one's. Waiting, reuse and faults: :class:`~asyncspade.selection.remote.RemoteSelector`.
"""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import torch
import torch.multiprocessing as mp

from ..config import SparseConfig
from ..kvcache import Batch, KVStore
from .local import SyncSelector
from .plan import SelectionPlan
from .remote import RemoteSelector

RESET, TEMPORAL, XLAYER, STOP = 0, 1, 2, 3
HEADER = 6                         # kind, layer index, lo, hi, number of queries, buffer parity


def tag(serial, length):
    """The tag of a result for a slot's occupant ``serial`` and target cache ``length`` (arrays element-wise)."""
    return (serial << 32) + length


class SharedState:
    """Everything both ranks touch, allocated in shared memory before the worker starts."""

    def __init__(self, plan: SelectionPlan, store: KVStore, num_heads: int, num_sparse: int):
        s, kvh, d, window = store.slots, store.kv_heads, store.head_dim, plan.cfg.window
        self.qbuf = torch.zeros(2, num_sparse, s, num_heads, window, d)          # real queries (temporal)
        self.xbuf = torch.zeros(2, num_sparse, s, num_heads, d)                   # cross-layer forecasts
        self.result = torch.zeros(2, s, num_sparse, kvh, plan.result_width, dtype=torch.int64)
        self.done = torch.full((s, num_sparse), -1, dtype=torch.int64)           # tag of the result published
        self.jobs_done = torch.zeros(2, num_sparse, dtype=torch.int64)           # per kind (temporal, xlayer)
        self.ring = torch.zeros(8 * num_sparse + 8, HEADER + 2 * s, dtype=torch.int64)   # + lengths, serials
        for t in self.tensors():
            t.share_memory_()

    def tensors(self):
        return [self.qbuf, self.xbuf, self.result, self.done, self.jobs_done, self.ring]


def _worker_main(cfg, store, shared, sparse_layers, scale, job_sem, done_sem, parent_pid):
    """The worker's loop: take a job, run it, publish, signal. Exits on STOP or when the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)          # Ctrl-C is the parent's to handle
    torch.set_num_threads(1)
    sel = SyncSelector(cfg, store, shared.qbuf.shape[3], sparse_layers, scale)
    ring = shared.ring.numpy()
    done, jobs_done = shared.done.numpy(), shared.jobs_done.numpy()
    tail, s, window = 0, store.slots, cfg.window
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
            if kind == STOP:
                return
            if kind == RESET:
                sel.reset(lo, hi)
            else:
                lengths = torch.from_numpy(rec[HEADER + lo:HEADER + hi].copy())
                q = shared.qbuf[par, li, lo:hi, :, window - nq:] if kind == TEMPORAL else shared.xbuf[par, li, lo:hi]
                got = sel.answer(kind == XLAYER, sparse_layers[li], q, Batch(lo, hi, lengths, 0))
                if got is not None:
                    target, idx = got
                    for b in range(hi - lo):          # rows may differ in parity: publish row by row
                        shared.result[int(target[b]) % 2, lo + b, li] = idx[b]
                    done[lo:hi, li] = tag(rec[HEADER + s + lo:HEADER + s + hi], target.numpy())
                jobs_done[kind - TEMPORAL, li] += 1
            done_sem.release()


class AsyncSelector(RemoteSelector):
    """The inference rank's side over shared memory with a worker process."""

    def __init__(self, cfg: SparseConfig, store: KVStore, num_heads: int, sparse_layers: list[int], scale: float,
                 on_late: str = "wait", timeout_s: float = 10.0):
        super().__init__(cfg, store, num_heads, sparse_layers, scale, on_late, timeout_s)
        store.share_memory_()
        self.shared = SharedState(self.plan, store, num_heads, len(sparse_layers))
        self._ring = self.shared.ring.numpy()
        self._done, self._jobs_done = self.shared.done.numpy(), self.shared.jobs_done.numpy()
        self._posted = np.zeros((2, len(sparse_layers)), dtype=np.int64)
        self._serial = np.zeros(store.slots, dtype=np.int64)      # bumped when a new sequence takes the slot
        self._head = 0
        ctx = mp.get_context("spawn")
        self.job_sem, self.done_sem = ctx.Semaphore(0), ctx.Semaphore(0)
        self.proc = ctx.Process(target=_worker_main, daemon=True, name="asyncspade-cache-rank",
                                args=(cfg, store, self.shared, sparse_layers, scale, self.job_sem, self.done_sem,
                                      os.getpid()))
        self.proc.start()
        t_end = time.perf_counter() + 300               # a cold start imports torch: seconds, more on a busy box
        while not self.done_sem.acquire(timeout=0.1):
            if not self.proc.is_alive() or time.perf_counter() > t_end:
                self._start_fallback("the cache-rank worker failed to start")
                break

    # ------------------------------------------------------------------ posting jobs
    def _tags(self, lo: int, hi: int, lengths: np.ndarray) -> np.ndarray:
        return tag(self._serial[lo:hi], lengths)

    def _post(self, kind: int, li: int = 0, lo: int = 0, hi: int = 0, nq: int = 0, par: int = 0,
              lengths=None) -> None:
        rec = self._ring[self._head % len(self._ring)]
        rec[:HEADER] = (kind, li, lo, hi, nq, par)
        if lengths is not None:
            s = self.store.slots
            rec[HEADER + lo:HEADER + hi] = lengths
            rec[HEADER + s + lo:HEADER + s + hi] = self._serial[lo:hi]
        self._head += 1
        self.job_sem.release()

    def _reserve(self, kind: int, li: int) -> int | None:
        """Buffer parity for the next job of this kind and layer; at most two jobs in flight per (kind, layer),
        so a buffer is never overwritten before the worker has read it."""
        while self._posted[kind, li] - self._jobs_done[kind, li] >= 2:
            if not self._block("buffer"):
                return None
        self._posted[kind, li] += 1
        return int((self._posted[kind, li] - 1) % 2)

    def _post_reset(self, lo: int, hi: int) -> None:
        self._serial[lo:hi] += 1
        self._post(RESET, 0, lo, hi)

    def _post_query(self, li: int, layer: int, q: torch.Tensor, batch: Batch) -> bool:
        par = self._reserve(0, li)
        if par is None:
            return False
        window = self.cfg.window
        nq = min(q.shape[2], window)
        self.shared.qbuf[par, li, batch.lo:batch.hi, :, window - nq:] = q[:, :, -nq:]
        self._post(TEMPORAL, li, batch.lo, batch.hi, nq, par, batch.lengths.numpy())
        return True

    def _post_xlayer(self, li: int, layer: int, q_x: torch.Tensor, batch: Batch) -> bool:
        par = self._reserve(1, li)
        if par is None:
            return False
        self.shared.xbuf[par, li, batch.lo:batch.hi] = q_x
        self._post(XLAYER, li, batch.lo, batch.hi, 1, par, batch.lengths.numpy())
        return True

    # ------------------------------------------------------------------ picking up results
    def _published(self, li: int, rows: slice) -> np.ndarray:
        return self._done[rows, li]

    def _wait(self, ready) -> bool:
        while not ready():
            if not self._block("selection"):
                return False
        return True

    def _take(self, li: int, batch: Batch, target: np.ndarray) -> torch.Tensor:
        par = torch.from_numpy(np.asarray(target % 2, dtype=np.int64))
        rows = torch.arange(batch.lo, batch.hi)
        return self.shared.result[par, rows, li][..., :self.plan.result_width].clone()

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

    # ------------------------------------------------------------------ shutdown
    def _shutdown(self) -> None:
        if self.proc.is_alive():
            try:
                self._post(STOP)
                self.proc.join(timeout=2)
            finally:
                if self.proc.is_alive():
                    self.proc.kill()
                    self.proc.join(timeout=2)

    def close(self) -> None:
        self._shutdown()
        # drop the semaphores now: their finalizer unlinks them; at a signal-driven exit (uvicorn re-raises SIGTERM)
        # no finalizer runs and the resource tracker would report them leaked
        self.job_sem = self.done_sem = None
