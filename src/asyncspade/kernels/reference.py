"""The torch versions of the decode kernels: the fallback where the C kernels do not apply (a GPU, no compiler) and
the reference the tests hold the C kernels to. Same arguments and results as :mod:`asyncspade.kernels`."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_rows(store: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``store[b, h, idx[b, h, j]]`` as ``[B, KVH, k, D]`` with one index_select over whole rows.

    ``store`` is a ``[B, KVH, T, D]`` view with a contiguous last two dims (a slot range of the KV store). A
    per-element ``torch.gather`` with an index expanded to ``[k, D]`` is several times slower.
    """
    b, kvh, t, d = store.shape
    sb, sh, st, sd = store.stride()
    assert sd == 1 and st == d, "gather_rows needs rows of contiguous head_dim"
    base = (torch.arange(b, device=idx.device).view(b, 1, 1) * (sb // st)
            + torch.arange(kvh, device=idx.device).view(1, kvh, 1) * (sh // st))
    flat = (idx + base).reshape(-1)
    rows = (store.untyped_storage().nbytes() // store.element_size() - store.storage_offset()) // d
    src = store.as_strided((rows, d), (d, 1), store.storage_offset())
    return src.index_select(0, flat).view(b, kvh, idx.shape[-1], d)


def attend(q, k, v, scale, begin, end, pre=None, idx=None, valid=None, use_idx=None, lim_lo=0,
           lim_hi=None) -> torch.Tensor:
    """``[B, KVH, G, D]`` fp32 attention outputs (see :func:`asyncspade.kernels.attend`): each row's positions
    ``[0, pre) | idx (valid) | [begin, end)`` laid out in one padded list, gathered, and attended with a mask."""
    b, kvh, g, d = q.shape
    dev = q.device
    begin, end = begin.to(dev), end.to(dev)
    pre = torch.zeros_like(begin) if pre is None else pre.to(dev)
    n_idx = idx.shape[-1] if idx is not None else 0
    use = torch.zeros(b, dtype=torch.bool, device=dev) if idx is None else (
        torch.ones(b, dtype=torch.bool, device=dev) if use_idx is None else use_idx.to(dev))
    n_sel = torch.where(use, n_idx, 0)
    total = pre + n_sel + (end - begin)
    width = max(int(total.max()), 1)
    j = torch.arange(width, device=dev)[None, :]                                     # [1, W]
    in_idx = (j >= pre[:, None]) & (j < (pre + n_sel)[:, None])                       # [B, W]
    ranged = begin[:, None] + j - (pre + n_sel)[:, None]
    pos = torch.where(j < pre[:, None], j, ranged)[:, None, :].expand(b, kvh, width)  # [B, KVH, W]
    ok = (j < total[:, None])[:, None, :].expand(b, kvh, width)
    if idx is not None:
        slot = (j - pre[:, None]).clamp(0, max(n_idx - 1, 0))[:, None, :].expand(b, kvh, width)
        picked = idx.to(dev).gather(-1, slot)
        pos = torch.where(in_idx[:, None, :], picked, pos)
        keep = picked >= lim_lo
        if lim_hi is not None:
            keep &= picked < lim_hi.to(dev)[:, None, None]
        if valid is not None:
            keep &= valid.to(dev).gather(-1, slot)
        ok = ok & torch.where(in_idx[:, None, :], keep, True)
    pos = pos.clamp(0, k.shape[2] - 1)
    kk, vv = gather_rows(k, pos).float(), gather_rows(v, pos).float()
    s = torch.matmul(q.float(), kk.transpose(-1, -2)) * scale                         # [B, KVH, G, W]
    s = s.masked_fill(~ok[:, :, None, :], float("-inf"))
    p = torch.nan_to_num(s.softmax(-1), nan=0.0)                                      # nothing to attend: zeros
    return torch.matmul(p, vv)


def score(q, k, scale, lo=0, hi=None, n=None, idx=None, valid=None, aggregate="sum", kmax=None,
          gathered=False) -> torch.Tensor:
    b, kvh, g, d = q.shape
    if idx is not None:
        cand = k[:, :, :idx.shape[-1]] if gathered else gather_rows(k, idx.clamp(0, k.shape[2] - 1))
        cmax = gather_rows(kmax, idx.clamp(0, k.shape[2] - 1)) if kmax is not None else None
        ok = valid if valid is not None else torch.ones(idx.shape, dtype=torch.bool, device=idx.device)
        if hi is not None:
            ok = ok & (idx >= lo) & (idx < hi.to(idx.device)[:, None, None])
    else:
        cand = k[:, :, lo:lo + n]
        cmax = kmax[:, :, lo:lo + n] if kmax is not None else None
        ok = (torch.arange(lo, lo + n, device=q.device) < hi.to(q.device)[:, None])[:, None, :].expand(b, kvh, n)
    if cmax is None:
        s = torch.matmul(q.to(cand.dtype), cand.transpose(-1, -2)).float() * scale          # [B, KVH, G, n]
    else:                    # Quest's bound: q+ . max + q- . min, term by term the max of q.min and q.max
        qf = q.float()
        s = (torch.matmul(qf.clamp(min=0), cmax.float().transpose(-1, -2))
             + torch.matmul(qf.clamp(max=0), cand.float().transpose(-1, -2))) * scale
    s = s.masked_fill(~ok[:, :, None, :], float("-inf"))
    p = torch.nan_to_num(s.softmax(-1), nan=0.0)
    agg = p.sum(2) if aggregate == "sum" else p.amax(2)
    return agg.masked_fill(~ok, -1.0)


def topk(scores, k, idx=None, lo=0, expand=1, hi=None, gap=0, limit=0) -> torch.Tensor:
    b, kvh, n = scores.shape
    kk = min(k, n)
    # stable descending sort: ties keep the lower candidate index first, as the C kernel does
    pick = scores.sort(dim=-1, descending=True, stable=True).indices[..., :kk]
    pos = idx.gather(-1, pick) if idx is not None else pick + lo
    pos = pos.sort(-1).values
    if kk < k:
        pos = torch.cat([pos, pos[..., -1:].expand(b, kvh, k - kk)], -1)
    pos = (pos[..., None] * expand + torch.arange(expand)).flatten(-2)
    if hi is None:
        return pos
    pos = torch.where(pos < hi.view(-1, 1, 1), pos, -1)
    reserved = (hi.view(-1, 1, 1) + torch.arange(gap)).clamp(max=limit - 1).expand(b, kvh, gap)
    return torch.cat([pos, reserved], -1)


def linear_i8(x, w, scale) -> torch.Tensor:
    return (x.float() @ w.float().t()) * scale.float()


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def qkv_post(qkv, bias, q_norm, k_norm, eps, cos, sin, slot, pos, k_store, v_store, heads, kv_heads, q_out) -> None:
    n = qkv.shape[0]
    d = q_out.shape[-1]
    x = qkv.float()
    if bias is not None:
        x = x + bias
    x = x.view(n, heads + 2 * kv_heads, d)
    q, k, v = x[:, :heads], x[:, heads:heads + kv_heads], x[:, heads + kv_heads:]
    if q_norm is not None:
        q = _rms(q, q_norm, eps)
    if k_norm is not None:
        k = _rms(k, k_norm, eps)
    c, s = cos[pos][:, None, :], sin[pos][:, None, :]           # [N, 1, D/2]

    def rope(t):
        a, b = t[..., :d // 2], t[..., d // 2:]
        return torch.cat([a * c - b * s, b * c + a * s], -1)
    q_out.copy_(rope(q))
    if kv_heads:
        k_store[slot, :, pos] = rope(k).to(k_store.dtype)
        v_store[slot, :, pos] = v.to(v_store.dtype)


def add_rmsnorm(h, delta, weight, eps, out) -> torch.Tensor:
    if delta is not None:
        h.add_(delta.float())
    return out.copy_(_rms(h, weight, eps))


def silu_mul(gu, out) -> torch.Tensor:
    g, u = gu.float().chunk(2, -1)
    return out.copy_(F.silu(g) * u)


def page_append(k, pmin, pmax, start, page_size) -> None:
    rows = torch.arange(k.shape[0], device=k.device)
    start = start.to(k.device)
    new = k[rows, :, start]                                            # [B, KVH, D]
    page = start // page_size
    first = (start % page_size == 0).view(-1, 1, 1)
    pmin[rows, :, page] = torch.where(first, new, torch.minimum(pmin[rows, :, page], new))
    pmax[rows, :, page] = torch.where(first, new, torch.maximum(pmax[rows, :, page], new))


def drop_seen(cand, extra, limit) -> torch.Tensor:
    b, kvh, _ = cand.shape
    seen = torch.zeros(b, kvh, limit + 1, dtype=torch.bool, device=cand.device)
    seen.scatter_(-1, (cand + 1).clamp(0, limit), True)               # -1 (none) marks column 0
    return extra.copy_(torch.where(seen.gather(-1, (extra + 1).clamp(0, limit)), -1, extra))


def sketch_write(k, ks, kq, start, count) -> None:
    b, kvh, t, d = k.shape
    blocks = ks.view(b, kvh, ks.shape[2], d // 8, 16, 4)                 # [.., block, vector, token, channel]
    for r in range(b):
        p = torch.arange(int(start[r]), int(start[r]) + count, device=k.device)
        x = k[r, :, p].float()                                            # [KVH, n, D]
        mn, mx = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        inv = torch.where(mx > mn, 15.0 / (mx - mn), torch.zeros_like(mx))
        u = torch.round((x - mn) * inv).clamp(0, 15).to(torch.uint8)
        byte = (u[..., :d // 2] | (u[..., d // 2:] << 4)).view(kvh, count, d // 8, 4)
        blocks[r][:, p // 16, :, p % 16] = byte.transpose(0, 1)                 # advanced dims first: [n, KVH, ...]
        kq[r, :, 0, p] = ((mx - mn) / 15.0)[..., 0]
        kq[r, :, 1, p] = mn[..., 0]


def sketch_keys(ks, kq, n) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sketch of positions ``[0, n)``: nibbles ``u [B, KVH, n, D]`` (fp64), scale and min ``[B, KVH, n]``."""
    b, kvh, blocks, w = ks.shape
    d = w // 8
    x = ks.view(b, kvh, blocks, d // 8, 16, 4).transpose(3, 4).reshape(b, kvh, blocks * 16, d // 2)[:, :, :n]
    u = torch.cat([x & 15, x >> 4], -1).double()
    return u, kq[:, :, 0, :n].double(), kq[:, :, 1, :n].double()


def sketch_score(q, ks, kq, scale, lo, hi, n, aggregate="sum") -> torch.Tensor:
    """As the C kernel: q quantized to int8 per query head (round half to even), exact integer dots with the
    nibbles, then ``scale_p * q_scale * dot + min_p * sum(q)``; softmax and aggregation as :func:`score`."""
    b, kvh, g, d = q.shape
    u, sc, mn = sketch_keys(ks, kq, n)
    qf = q.float()
    amax = qf.abs().amax(-1, keepdim=True)
    qi = torch.round(qf * torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))).double()
    dots = torch.matmul(qi, u.transpose(-1, -2))                                   # [B, KVH, G, n]
    s = (sc[:, :, None] * (amax.double() / 127.0) * dots + mn[:, :, None] * qf.double().sum(-1, keepdim=True))
    s = s.float() * scale
    pos = torch.arange(n, device=q.device)
    ok = ((pos >= lo) & (pos < hi.to(q.device)[:, None]))[:, None, :].expand(b, kvh, n)
    s = s.masked_fill(~ok[:, :, None, :], float("-inf"))
    if aggregate == "logit":
        top = s.amax(-1, keepdim=True).clamp(min=-torch.finfo(torch.float32).max)
        return (s - top).amax(2).masked_fill(~ok, -torch.finfo(torch.float32).max)
    p = torch.nan_to_num(s.softmax(-1), nan=0.0)
    agg = p.sum(2) if aggregate == "sum" else p.amax(2)
    return agg.masked_fill(~ok, -1.0)


def _int4_q(w4) -> torch.Tensor:
    """The integers ``[N, K/32, 32]`` of :func:`asyncspade.kernels.linear_i4`'s packed layout (group g's byte j: column
    32g + j in its low nibble, 32g + 16 + j in its high one)."""
    n, half = w4.shape
    return torch.stack([w4 & 15, w4 >> 4], 1).view(n, 2, half // 16, 16).transpose(1, 2).reshape(n, half // 16, 32)


def int4_weight(w4, sm) -> torch.Tensor:
    """The fp32 ``[N, K]`` weight of :func:`asyncspade.kernels.linear_i4`'s layout."""
    sm = sm.float()
    return (_int4_q(w4).float() * sm[..., :1] + sm[..., 1:]).view(w4.shape[0], -1)


def dequant_i4(w4, sm) -> torch.Tensor:
    return int4_weight(w4, sm).to(torch.bfloat16)


Q16 = 32639.0      # the int4 kernel's activation scale: x / (max|x| / Q16) fits two int8 planes


def linear_i4(x, w4, sm) -> torch.Tensor:
    """As the C kernel: x quantized to 16 bits per group of 32 (round half to even), exact integer dot products per
    group, then ``sum_g scale_g * xscale_g * dot_g + min_g * sum_g(x)``."""
    n, half = w4.shape
    xg = x.float().view(x.shape[0], half // 16, 32)
    amax = xg.abs().amax(-1)
    inv = torch.where(amax > 0, Q16 / amax, torch.zeros_like(amax))
    xq = torch.round(xg * inv[..., None])
    dots = torch.einsum("mgi,ngi->mng", xq.double(), _int4_q(w4).double())
    smf = sm.double()
    y = (dots * smf[None, :, :, 0] * (amax / Q16).double()[:, None, :]).sum(-1)
    return (y + (xg.double().sum(-1)[:, None, :] * smf[None, :, :, 1]).sum(-1)).float()


def gather_candidates(k, cand, held, lengths, out) -> tuple[int, int]:
    stale = (held != cand) & (cand >= 0)
    rows = stale.sum().item()
    if rows:
        b, h, j = stale.nonzero(as_tuple=True)
        out[b, h, j] = k[b, h, cand[b, h, j].to(k.device)]
    written = cand < lengths.view(-1, 1, 1).to(cand.device)
    held.copy_(torch.where(stale & ~written, -3, cand))
    return rows, int((stale & ~written).sum())
