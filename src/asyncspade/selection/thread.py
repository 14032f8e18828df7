"""The in-process thread transport: the ahead-of-time selections run on a thread of the decode loop's own process.

No shared memory, no second interpreter: the thread reads the KV store the decode loop writes and runs the same
:class:`~asyncspade.selection.local.SyncSelector` a worker process would. It overlaps the forward only where the
GIL is free, which is inside the kernels (ctypes and torch release it), so its selections cost the decode loop a
little Python time and a share of the cores. The job queue and the published results live in this process; waiting,
reuse and faults: :class:`~asyncspade.selection.remote.RemoteSelector`.
"""
from __future__ import annotations

import queue
import threading
import traceback

import numpy as np
import torch

from .. import kernels
from ..config import SparseConfig
from ..kvcache import Batch, KVStore
from .local import SyncSelector
from .remote import RemoteSelector

_STOP = object()


class ThreadSelector(RemoteSelector):
    """A selection thread beside the decode loop (its kernels on one thread of their own)."""

    def __init__(self, cfg: SparseConfig, store: KVStore, num_heads: int, sparse_layers: list[int], scale: float,
                 on_late: str = "wait", timeout_s: float = 10.0):
        super().__init__(cfg, store, num_heads, sparse_layers, scale, on_late, timeout_s)
        s, n = store.slots, len(sparse_layers)
        self._serial = np.zeros(s, dtype=np.int64)
        self._done = np.full((s, n), -1, dtype=np.int64)                    # tag of the newest published result
        self._result = torch.zeros(2, s, n, store.kv_heads, self.plan.result_width, dtype=torch.int64)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._error: str | None = None
        self._worker = SyncSelector(cfg, store, num_heads, sparse_layers, scale)
        self._thread = threading.Thread(target=self._run, name="asyncspade-selection", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        kernels.thread_count(1)                       # the decode loop keeps the intra-op threads
        try:
            with torch.inference_mode():
                while (job := self._jobs.get()) is not _STOP:
                    kind, li, layer, q, batch, serial = job
                    if kind == "reset":
                        self._worker.reset(batch.lo, batch.hi)
                        continue
                    got = self._worker.answer(kind == "xlayer", layer, q, batch)
                    if got is not None:
                        target, idx = got
                        with self._cond:
                            for b in range(batch.size):
                                self._result[int(target[b]) % 2, batch.lo + b, li] = idx[b]
                            self._done[batch.lo:batch.hi, li] = (serial << 32) + target.numpy()
                            self._cond.notify_all()
        except Exception:                              # reported to the decode loop, which falls back in-process
            self._error = "the selection thread failed: " + traceback.format_exc(limit=2).strip().splitlines()[-1]
            with self._cond:
                self._cond.notify_all()

    # ------------------------------------------------------------------ the transport
    def _tags(self, lo: int, hi: int, lengths: np.ndarray) -> np.ndarray:
        return (self._serial[lo:hi] << 32) + lengths

    def _post_reset(self, lo: int, hi: int) -> None:
        self._serial[lo:hi] += 1
        self._jobs.put(("reset", 0, 0, None, Batch(lo, hi, torch.zeros(hi - lo, dtype=torch.int64), 0), None))

    def _post(self, kind: str, li: int, layer: int, q: torch.Tensor, batch: Batch) -> bool:
        if self._error is not None:
            return False
        job_batch = Batch(batch.lo, batch.hi, batch.lengths.clone(), 0)
        self._jobs.put((kind, li, layer, q.clone(), job_batch, self._serial[batch.lo:batch.hi].copy()))
        return True

    def _post_query(self, li: int, layer: int, q: torch.Tensor, batch: Batch) -> bool:
        return self._post("temporal", li, layer, q, batch)

    def _post_xlayer(self, li: int, layer: int, q_x: torch.Tensor, batch: Batch) -> bool:
        return self._post("xlayer", li, layer, q_x, batch)

    def _published(self, li: int, rows: slice) -> np.ndarray:
        return self._done[rows, li]

    def _wait(self, ready) -> bool:
        with self._cond:
            ok = self._cond.wait_for(lambda: ready() or self._error is not None, timeout=self.timeout_s)
        if ok and self._error is None:
            return True
        self._start_fallback(self._error or "the selection thread stopped answering")
        return False

    def _take(self, li: int, batch: Batch, target: np.ndarray) -> torch.Tensor:
        par = torch.from_numpy(np.asarray(target % 2, dtype=np.int64))
        with self._cond:
            return self._result[par, torch.arange(batch.lo, batch.hi), li].clone()

    def _async_fault(self) -> str | None:
        return self._error

    def _shutdown(self) -> None:
        self._jobs.put(_STOP)
        self._thread.join(timeout=2)

    def close(self) -> None:
        if self._thread.is_alive():
            self._shutdown()
