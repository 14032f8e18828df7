"""Query forecasters: the training-free temporal ridge predictor (AsyncSpade) and the cross-layer forecast.

Temporal: per (slot, layer, query head) a window of the last W post-RoPE queries, oldest first. The AR(p) model
``q_t ~ sum_j a_j q_{t-j}`` has scalar lag coefficients shared across channels, so its normal equations only need
the window's Gram matrix: ``(X^T X)_{ij} = sum_tau <q_{tau-1-i}, q_{tau-1-j}>`` and
``(X^T y)_i = sum_tau <q_{tau-1-i}, q_tau>``. Everything is batched: one Gram bmm and one p x p solve for all
heads of all rows of a layer.
"""
from __future__ import annotations

import numpy as np
import torch

from . import kernels


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE's half rotation, as in the Llama family's modeling code."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class QueryWindows:
    """Sliding windows of recent queries per (slot, layer): ``get`` gives ``[B, heads, W, D]`` (fp32), oldest first.

    Stored as rings, ``buf [slots, layers, heads, W, D]`` with the counts in numpy: a decode step's push, once per
    sparse layer and step, writes one query and shifts nothing (a shifted window cost a few small torch ops a layer);
    the oldest-first order is made only when a forecast reads the window (every ``refresh`` steps)."""

    def __init__(self, slots: int, layers: int, heads: int, window: int, dim: int):
        self.buf = torch.zeros(slots, layers, heads, window, dim)
        self._buf = self.buf.numpy()          # the same memory: a decode push is one numpy copy (~1 vs ~10 us)
        self.count = np.zeros((slots, layers), dtype=np.int64)      # queries pushed since the reset
        self.window = window

    def reset(self, lo: int, hi: int) -> None:
        self.buf[lo:hi].zero_()
        self.count[lo:hi] = 0

    def push(self, li: int, lo: int, hi: int, q: torch.Tensor) -> None:
        """Append queries ``[B, H, L, D]`` (L newest steps) for layer index ``li`` of rows ``[lo, hi)``."""
        n = min(q.shape[2], self.window)
        count = self.count[lo:hi, li]
        if n == 1 and hi - lo == 1 and q.dtype == torch.float32:      # a decode step of one row: one copy
            self._buf[lo, li, :, count[0] % self.window] = q.numpy()[0, :, -1]
        else:
            at = torch.from_numpy((count[:, None] + np.arange(n)) % self.window)         # [B, n] ring slots
            rows = torch.arange(lo, hi)[:, None].expand_as(at)
            self.buf[rows, li, :, at] = q[:, :, -n:].float().permute(0, 2, 1, 3)         # [B, n, H, D]
        count += n

    def get(self, li: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The windows of rows ``[lo, hi)`` oldest first (never-written entries, zeros, before the oldest query) and
        how many queries each holds."""
        count = self.count[lo:hi, li]
        order = torch.from_numpy((count[:, None] + np.arange(self.window)) % self.window)   # [B, W]
        w = self.buf[lo:hi, li]
        w = torch.gather(w, 2, order[:, None, :, None].expand(-1, w.shape[1], -1, w.shape[3]))
        return w, torch.from_numpy(np.minimum(count, self.window))


def _ar_index(window: int, order: int) -> tuple[torch.Tensor, torch.Tensor]:
    taus = torch.arange(order, window)                        # regression targets
    lags = taus[:, None] - 1 - torch.arange(order)[None, :]   # [R, p]: positions of q_{tau-1-i}
    return taus, lags


def forecast(w: torch.Tensor, count: torch.Tensor, kind: str = "ar", order: int = 4, ridge: float = 1e-2) -> torch.Tensor:
    """Next query from windows ``w [B, H, W, D]`` holding ``count[b]`` valid (newest) entries: ``[B, H, D]``."""
    last = w[:, :, -1]
    if kind == "last":
        return last
    if kind == "linear":
        prev = torch.where((count >= 2).view(-1, 1, 1), w[:, :, -2], last)
        return 2 * last - prev
    W = w.shape[2]
    if kind == "ar":
        fast = kernels.ridge_forecast(w, count, order, ridge)    # one call instead of ~20 small torch ops
        if fast is not None:
            return fast
    first_valid = (W - count).view(-1, 1, 1)                   # [B,1,1]
    if kind == "mean":
        valid = (torch.arange(W).view(1, 1, W) >= first_valid).float()   # [B,1,W]
        return (w * valid[..., None]).sum(2) / valid.sum(-1).clamp(min=1)[..., None]
    # AR(p) ridge, closed form
    taus, lags = _ar_index(W, order)
    G = torch.matmul(w, w.transpose(-1, -2))                  # [B, H, W, W]
    row_ok = (taus.view(1, 1, -1) - order >= first_valid).float()          # [B,1,R]: every lag inside the window
    xtx = (G[:, :, lags[:, :, None], lags[:, None, :]] * row_ok[..., None, None]).sum(2)   # [B,H,p,p]
    xty = (G[:, :, lags, taus[:, None].expand_as(lags)] * row_ok[..., None]).sum(2)       # [B,H,p]
    diag = xtx.diagonal(dim1=-2, dim2=-1).mean(-1).clamp(min=1e-12)                         # [B,H]
    eye = torch.eye(order)
    a = torch.linalg.solve(xtx + (ridge * diag)[..., None, None] * eye, xty.unsqueeze(-1)).squeeze(-1)  # [B,H,p]
    recent = w[:, :, W - 1 - torch.arange(order)]             # [B,H,p,D]: q_t, q_{t-1}, ...
    pred = (a.unsqueeze(-1) * recent).sum(2)
    enough = (count > order).view(-1, 1, 1)                   # too short a window: fall back to the last query
    return torch.where(enough, pred, last)


def xlayer_query(layer: torch.nn.Module, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
    """Layer ``layer``'s query for the last position, computed from a residual stream ``hidden [B, L, hidden]``
    that entered an earlier layer: input norm, q projection (q_norm for Qwen3) and RoPE. Returns ``[B, H, D]``."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden[:, -1:])
    q = attn.q_proj(x).view(x.shape[0], 1, -1, attn.head_dim)
    if getattr(attn, "q_norm", None) is not None:
        q = attn.q_norm(q)
    q = q.transpose(1, 2)                                     # [B, H, 1, D]
    cos, sin = position_embeddings
    cos, sin = cos[:, -1:].unsqueeze(1), sin[:, -1:].unsqueeze(1)
    return (q * cos + rotate_half(q) * sin)[:, :, 0]
