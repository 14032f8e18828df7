"""Decode attention over the KV store (dense, or sparse over selected positions), and the function registered
with transformers' attention interface for the HF-module path and the drop-in.

Sparse decode reads only the selected K/V rows (sinks + the method's tokens + the recent window) in place, with the
query heads packed per KV head (``[B, KVH, group, D]``), so a group shares its rows and K/V are never repeated.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from . import kernels
from .config import SparseConfig
from .kvcache import Batch, KVStore
from .methods import Selection

NAME = "asyncspade"


def decode_attention(q: torch.Tensor, store: KVStore, layer: int, batch: Batch, sel: Selection | None,
                     cfg: SparseConfig, scale: float, out: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """One decode step of one layer: queries ``q [B, H, D]`` (fp32) -> ``out [B, KVH, G, D]``.

    Dense: every cached position (a windowed layer: its last ``window``). Sparse: per row past the budget, the
    sinks, the method's positions and the recent window, read in place from the store by the kernel (no gathered
    copy); rows whose cache fits in the budget attend everything (exactly dense)."""
    b, h, d = q.shape
    kvh = store.kv_heads
    qg = q.view(b, kvh, h // kvh, d)
    k, v = store.k[layer, batch.lo:batch.hi], store.v[layer, batch.lo:batch.hi]
    end = batch.lengths
    if sel is None:
        begin = batch.memo(("window", window), lambda: torch.zeros_like(end) if window is None
                           else (end - window).clamp(min=0))
        return kernels.attend(qg, k, v, scale, out, begin, end)
    sparse, pre, begin, hi = batch.memo(("sparse", cfg), lambda: sparse_bounds(cfg, end))
    return kernels.attend(qg, k, v, scale, out, begin, end, pre, sel.idx, sel.valid, use_idx=sparse,
                          lim_lo=cfg.sink, lim_hi=hi)


def sparse_bounds(cfg: SparseConfig, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per row: whether it attends sparsely, its sinks, where its recent window begins, and the end of the
    positions a selection may take (rows that fit the budget attend everything)."""
    sparse = cfg.sparse_at(lengths)
    return (sparse, torch.where(sparse, cfg.sink, 0), torch.where(sparse, lengths - cfg.recent, 0),
            lengths - cfg.recent)


def asyncspade_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    rt = getattr(module, "asyncspade_rt", None)
    if rt is not None and rt.writes_kv:
        # the engine passes no cache through the modules: this layer's new K/V go into the store here, and
        # attention reads the store (written rows included)
        batch = rt.batch
        rt.store.write(module.layer_idx, batch, key, value)
        key, value = rt.store.keys(module.layer_idx, batch), rt.store.values(module.layer_idx, batch)
    if rt is None or query.shape[2] > 1 or attention_mask is not None:
        out = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                     **kwargs)
        if rt is not None and query.shape[2] > 1:
            rt.observe_prefill(module.layer_idx, query.float())
        return out
    return rt.decode(module.layer_idx, query), None


def register() -> str:
    """Register under one name for both interfaces (without the mask function, masks are silently dropped)."""
    AttentionInterface.register(NAME, asyncspade_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
