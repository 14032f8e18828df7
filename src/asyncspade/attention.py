"""The attention function registered with transformers: dense prefill, dense or gather-sparse decode.

Sparse decode reads only the selected K/V rows (sinks + the method's tokens + the recent window), gathered as
whole rows, and attends with the query heads packed per KV head (``[B, KVH, group, D]``), so a group shares its
gathered rows and K/V are never repeated.
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


def compose(sel: Selection, batch: Batch, cfg: SparseConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attended positions ``[B, KVH, budget]``: sinks | the method's tokens | recent window, and a validity mask.
    Rows whose cache fits in the budget attend to everything (exactly dense)."""
    idx, valid = sel.idx, sel.valid
    b, kvh, k = idx.shape
    if k < cfg.k_mid:                                    # e.g. Quest with k not a multiple of the page size
        pad = cfg.k_mid - k
        idx = F.pad(idx, (0, pad))
        valid = F.pad(valid if valid is not None else torch.ones_like(idx[..., :k], dtype=torch.bool), (0, pad))
    n = batch.lengths.view(b, 1, 1)
    sink = torch.arange(cfg.sink).expand(b, kvh, cfg.sink)
    recent = (n - cfg.recent + torch.arange(cfg.recent)).expand(b, kvh, cfg.recent)
    idx = torch.cat([sink, idx, recent], -1)
    if valid is not None:
        ones = torch.ones(b, kvh, cfg.sink + 0, dtype=torch.bool)
        valid = torch.cat([ones, valid, torch.ones(b, kvh, cfg.recent, dtype=torch.bool)], -1)
    short = batch.lengths <= cfg.budget
    if bool(short.any()):
        dense = torch.arange(cfg.budget).expand(b, kvh, cfg.budget)
        s = short.view(b, 1, 1)
        idx = torch.where(s, dense, idx)
        valid = torch.where(s, dense < n, valid if valid is not None else True)
    return idx, valid


def decode_attention(q: torch.Tensor, store: KVStore, layer: int, batch: Batch, sel: Selection | None,
                     cfg: SparseConfig, scale: float, out: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """One decode step of one layer: queries ``q [B, H, D]`` (fp32) -> ``out [B, KVH, G, D]``.

    Dense: every cached position (a windowed layer: its last ``window``). Sparse: the composed positions, read
    straight from the store by the kernel (no gathered copy)."""
    b, h, d = q.shape
    kvh = store.kv_heads
    qg = q.view(b, kvh, h // kvh, d)
    k, v = store.k[layer, batch.lo:batch.hi], store.v[layer, batch.lo:batch.hi]
    if sel is None:
        end = batch.lengths
        begin = torch.zeros_like(end) if window is None else (end - window).clamp(min=0)
        return kernels.attend(qg, k, v, scale, out, begin=begin, end=end)
    idx, valid = compose(sel, batch, cfg)
    return kernels.attend(qg, k, v, scale, out, idx=idx.contiguous(),
                          valid=None if valid is None else valid.contiguous())


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
