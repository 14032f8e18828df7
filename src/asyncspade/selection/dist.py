"""The ``torch.distributed`` transport: a cache rank that shares no memory with the inference rank (another device or
host).

The worker is rank 1 of a private two-rank group (gloo over loopback here; NCCL would be the choice between GPUs).
It keeps its own copy of the sparse layers' keys (plus page min/max for the page prefilter) and its own query
windows; only indices come back.

- Keys: before each job the inference rank ships the rows of that layer the worker does not hold yet: one new row
  per sequence in decode (piggybacked on the job), the whole prompt after a prefill (KEYS messages of ``CHUNK``
  rows). Keys of non-final prefill chunks, of skipped temporal passes and of the ``xlayer``-only predictor (no
  temporal jobs) thus all arrive before any pass scores them.
- Jobs: TEMPORAL carries a layer's real queries, XLAYER the cross-layer forecast; the worker runs them on a
  :class:`~asyncspade.selection.local.SyncSelector` over its key copy, and sends back the selection the decode loop
  will use (``[slots, kv_heads, k]`` indices plus the target cache length of each row).
- Every tag has one message size (gloo aborts the process on a size mismatch): an int64 header, then payloads of
  agreed shapes, zero-padded.

Gloo's ``Work.is_completed()`` does not report a finished send or receive before someone ``wait()``s on it
(torch 2.13), and a timed-out wait poisons the group. So the decode loop only *posts* sends (gloo transmits them in
the background, in order); a reaper thread waits them out (releasing their buffers and a slot of the bounded number
of jobs in flight), and a receiver thread blocks on results and publishes them under a condition variable. The
decode loop checks the published selections without blocking and, when late, waits on the condition with a
timeout. Faults (the worker dies: the threads see the connection drop; or it stops answering for ``timeout_s``)
switch to the in-process selector (:class:`~asyncspade.selection.remote.RemoteSelector`), and the group is torn down
without another message on it.
"""
from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..config import SparseConfig
from ..kvcache import Batch, KVStore
from .local import SyncSelector
from .remote import RemoteSelector

RESET, TEMPORAL, XLAYER, KEYS, STOP = range(5)
T_HEAD, T_QWIN, T_Q1, T_QX, T_KROW, T_KCHUNK, T_RESULT = range(1, 8)   # one tag per message shape
HEAD = 6            # kind, layer index, lo, hi, number of queries, job serial (KEYS: kind, li, slot, offset, rows)
RESULT_HEAD = 4     # layer index (-1: the worker leaves), lo, hi, serial of the job it answers
CHUNK = 256         # key rows per KEYS message
STARTUP = timedelta(seconds=120)   # forming the group, once both ranks are up
IDLE = timedelta(days=7)           # blocking waits: a server may sit idle for long; faults are detected otherwise


@dataclass(frozen=True)
class Wire:
    """Message shapes both ranks derive from the same settings, so a tag's buffers always have one size."""
    slots: int
    heads: int
    kv_heads: int
    head_dim: int
    window: int
    k_res: int               # indices per (row, KV head) in a result
    dtype: torch.dtype       # keys travel in the KV store's dtype; queries in fp32, as the in-process selector reads them

    def head(self) -> torch.Tensor:                # [HEAD | lengths per slot | new key position per slot or -1]
        return torch.zeros(HEAD + 2 * self.slots, dtype=torch.int64)

    def queries(self, nq: int) -> torch.Tensor:    # decode: one query; final prefill chunk: the window's worth
        return torch.zeros(self.slots, self.heads, 1 if nq == 1 else self.window, self.head_dim)

    def xquery(self) -> torch.Tensor:
        return torch.zeros(self.slots, self.heads, self.head_dim)

    def key_rows(self) -> torch.Tensor:
        return torch.zeros(self.slots, self.kv_heads, self.head_dim, dtype=self.dtype)

    def key_chunk(self) -> torch.Tensor:
        return torch.zeros(self.kv_heads, CHUNK, self.head_dim, dtype=self.dtype)

    def result(self) -> torch.Tensor:              # [RESULT_HEAD | target length per slot | indices]
        return torch.zeros(RESULT_HEAD + self.slots * (1 + self.kv_heads * self.k_res), dtype=torch.int64)

    def result_parts(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.slots
        return buf[RESULT_HEAD:RESULT_HEAD + s], buf[RESULT_HEAD + s:].view(s, self.kv_heads, self.k_res)


def _gloo_group(store, rank: int):
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = STARTUP
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]    # listen on loopback only
    return dist.ProcessGroupGloo(store, rank, 2, opts)


