"""When sparse decoding pays: a cost model of one layer's decode attention, measured on the machine at hand.

Per sequence and layer, dense attention reads its whole cache; sparse attention reads what the selection touches
in-line (the candidates it re-ranks, the rows it attends) and pays a fixed cost for its extra kernel calls:

    dense(n)  = call_dense  + byte   * 2 * n * row
    sparse(n) = call_sparse + gather * (fixed + per_token * n) * row

(``row``: one token's K or V row over the KV heads, in bytes). Dense streams its rows; the sparse path reads
scattered ones (candidate pages, selected tokens), which cost several times more per byte (one thread of an AMD
EPYC VM: 34-35 GB/s streamed, 5.5-6.2 GB/s for 16-token pages at random from memory). All constants are measured
by timing the kernels themselves on synthetic data the size of the store's rows, the scattered reads from a buffer
larger than the caches. Sparse pays from the smallest cache length at which it is cheaper; below it the runtime
decodes those rows densely. The engine reports how many layer steps ran each way.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from . import kernels


@dataclass(frozen=True)
class CostModel:
    call_dense: float       # s: fixed cost of one dense attention call
    call_sparse: float      # s: fixed cost of the sparse path (scoring, top-k and attention calls)
    byte: float             # s per byte streamed (dense attention)
    gather: float | None = None     # s per byte of scattered rows (the sparse path); None: as streamed

    def dense(self, n: int, row: int) -> float:
        return self.call_dense + self.byte * 2 * n * row

    def sparse(self, n: int, rows: tuple[float, float], row: int) -> float:
        """``rows = (fixed, per_token)``: the sparse path reads ``fixed + per_token * n`` rows in-line."""
        return self.call_sparse + self._gather * (rows[0] + rows[1] * n) * row

    @property
    def _gather(self) -> float:
        return self.byte if self.gather is None else self.gather

    def threshold(self, rows: tuple[float, float], row: int, budget: int) -> int:
        """The shortest cache (>= ``budget``) from which sparse is cheaper than dense; caches up to it stay dense.
        ``rows``: the K/V rows the sparse path reads in-line per (sequence, layer), ``(fixed, per cached token)``."""
        fixed, per_token = rows
        slope = self.byte * 2 - self._gather * per_token      # what each cached token saves, per byte of a row
        if slope <= 0:                          # reads at least what dense reads: never pays
            return 1 << 62
        n = (self.call_sparse - self.call_dense + self._gather * fixed * row) / (slope * row)
        return max(budget, int(n))


def _best(fn, repeats: int) -> float:
    """The fastest of ``repeats`` runs (the others met another process on a shared core)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def plausible(m: CostModel) -> bool:
    """A measurement another process did not spoil: 1-2000 GB/s, calls under a few milliseconds."""
    return 5e-13 < m.byte <= m._gather < 1e-9 and m.call_dense < 2e-3 and m.call_sparse < 5e-3


@functools.lru_cache(maxsize=8)
def measure(kv_heads: int, group: int, head_dim: int, dtype: torch.dtype) -> CostModel:
    """Time dense attention at two lengths (-> time per byte and per call) and the sparse path's calls at one
    small size (-> its fixed cost), on one thread: both paths scale alike with threads, and one thread does not
    stall on a core another process holds. Tens of milliseconds; once per shape in a process. A spoiled measurement
    (implausible numbers) is repeated, twice at most."""
    for _ in range(3):
        m = _measure(kv_heads, group, head_dim, dtype)
        if plausible(m):
            break
    return m


def _measure(kv_heads: int, group: int, head_dim: int, dtype: torch.dtype) -> CostModel:
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lo, hi = 1024, 16384
        k = torch.randn(1, kv_heads, hi, head_dim).to(dtype)
        v = torch.randn(1, kv_heads, hi, head_dim).to(dtype)
        q = torch.randn(1, kv_heads, group, head_dim)
        out = torch.empty(1, kv_heads, group, head_dim)
        zero = torch.zeros(1, dtype=torch.int64)

        def dense(n):
            return _best(lambda: kernels.attend(q, k, v, 1.0, out, zero, torch.tensor([n])), 9)
        t_lo, t_hi = dense(lo), dense(hi)
        row = kv_heads * head_dim * k.element_size()
        byte = max(t_hi - t_lo, 1e-9) / (2 * (hi - lo) * row)
        call_dense = max(t_lo - byte * 2 * lo * row, 0.0)
        # the sparse path at two candidate counts, each call on fresh 16-token pages of a buffer larger than the
        # caches (as the rows of a 30-layer store are): its time per scattered byte and its fixed cost
        big = 1 << 16
        kb = torch.ones(1, kv_heads, big, head_dim, dtype=dtype)
        vb = torch.ones(1, kv_heads, big, head_dim, dtype=dtype)
        end = torch.tensor([big])
        gen = torch.Generator().manual_seed(0)

        def sparse(m):
            pages = torch.randperm(big // 16 - 2, generator=gen)[:m // 16].sort().values + 1
            cand = (pages[:, None] * 16 + torch.arange(16)).flatten().expand(1, kv_heads, -1).contiguous()

            def run():
                s = kernels.score(q, kb, 1.0, lo=4, hi=end - 16, idx=cand)
                idx = kernels.topk(s, 256, idx=cand)
                kernels.attend(q, kb, vb, 1.0, out, end - 16, end, torch.tensor([4]), idx, lim_lo=4, lim_hi=end - 16)
            return run

        def cold(m):                            # one timed call per fresh set: a repeat would find them cached
            sparse(m)()
            return min(_timed(sparse(m)) for _ in range(7))
        m_lo, m_hi = 512, 4096
        t_lo, t_hi = cold(m_lo), cold(m_hi)
        gather = max(t_hi - t_lo, 1e-9) / ((m_hi - m_lo) * row)
        call_sparse = max(t_lo - gather * (m_lo + 2 * (256 + 20)) * row, 0.0)
        return CostModel(call_dense, call_sparse, byte, max(gather, byte))
    finally:
        torch.set_num_threads(prev)
