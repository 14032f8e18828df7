"""The byte floor of a decode step: what it must read (weights, KV rows, selection data) over what the machine can
stream (measured here, not assumed). ``asyncspade bench --roofline`` prints both next to every timing."""
from __future__ import annotations

import time

import torch

from .config import SparseConfig


def read_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of a large streaming read (a sum over ``gib`` GiB, far beyond the caches) on ``threads`` threads."""
    x = torch.ones(int(gib * 2**30) // 4)            # written once: untouched pages would read as one zero page
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x.sum()
        best = min(_timed(x.sum) for _ in range(repeats))
    finally:
        torch.set_num_threads(prev)
    return x.numel() * 4 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def kv_bytes(cfg: SparseConfig, sparse_layers: int, dense_layers: int, context: int, row_bytes: int) -> int:
    """K and V bytes one sequence's decode step reads at ``context`` cached tokens: every row in the dense layers,
    the budget in the sparse ones once the cache exceeds it. ``row_bytes``: one token's K (or V) row in one layer,
    all KV heads."""
    attended = min(context, cfg.budget) if cfg.sparse else context
    return 2 * row_bytes * (dense_layers * context + sparse_layers * attended)