# A private group, not the default one: the application may be a torch.distributed job itself, and several engines
# may each have a cache rank. NCCL (GPU ranks) would add a factory here and move the payloads to the device.
GROUPS = {"gloo": _gloo_group}


class _PeerGone(Exception):
    """The inference rank closed the connection (it exited or tore the group down)."""


class _CacheRank:
    """The worker's loop: its own key copy, and a :class:`SyncSelector` over it that runs the very passes the
    in-process selector runs (windows, step-ahead candidates, cross-layer refinement); jobs in, indices out."""

    def __init__(self, cfg: SparseConfig, wire: Wire, num_sparse: int, max_tokens: int, track_pages: bool,
                 track_sketch: bool, page_size: int, scale: float):
        self.wire = wire
        # keys only: the values are never touched (calloc'd pages cost nothing until written)
        self.store = KVStore(num_sparse, wire.slots, wire.kv_heads, max_tokens, wire.head_dim, wire.dtype,
                             page_size, track_pages, track_sketch=track_sketch)
        # the store holds only the sparse layers, so a sparse layer's index is its layer number here
        self.selector = SyncSelector(cfg, self.store, wire.heads, list(range(num_sparse)), scale)
        self.out = wire.result()

    def recv(self, buf: torch.Tensor, tag: int) -> torch.Tensor:
        try:
            self.pg.recv([buf], 0, tag).wait(IDLE)
        except RuntimeError as e:
            raise _PeerGone from e
        return buf

    def reply(self, li: int, lo: int = 0, hi: int = 0, serial: int = 0, target=None, idx=None) -> None:
        self.out[:RESULT_HEAD] = torch.tensor([li, lo, hi, serial])
        if idx is not None:
            tgt, sel = self.wire.result_parts(self.out)
            tgt[lo:hi] = target
            sel[lo:hi, :, :idx.shape[-1]] = idx
        try:
            self.pg.send([self.out], 0, T_RESULT).wait(IDLE)     # waited: the buffer is reused
        except RuntimeError as e:
            raise _PeerGone from e

    def add_keys(self, li: int, slot: int, pos: int, rows: torch.Tensor) -> None:
        """Keys ``rows [KVH, n, D]`` of positions ``pos..pos+n`` (and what derives from them: pages, sketch)."""
        n = rows.shape[1]
        self.store.k[li, slot, :, pos:pos + n] = rows
        self.store.rebuild(li, slot, pos, pos + n)

    def run(self, pg) -> None:
        self.pg = pg
        w, s = self.wire, self.wire.slots
        head, chunk, rows, qx = w.head(), w.key_chunk(), w.key_rows(), w.xquery()
        qbuf = {1: w.queries(1), w.window: w.queries(w.window)}
        while True:
            kind, li, lo, hi, nq, serial = self.recv(head, T_HEAD)[:HEAD].tolist()
            if kind == STOP:
                return self.reply(-1)
            if kind == RESET:
                self.selector.reset(lo, hi)
                continue
            if kind == KEYS:                                   # lo = slot, hi = first position, nq = rows
                self.add_keys(li, lo, hi, self.recv(chunk, T_KCHUNK)[:, :nq])
                continue
            lengths = head[HEAD + lo:HEAD + hi].clone()
            kpos = head[HEAD + s + lo:HEAD + s + hi].tolist()
            if kind == TEMPORAL:
                q = self.recv(qbuf[1 if nq == 1 else w.window], T_Q1 if nq == 1 else T_QWIN)[lo:hi, :, -nq:]
            else:
                q = self.recv(qx, T_QX)[lo:hi]
            if max(kpos) >= 0:                                 # this step's new key rows
                self.recv(rows, T_KROW)
                for b, p in enumerate(kpos):
                    if p >= 0:
                        self.add_keys(li, lo + b, p, rows[lo + b, :, None])
            # the cache holds ``lengths`` tokens now; a reply only when the pass made the final selection
            got = self.selector.answer(kind == XLAYER, li, q, Batch(lo, hi, lengths, 0))
            if got is not None:
                self.reply(li, lo, hi, serial, *got)


