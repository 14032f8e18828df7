"""What one cache-rank job costs: time per layer of asyncspade's two selection passes, on one thread (the
worker's core), for a synthetic filled key cache. Explains the late rates of ``asyncspade bench``: with the
cross-layer forecast (lead 1) the refinement of a layer must finish within one layer of the forward.

    python scripts/selection_cost.py --batch 1,8 --contexts 8192,32768 --superset 2,4 --prefilter pages,sketch

Prints a table (ms per layer and per decode step = x sparse layers) and the bytes each pass reads.
"""
from __future__ import annotations

import argparse
import time

import torch

from asyncspade.config import SparseConfig
from asyncspade.kvcache import KVStore
from asyncspade.predictor import QueryWindows
from asyncspade.selection.passes import KeySummaries, temporal_pass, xlayer_pass
from asyncspade.selection.plan import SelectionPlan

# the bundled model's attention shape
HEADS, KV_HEADS, HEAD_DIM, SPARSE_LAYERS = 9, 3, 64, 28


def timed(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def measure(batch: int, context: int, superset: int, budget: int, reps: int, prefilter: str) -> dict:
    cfg = SparseConfig(method="asyncspade", budget=budget, prefilter=prefilter, superset=superset)
    store = KVStore(1, batch, KV_HEADS, context + 64, HEAD_DIM, torch.bfloat16, cfg.page_size, track_pages=True,
                    track_sketch=True)
    store.k.normal_()
    for s in range(batch):
        store.rebuild(0, s, 0, context)
    plan = SelectionPlan.of(cfg, store.max_tokens)
    windows = QueryWindows(batch, 1, HEADS, cfg.window, HEAD_DIM)
    lengths = torch.full((batch,), context)
    q = torch.randn(batch, HEADS, 1, HEAD_DIM)
    for _ in range(cfg.window):
        windows.push(0, 0, batch, q)
    scale = HEAD_DIM ** -0.5

    def temporal():
        return temporal_pass(plan, windows, 0, store.k[0], 0, batch, lengths, q, scale,
                             KeySummaries.of(store, 0, 0, batch))

    cand, _ = temporal()
    q_x = torch.randn(batch, HEADS, HEAD_DIM)
    t_temporal = timed(temporal, reps)
    t_xlayer = timed(lambda: xlayer_pass(plan, q_x, store.k[0], lengths, scale, cand), reps)
    row = 2 * HEAD_DIM * KV_HEADS * batch                       # bf16 key bytes per position, all rows
    scanned = {"pages": 2 * row / cfg.page_size, "sketch": (HEAD_DIM // 2 + 8) * KV_HEADS * batch, "none": row}
    return {"batch": batch, "context": context, "superset": superset, "prefilter": prefilter,
            "temporal_ms": t_temporal * 1e3, "xlayer_ms": t_xlayer * 1e3,
            "temporal_mb": scanned[prefilter] * context / 1e6, "xlayer_mb": row * cand.shape[-1] / 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", default="1,8", help="batch sizes, comma-separated (default 1,8)")
    p.add_argument("--contexts", default="8192,32768", help="cache lengths, comma-separated (default 8192,32768)")
    p.add_argument("--superset", default="4", help="hybrid superset multiples of k, comma-separated (default 4)")
    p.add_argument("--budget", type=int, default=1024, help="tokens per sparse layer and KV head (default 1024)")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per pass (default 10)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1: the worker's core)")
    p.add_argument("--prefilter", default="pages", help="step-ahead prefilters, comma-separated: pages, sketch, none "
                   "(default pages)")
    args = p.parse_args()
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]          # noqa: E731
    torch.set_num_threads(args.threads)
    print(f"| batch | context | superset | prefilter | step-ahead pass ms/layer (MB read) | cross-layer refinement "
          f"ms/layer (MB) | both, ms per step (x{SPARSE_LAYERS}) |")
    print("|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for b in ints(args.batch):
            for n in ints(args.contexts):
                for sup, pf in ((x, y) for x in ints(args.superset) for y in args.prefilter.split(",")):
                    r = measure(b, n, sup, args.budget, args.reps, pf.strip())
                    print(f"| {b} | {n} | {sup} | {pf} | {r['temporal_ms']:.2f} ({r['temporal_mb']:.1f}) | "
                          f"{r['xlayer_ms']:.2f} ({r['xlayer_mb']:.1f}) | "
                          f"{(r['temporal_ms'] + r['xlayer_ms']) * SPARSE_LAYERS:.0f} |")


if __name__ == "__main__":
    main()
