"""The keys of the in-line refinement's candidates, gathered into one contiguous buffer per (slot, sparse layer).

A candidate list changes once per ``refresh`` steps, and the refinement scores its keys at every step. Read in place,
those keys are scattered over the cache in 16-token pages, which come from memory at a fraction of the streaming
rate (AMD EPYC: 6 vs 34 GB/s on one thread). Gathered once per list, every later step streams them. A key never
changes once written, and every position of a list is written by the time the list exists (its reserved gap lies
inside the recent window: ``refresh <= recent``), so a buffer holds until its list changes; an entry not yet written
is not held, and its row is gathered again at the next step.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import kernels
from ..kvcache import Batch, KVStore


class CandidateKeys:
    def __init__(self, store: KVStore, sparse_layers: list[int], width: int):
        self.store = store
        self.li = {layer: i for i, layer in enumerate(sparse_layers)}
        n, s, kvh, d = len(sparse_layers), store.slots, store.kv_heads, store.head_dim
        self.keys = torch.zeros(n, s, kvh, width, d, dtype=store.dtype, device=store.device)
        self.held = torch.full((n, s, kvh, width), -2, dtype=torch.int64)   # the positions each buffer holds
        # per (layer, slot): the generation of the candidate list the buffer holds whole (-1: none known), so a
        # list seen again costs no comparison of its entries (a step reads ``held`` and the list: 192 KB a layer)
        self.complete = np.full((n, s), -1, dtype=np.int64)
        self.gathers = 0         # key rows gathered (tests, diagnostics)

    def reset(self, lo: int, hi: int) -> None:
        """Slots ``[lo, hi)`` take a new sequence: what their buffers hold are the previous one's keys."""
        self.held[:, lo:hi] = -2
        self.complete[:, lo:hi] = -1

    def get(self, layer: int, batch: Batch, cand: torch.Tensor, generation: np.ndarray | None = None,
            extra: torch.Tensor | None = None) -> torch.Tensor | None:
        """The keys of candidates ``cand [B, KVH, width]`` (positions; -1 for none) of the batch's rows, as
        ``[B, KVH, width, D]``: row j of a head is the key at ``cand[..., j]`` (or anything, where it is -1).
        None for a list of another width (a worker's fault path selects in-process, its own way).

        ``generation [B]`` (optional, >= 0): a number per row that the selector changes whenever it makes the row a
        new list; a row whose list of this generation is already held whole is not compared again.
        ``extra [B, KVH, m]``: more positions (the in-line check's, new at every step), whose keys follow the list's
        in the buffer's last m rows; the list's own rows keep their shortcut."""
        w, m = cand.shape[-1], 0 if extra is None else extra.shape[-1]
        if w + m != self.held.shape[-1]:
            return None
        li = self.li[layer]
        keys = self.keys[li, batch.lo:batch.hi]
        held = self.held[li, batch.lo:batch.hi]
        k = self.store.k[layer, batch.lo:batch.hi]
        if extra is not None:
            self.gathers += kernels.gather_candidates(k, extra, held[..., w:], batch.lengths, keys[..., w:, :])[0]
        done = self.complete[li, batch.lo:batch.hi]
        known = generation is not None and bool((generation >= 0).all())
        if known and np.array_equal(done, generation):
            return keys
        copied, pending = kernels.gather_candidates(k, cand, held[..., :w], batch.lengths, keys[..., :w, :])
        self.gathers += copied
        done[:] = generation if known and not pending else -1
        return keys