def _worker_main(backend: str, path: str, cfg: SparseConfig, wire: Wire, num_sparse: int, max_tokens: int,
                 track_pages: bool, track_sketch: bool, page_size: int, scale: float) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)          # Ctrl-C is the parent's to handle
    torch.set_num_threads(1)
    rank = _CacheRank(cfg, wire, num_sparse, max_tokens, track_pages, track_sketch, page_size, scale)
    store = dist.FileStore(path, 2)
    store.set("ready", "1")
    pg = GROUPS[backend](store, 1)
    try:
        with torch.inference_mode():
            rank.run(pg)
    except _PeerGone:
        pass
    finally:
        pg.shutdown()


def _short(e: BaseException) -> str:
    """The gist of a gloo error: without its source location, first sentence only."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip())
    return text.split(". ")[0].splitlines()[0][:120] if text else type(e).__name__


class DistSelector(RemoteSelector):
    """The inference rank's side over torch.distributed: ships keys and jobs, receives selections.

    Beyond the base: ``wait_s`` also counts the time the decode loop blocked because the worker was more than
    ``2 * len(sparse_layers) + 2`` jobs behind; results for a slot's previous occupant are dropped (job serials), so
    a result's tag is just its target cache length. The rendezvous is a FileStore in a fresh temporary folder: a
    TCPStore master would listen on every interface.
    """

    def __init__(self, cfg: SparseConfig, store: KVStore, num_heads: int, sparse_layers: list[int], scale: float,
                 on_late: str = "wait", timeout_s: float = 10.0, backend: str = "gloo"):
        if backend not in GROUPS:
            raise ValueError(f"unknown backend {backend!r}; choose one of: {', '.join(GROUPS)}")
        super().__init__(cfg, store, num_heads, sparse_layers, scale, on_late, timeout_s)
        n, s, k_res = len(sparse_layers), store.slots, self.plan.result_width
        self.wire = Wire(s, num_heads, store.kv_heads, store.head_dim, cfg.window, k_res, store.dtype)
        self._synced = np.zeros((s, n), dtype=np.int64)     # key rows the worker holds per (slot, sparse layer)
        self._serial = 0                                     # jobs posted
        self._epoch = np.zeros(s, dtype=np.int64)            # serial of each slot's reset: older results are stale
        self._done = np.full((s, n), -1, dtype=np.int64)     # target cache length of the selection in _sel
        self._sel = torch.zeros(s, n, store.kv_heads, k_res, dtype=torch.int64)
        self._cv = threading.Condition()
        self._fault: str | None = None
        self._outbox: queue.Queue = queue.Queue()            # posted sends, for the reaper thread
        self._room = threading.BoundedSemaphore(2 * n + 2)  # jobs in flight: beyond, the decode loop waits
        self._threads: list[threading.Thread] = []
        self._down = False
        self.pg = None

        self.rendezvous = tempfile.mkdtemp(prefix="asyncspade-rdzv-")    # fresh: a stale file breaks the init
        self._remove_rendezvous = weakref.finalize(self, shutil.rmtree, self.rendezvous, True)   # even unclosed
        path = os.path.join(self.rendezvous, "store")
        self._store = dist.FileStore(path, 2)
        self.proc = mp.get_context("spawn").Process(
            target=_worker_main, daemon=True, name="asyncspade-cache-rank",
            args=(backend, path, cfg, self.wire, n, store.max_tokens, store.track_pages, store.track_sketch,
                  store.page_size, scale))
        self.proc.start()
        t_end = time.perf_counter() + 300               # a cold start imports torch: seconds, more on a busy box
        while not self._store.check(["ready"]):
            if not self.proc.is_alive() or time.perf_counter() > t_end:
                self._start_fallback("the cache-rank worker failed to start")
                return
            time.sleep(0.05)
        try:
            self.pg = GROUPS[backend](self._store, 0)
        except RuntimeError as e:
            self._start_fallback(f"the cache-rank group could not be formed ({_short(e)})")
            return
        for loop in (self._reap_loop, self._recv_loop):
            t = threading.Thread(target=loop, daemon=True, name=f"asyncspade-dist{loop.__name__}")
            t.start()
            self._threads.append(t)

    # ------------------------------------------------------------------ the two threads that wait on gloo
    def _reap_loop(self) -> None:
        try:
            while (sent := self._outbox.get()) is not None:
                for work, _ in sent:                         # the tensors stay alive until gloo is done with them
                    work.wait(IDLE)
                self._room.release()
        except RuntimeError as e:
            self._set_fault(f"the cache-rank link failed ({_short(e)})")

    def _recv_loop(self) -> None:
        buf = self.wire.result()
        tgt, sel = self.wire.result_parts(buf)
        try:
            while True:
                self.pg.recv([buf], 1, T_RESULT).wait(IDLE)
                li, lo, hi, serial = buf[:RESULT_HEAD].tolist()
                if li < 0:                                   # the worker acknowledged STOP
                    return
                with self._cv:
                    fresh = serial > self._epoch[lo:hi]      # rows still held by the sequence that asked
                    self._sel[lo:hi, li][torch.from_numpy(fresh)] = sel[lo:hi][torch.from_numpy(fresh)]
                    self._done[lo:hi, li][fresh] = tgt[lo:hi].numpy()[fresh]
                    self._cv.notify_all()
        except RuntimeError as e:
            self._set_fault(f"the cache-rank link failed ({_short(e)})")

    def _set_fault(self, why: str) -> None:
        with self._cv:
            if self._fault is None:
                self._fault = why
            self._cv.notify_all()

    # ------------------------------------------------------------------ posting jobs
    def _head(self, kind: int, li: int, lo: int, hi: int, nq: int, lengths=None, kpos=None) -> torch.Tensor:
        self._serial += 1
        h = self.wire.head()
        h[:HEAD] = torch.tensor([kind, li, lo, hi, nq, self._serial])
        if lengths is not None:
            h[HEAD + lo:HEAD + hi] = lengths
        h[HEAD + self.wire.slots:] = -1 if kpos is None else kpos
        return h

    def _sync_keys(self, li: int, layer: int, batch: Batch, upto: torch.Tensor):
        """Messages that bring the worker's keys of ``layer`` up to position ``upto[b]`` for each row: KEYS chunks
        for long gaps (a prefill), else one row per sequence carried by the job. Returns (messages, kpos, rows)."""
        msgs, kpos, rows = [], torch.full((self.wire.slots,), -1, dtype=torch.int64), None
        for b, want in enumerate(upto.tolist()):
            slot = batch.lo + b
            have = int(self._synced[slot, li])
            if want == have + 1:
                rows = self.wire.key_rows() if rows is None else rows
                rows[slot] = self.store.k[layer, slot, :, have]
                kpos[slot] = have
            else:
                for pos in range(have, want, CHUNK):
                    n = min(CHUNK, want - pos)
                    chunk = self.wire.key_chunk()
                    chunk[:, :n] = self.store.k[layer, slot, :, pos:pos + n]
                    msgs += [(T_HEAD, self._head(KEYS, li, slot, pos, n)), (T_KCHUNK, chunk)]
            self._synced[slot, li] = max(have, want)
        return msgs, kpos, rows

    def _put(self, job: list) -> bool:
        """Post a job's messages (gloo sends them in the background, in order); blocks (bounded) while the worker
        is too many jobs behind."""
        if self._fault is None and not self._room.acquire(blocking=False):
            t0 = time.perf_counter()
            while self._fault is None and not self._room.acquire(timeout=0.05):
                if not self.proc.is_alive() or time.perf_counter() - t0 > self.timeout_s:
                    self._set_fault("the cache-rank worker stopped taking jobs")
            self.wait_s += time.perf_counter() - t0
        if self._fault is None:
            try:
                self._outbox.put([(self.pg.send([t], 1, tag), t) for tag, t in job])
                return True
            except RuntimeError as e:
                self._set_fault(f"the cache-rank link failed ({_short(e)})")
        self._start_fallback(self._reason())
        return False

    def _tags(self, lo: int, hi: int, lengths: np.ndarray) -> np.ndarray:
        return lengths                  # stale results never reach _done: the receiver drops them by job serial

    def _post_reset(self, lo: int, hi: int) -> None:
        h = self._head(RESET, 0, lo, hi, 0)
        with self._cv:
            self._epoch[lo:hi] = self._serial
            self._done[lo:hi] = -1
        self._synced[lo:hi] = 0
        self._put([(T_HEAD, h)])

    def _post_query(self, li: int, layer: int, q: torch.Tensor, batch: Batch) -> bool:
        msgs, kpos, rows = self._sync_keys(li, layer, batch, batch.lengths)   # written before this call
        nq = min(q.shape[2], self.cfg.window)
        qbuf = self.wire.queries(nq)
        qbuf[batch.lo:batch.hi, :, -nq:] = q[:, :, -nq:]
        msgs += [(T_HEAD, self._head(TEMPORAL, li, batch.lo, batch.hi, nq, batch.lengths, kpos)),
                 (T_Q1 if nq == 1 else T_QWIN, qbuf)]
        return self._put(msgs + ([(T_KROW, rows)] if rows is not None else []))

    def _post_xlayer(self, li: int, layer: int, q_x: torch.Tensor, batch: Batch) -> bool:
        msgs, kpos, rows = self._sync_keys(li, layer, batch, batch.start)     # this step's key comes later
        qx = self.wire.xquery()
        qx[batch.lo:batch.hi] = q_x
        msgs += [(T_HEAD, self._head(XLAYER, li, batch.lo, batch.hi, 1, batch.lengths, kpos)), (T_QX, qx)]
        return self._put(msgs + ([(T_KROW, rows)] if rows is not None else []))

    # ------------------------------------------------------------------ picking up results
    def _published(self, li: int, rows: slice) -> np.ndarray:
        with self._cv:
            return self._done[rows, li].copy()

    def _wait(self, ready) -> bool:
        t_end = time.perf_counter() + self.timeout_s
        with self._cv:
            while not (ok := ready()) and self._fault is None and self.proc.is_alive():
                left = t_end - time.perf_counter()
                if left <= 0:
                    break
                self._cv.wait(min(left, 0.5))
        if not ok:
            self._start_fallback(self._reason() + " while the decode loop waited for a selection")
        return ok

    def _take(self, li: int, batch: Batch, target: np.ndarray) -> torch.Tensor:
        with self._cv:                  # the newest result received: this step's, or the previous one (reuse)
            return self._sel[batch.lo:batch.hi, li, :, :self.plan.result_width].clone()

    # ------------------------------------------------------------------ faults
    def _async_fault(self) -> str | None:
        return None if self._fault is None else self._reason()

    def _reason(self) -> str:
        if self._fault is not None:
            self.proc.join(timeout=1)          # a dropped link is usually a dying worker: let it finish exiting
        if not self.proc.is_alive():
            return f"the cache-rank worker died (exit code {self.proc.exitcode})"
        return self._fault or f"the cache-rank worker stopped answering for {self.timeout_s:g} s"

    def _shutdown(self) -> None:
        self._teardown(graceful=False)

    # ------------------------------------------------------------------ shutdown
    def _teardown(self, graceful: bool) -> None:
        """Stop the worker (STOP and its goodbye when healthy, else kill), end both threads, destroy the group and
        remove the rendezvous. After a fault nothing more is sent: a failed gloo pair cannot be reused."""
        if self._down:
            return
        self._down = True
        if graceful and self._fault is None and self.pg is not None:
            try:                                             # the worker answers STOP with a goodbye and leaves
                self.pg.send([self._head(STOP, 0, 0, 0, 0)], 1, T_HEAD).wait(timedelta(seconds=self.timeout_s))
                self.proc.join(timeout=self.timeout_s)
            except RuntimeError:
                pass
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)
        self._outbox.put(None)          # the worker is gone: pending gloo calls have returned or failed
        for t in self._threads:
            t.join(timeout=5)
        if self.pg is not None:
            self.pg.shutdown()
        self.pg = self._store = None
        self._remove_rendezvous()

    def close(self) -> None:
        self._teardown(graceful=True)
