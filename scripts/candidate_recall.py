"""Offline: how much of the oracle's attention the refinement keeps when its candidates come from a forecast query
ranked through Quest pages, through a 4-bit key sketch, or exactly. One causal pass of the bundled model over a
reasoning trace records every layer's post-RoPE queries and keys (a teacher-forced decode sees exactly these);
each decode step from ``--prefill`` on is then replayed per layer: candidates refreshed every ``--refresh`` steps
from the ridge forecast, the true query picks the top-k among them, and the attention mass it misses is compared
with the oracle's.

    python scripts/candidate_recall.py --prefill 4500 --layers 2,8,14,20,26

Prints, per way of proposing candidates, the attention recall, the missed mass as a multiple of the oracle's,
and the overlap with the oracle's top-k.
"""
from __future__ import annotations

import argparse
import math

import torch
from transformers.models.llama import modeling_llama

from asyncspade.data import data_file
from asyncspade.evals.fidelity import read_windows
from asyncspade.models import load_model
from asyncspade.predictor import forecast

SINK, RECENT, PAGE = 4, 16, 16


def record(trace: int, prefill: int):
    """Post-RoPE ``q [layers, H, T, D]`` and ``k [layers, KVH, T, D]`` of the ``trace``-th trace longer than
    ``prefill`` tokens."""
    model, tok = load_model(None, dtype=torch.float32)
    w = read_windows(data_file("reasoning_traces.jsonl"), tok, model.config.max_position_embeddings,
                     limit=trace + 1, prefill=prefill)[trace]
    rec, orig = [], modeling_llama.apply_rotary_pos_emb

    def keep(q, k, *a, **kw):
        q, k = orig(q, k, *a, **kw)
        rec.append((q[0].clone(), k[0].clone()))
        return q, k
    modeling_llama.apply_rotary_pos_emb = keep
    try:
        with torch.inference_mode():
            model(torch.tensor([w.ids]))
    finally:
        modeling_llama.apply_rotary_pos_emb = orig
    return torch.stack([r[0] for r in rec]), torch.stack([r[1] for r in rec])


def probs(q, keys, kvh):
    """Per-head softmax ``[H, n]`` and its sum over each KV head's group ``[KVH, n]``."""
    h = q.shape[0]
    s = torch.einsum("kgd,knd->kgn", q.reshape(kvh, h // kvh, -1), keys) / math.sqrt(keys.shape[-1])
    p = s.softmax(-1)
    return p.reshape(h, -1), p.sum(1)


def sketched(keys):
    """The keys as the store's 4-bit sketch holds them: per token, 16 levels between its min and max."""
    mn, mx = keys.amin(-1, keepdim=True), keys.amax(-1, keepdim=True)
    step = (mx - mn).clamp(min=1e-12) / 15
    return torch.round((keys - mn) / step) * step + mn


def proposal(how, q_hat, keys, hi, n, kvh):
    """Mask ``[KVH, T]`` of the ``n`` candidates of ``[SINK, hi)`` (and every position from ``hi`` on)."""
    t = keys.shape[1]
    m = torch.zeros(kvh, t, dtype=torch.bool)
    if how == "pages":
        np_ = hi // PAGE * PAGE
        kp = keys[:, :np_].reshape(kvh, -1, PAGE, keys.shape[-1])
        qg = q_hat.reshape(kvh, -1, keys.shape[-1])
        bound = (torch.einsum("kgd,kpd->kgp", qg.clamp(min=0), kp.amax(2))
                 + torch.einsum("kgd,kpd->kgp", qg.clamp(max=0), kp.amin(2)))
        score = (bound / math.sqrt(keys.shape[-1])).softmax(-1).sum(1)
        score[:, :SINK // PAGE] = -1
        top = score.topk(min(n // PAGE, score.shape[1]), -1).indices
        for h in range(kvh):
            for pg in top[h].tolist():
                m[h, pg * PAGE:(pg + 1) * PAGE] = True
    else:
        src = sketched(keys[:, :hi]) if how == "sketch" else keys[:, :hi]
        _, p = probs(q_hat, src, kvh)
        p[:, :SINK] = -1
        m.scatter_(1, p.topk(min(n, hi - SINK), -1).indices, True)
    m[:, hi:] = True
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefill", type=int, default=4500, help="decode steps start here (default 4500)")
    ap.add_argument("--trace", type=int, default=0, help="which trace longer than --prefill (default 0)")
    ap.add_argument("--layers", default="2,8,14,20,26", help="layers replayed (default 2,8,14,20,26)")
    ap.add_argument("--budget", type=int, default=1024, help="tokens attended per KV head (default 1024)")
    ap.add_argument("--candidates", type=int, default=4016, help="candidates per KV head (default 4016)")
    ap.add_argument("--refresh", type=int, default=4, help="steps between candidate lists (default 4)")
    ap.add_argument("--ways", default="pages,sketch,exact", help="ways to propose (default pages,sketch,exact)")
    ap.add_argument("--query", default="forecast", choices=["forecast", "next"],
                    help="what proposes: the ridge forecast, or the next step's true query (a perfect forecast; "
                    "default forecast)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    Q, K = record(args.trace, args.prefill)
    Q, K = Q.float(), K.float()
    kvh, T = K.shape[1], K.shape[2]
    k_mid = args.budget - SINK - RECENT
    ways = args.ways.split(",")
    got = {w: [0.0, 0.0, 0] for w in ways}
    oracle = [0.0, 0]
    for li in (int(x) for x in args.layers.split(",")):
        cand = {}
        for t in range(args.prefill, T):
            n, hi = t + 1, t + 1 - RECENT
            ph, pa = probs(Q[li, :, t], K[li, :, :n], kvh)

            def recall(sel):
                keep = sel.clone()
                keep[:, :SINK] = True
                keep[:, hi:n] = True
                return (ph * keep.repeat_interleave(ph.shape[0] // kvh, 0)).sum(-1).mean().item()

            def top(mask):
                a = torch.where(mask[:, :n], pa, torch.tensor(-1.0))
                a[:, :SINK] = -1
                a[:, hi:] = -1
                return torch.zeros(kvh, n, dtype=torch.bool).scatter_(1, a.topk(k_mid, -1).indices, True)
            best = top(torch.ones(kvh, n, dtype=torch.bool))
            oracle[0] += recall(best)
            oracle[1] += 1
            for w in ways:
                if w in cand:
                    sel = top(cand[w])
                    got[w][0] += recall(sel)
                    got[w][1] += (sel & best).sum().item() / (kvh * k_mid)
                    got[w][2] += 1
                if (t + li) % args.refresh == 0 or w not in cand:    # a refresh after this step's attention
                    win = Q[li, :, max(0, t - 15):t + 1].unsqueeze(0)
                    q_hat = (forecast(win, torch.tensor([win.shape[2]]))[0] if args.query == "forecast"
                             else Q[li, :, min(t + 1, T - 1)])
                    cand[w] = proposal(w, q_hat, K[li], n + 1 - RECENT, args.candidates, kvh)
        print(f"layer {li} done", flush=True)
    miss0 = 1 - oracle[0] / oracle[1]
    print(f"| candidates | attention recall | missed mass vs the oracle's | overlap with the oracle's top-k |")
    print("|---|---|---|---|")
    print(f"| oracle (every position) | {oracle[0] / oracle[1]:.5f} | 1.00x | 1.0000 |")
    for w, (r, o, c) in got.items():
        print(f"| {w} ({args.candidates}) | {r / c:.5f} | {(1 - r / c) / miss0:.2f}x | {o / c:.4f} |")


if __name__ == "__main__":
    main()
