"""Where the ahead-of-time selections of ``lastq`` / ``asyncspade`` are computed.

- ``plan.py``     SelectionPlan: which passes run and the widths they keep, derived once from the settings
- ``passes.py``   the step-ahead (temporal) and cross-layer passes, pure functions
- ``candidate_keys.py``  CandidateKeys: the in-line refinement's candidates' keys, gathered once per list
- ``base.py``     Selector: the interface the method and the runtime use
- ``local.py``    SyncSelector: in-process, at the moment each selection becomes possible (and the workers' engine)
- ``remote.py``   RemoteSelector: the inference side of a worker (late steps, wait or reuse, fault -> in-process)
- ``shm.py``      AsyncSelector: a worker process over shared memory
- ``thread.py``   ThreadSelector: a thread of the decode loop's own process
- ``dist.py``     DistSelector: a cache rank over torch.distributed with its own key copy
"""
from __future__ import annotations

from ..config import SparseConfig
from ..kvcache import KVStore
from .base import Selector
from .dist import DistSelector
from .local import SyncSelector
from .plan import SelectionPlan
from .shm import AsyncSelector
from .thread import ThreadSelector


def make_selector(kind: str, cfg: SparseConfig, store: KVStore, num_heads: int, sparse_layers: list[int],
                  scale: float, on_late: str = "wait") -> Selector:
    """``sync``: in-process at the moment each selection becomes possible; ``async``: a worker process over shared
    memory; ``thread``: a thread of this process; ``dist``: a cache rank over torch.distributed that keeps its own
    key copy."""
    if kind == "sync":
        return SyncSelector(cfg, store, num_heads, sparse_layers, scale)
    if kind == "async":
        return AsyncSelector(cfg, store, num_heads, sparse_layers, scale, on_late=on_late)
    if kind == "thread":
        return ThreadSelector(cfg, store, num_heads, sparse_layers, scale, on_late=on_late)
    if kind == "dist":
        return DistSelector(cfg, store, num_heads, sparse_layers, scale, on_late=on_late)
    raise ValueError(f"unknown selector {kind!r}; choose sync, async, thread or dist")


__all__ = ["AsyncSelector", "DistSelector", "SelectionPlan", "Selector", "SyncSelector", "ThreadSelector",
           "make_selector"]
