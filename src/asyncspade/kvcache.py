"""Preallocated per-layer K/V storage written in place, plus Quest page min/max.

Layout: one tensor per kind, ``[layers, slots, kv_heads, max_tokens, head_dim]``. A slot holds one sequence;
the engine runs every forward over a contiguous slot range ``[lo, hi)`` so that every per-layer read is a view.
The same storage can be moved to shared memory for the cache-rank worker.
"""
from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass

import torch

from . import kernels


@dataclass
class Batch:
    """What the current forward touches: slots ``[lo, hi)``; row b writes ``q_len`` tokens at ``start[b]``."""
    lo: int
    hi: int
    start: torch.Tensor      # int64 [B]: cache length of each row before this forward
    q_len: int

    def __post_init__(self):
        self.lengths = self.start + self.q_len          # cache length of each row after this forward
        self.max_len = int(self.lengths.max())
        self.min_len = int(self.lengths.min())
        self.rows = torch.arange(self.hi - self.lo)
        self._memo: dict = {}

    def memo(self, key, make):
        """``make()``, computed once per forward: what every layer derives alike from the lengths (index bounds)."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    @property
    def size(self) -> int:
        return self.hi - self.lo


HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14


def _huge_pages(t: torch.Tensor) -> None:
    """Ask Linux to back the (not yet touched) memory of ``t`` with 2 MiB pages where it only does so on request
    (transparent huge pages in ``madvise`` mode, the common default). A sparse step reads K/V rows at random
    positions over a multi-GB store: on 4 KiB pages nearly every row also misses the TLB. Memory already touched
    keeps its pages, so this serves fresh mappings (allocations above glibc's mmap threshold, 32 MiB at most, as
    every real store is). No-op elsewhere."""
    if sys.platform != "linux" or not t.is_cpu or t.numel() * t.element_size() < 4 * HUGE_PAGE:
        return
    start = -(-t.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    end = (t.data_ptr() + t.numel() * t.element_size()) // HUGE_PAGE * HUGE_PAGE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_HUGEPAGE)   # a refusal changes nothing


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, shared: bool, device=None) -> torch.Tensor:
    """Zeros, not empty: unused rows are gathered under a -inf mask, and 0 * NaN garbage would still be NaN.
    ``shared`` allocates in shared memory from the start (zero pages from the kernel): moving a filled
    multi-GB store there later would copy it and transiently double its memory."""
    if not shared:
        t = torch.empty(shape, dtype=dtype, device=device)
        _huge_pages(t)                  # before the first touch: the pages are chosen when zero_() faults them in
        return t.zero_()
    n = 1
    for d in shape:
        n *= d
    storage = torch.UntypedStorage._new_shared(n * torch.empty(0, dtype=dtype).element_size())
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


class KVStore:
    def __init__(self, num_layers: int, slots: int, kv_heads: int, max_tokens: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, page_size: int = 16, track_pages: bool = False,
                 shared: bool = False, device: torch.device | str = "cpu", track_sketch: bool = False):
        """``shared``: in shared memory (a cache-rank worker process reads it; CPU only). The K/V tensors and what
        is derived from the keys live on ``device``; the per-slot lengths stay on the CPU (the engine's bookkeeping).
        Derived from the keys, kept up to date on every write: ``track_pages``, Quest's page min/max (``pmin``,
        ``pmax``); ``track_sketch``, a 4-bit copy of the keys (``ks`` nibbles in blocks of 16 tokens, ``kq`` per
        token scale and min; :func:`asyncspade.kernels.sketch_write`), a quarter of a bf16 key's bytes to scan."""
        device = torch.device(device)
        if shared and device.type != "cpu":
            raise ValueError("a KV store shared with a worker process must be on the CPU")
        self.device = device
        self.num_layers, self.slots, self.kv_heads = num_layers, slots, kv_heads
        self.max_tokens, self.head_dim, self.dtype = max_tokens, head_dim, dtype
        shape = (num_layers, slots, kv_heads, max_tokens, head_dim)
        self.k = _zeros(shape, dtype, shared, device)
        self.v = _zeros(shape, dtype, shared, device)
        self.page_size = page_size
        self.track_pages = track_pages
        if track_pages:
            pages = (max_tokens + page_size - 1) // page_size
            pshape = (num_layers, slots, kv_heads, pages, head_dim)
            self.pmin = _zeros(pshape, dtype, shared, device)
            self.pmax = _zeros(pshape, dtype, shared, device)
        self.track_sketch = track_sketch
        if track_sketch:
            assert head_dim % 8 == 0 and head_dim <= 512, "the key sketch packs 8 channels per 4 bytes, up to 512"
            blocks = (max_tokens + 15) // 16
            self.ks = _zeros((num_layers, slots, kv_heads, blocks, 8 * head_dim), torch.uint8, shared, device)
            self.kq = _zeros((num_layers, slots, kv_heads, 2, max_tokens), torch.float32, shared, device)
        self.lengths = _zeros((slots,), torch.int64, shared)     # committed tokens per slot

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.kv_heads * self.head_dim * self.k.element_size()

    def share_memory_(self) -> "KVStore":
        for t in self.tensors():
            if not t.is_shared():
                t.share_memory_()
        return self

    def tensors(self) -> list[torch.Tensor]:
        ts = [self.k, self.v, self.lengths]
        if self.track_pages:
            ts += [self.pmin, self.pmax]
        if self.track_sketch:
            ts += [self.ks, self.kq]
        return ts

    def write(self, layer: int, batch: Batch, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the new keys/values ``[B, kv_heads, q_len, D]`` of ``batch`` at their positions."""
        K, V = self.k[layer, batch.lo:batch.hi], self.v[layer, batch.lo:batch.hi]
        if batch.q_len == 1:
            if batch.size == 1:                     # plain slice copies: cheaper than an indexed write
                p = int(batch.start[0])
                K[0, :, p] = k[0, :, 0]
                V[0, :, p] = v[0, :, 0]
            else:
                K[batch.rows, :, batch.start] = k[:, :, 0]
                V[batch.rows, :, batch.start] = v[:, :, 0]
        else:
            assert batch.size == 1, "multi-token writes (prefill) go one sequence at a time"
            o = int(batch.start[0])
            K[0, :, o:o + batch.q_len] = k[0]
            V[0, :, o:o + batch.q_len] = v[0]
        self.after_write(layer, batch)

    def after_write(self, layer: int, batch: Batch, pages: bool = True) -> None:
        """Bring what is derived from the keys (page min/max, sketch) up to date with the rows ``batch`` just wrote.
        Every writer calls it: :meth:`write`, and the lean forward, whose kernel writes rows in place (its decode C
        path, :meth:`~asyncspade.kernels.LayerGlue.pre`, folds the keys into their pages in the same call instead:
        ``pages=False``)."""
        lo, hi = batch.lo, batch.hi
        if self.track_sketch:
            kernels.sketch_write(self.k[layer, lo:hi], self.ks[layer, lo:hi], self.kq[layer, lo:hi], batch.start,
                                 batch.q_len)
        if not (self.track_pages and pages):
            return
        if batch.q_len == 1:
            kernels.page_append(self.k[layer, lo:hi], self.pmin[layer, lo:hi], self.pmax[layer, lo:hi], batch.start,
                                self.page_size)
        else:
            o = int(batch.start[0])
            self.rebuild_pages(layer, batch.lo, o, o + batch.q_len)

    def rebuild(self, layer: int, slot: int, begin: int, end: int) -> None:
        """Recompute everything derived from the keys of tokens ``[begin, end)`` of ``slot`` (after a bulk copy)."""
        if self.track_pages:
            self.rebuild_pages(layer, slot, begin, end)
        if self.track_sketch:
            s = slice(slot, slot + 1)
            kernels.sketch_write(self.k[layer, s], self.ks[layer, s], self.kq[layer, s], torch.tensor([begin]),
                                 end - begin)

    def rebuild_pages(self, layer: int, slot: int, begin: int, end: int) -> None:
        """Recompute the min/max of every page touched by tokens ``[begin, end)`` from the stored keys."""
        ps = self.page_size
        p0, p1 = begin // ps, (end - 1) // ps + 1
        keys = self.k[layer, slot, :, p0 * ps:end]                         # [kvh, n, D]
        pad = p1 * ps - end
        lo_pad = torch.nn.functional.pad(keys, (0, 0, 0, pad), value=float("inf"))
        hi_pad = torch.nn.functional.pad(keys, (0, 0, 0, pad), value=float("-inf"))
        shape = (self.kv_heads, p1 - p0, ps, self.head_dim)
        self.pmin[layer, slot, :, p0:p1] = lo_pad.view(shape).amin(2)
        self.pmax[layer, slot, :, p0:p1] = hi_pad.view(shape).amax(2)

    def pages(self, layer: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Page (min, max) of slots ``[lo, hi)``, ``[B, kv_heads, pages, D]`` each, if tracked."""
        return (self.pmin[layer, lo:hi], self.pmax[layer, lo:hi]) if self.track_pages else None

    def sketch(self, layer: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The key sketch of slots ``[lo, hi)``: (nibbles ``[B, kv_heads, blocks, 8 D]``, scale and min ``[B,
        kv_heads, 2, T]``), if tracked."""
        return (self.ks[layer, lo:hi], self.kq[layer, lo:hi]) if self.track_sketch else None

    def keys(self, layer: int, batch: Batch, upto: int | None = None) -> torch.Tensor:
        """View ``[B, kv_heads, upto, D]`` of the batch's keys (default: up to the longest row)."""
        return self.k[layer, batch.lo:batch.hi, :, :batch.max_len if upto is None else upto]

    def values(self, layer: int, batch: Batch, upto: int | None = None) -> torch.Tensor:
        return self.v[layer, batch.lo:batch.hi, :, :batch.max_len if upto is None else upto]
