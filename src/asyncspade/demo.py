"""``make demo``: what asyncspade is for, in a few minutes on a CPU.

A long real context (a reasoning trace from ../shared/data, several thousand tokens) is prefilled once per method
and the bundled model continues it: dense attention (``full``, every core) vs ``asyncspade`` at budget 1024 with the
asynchronous cache-rank worker and the page prefilter (decode on cores - 1 threads + the worker), side by side:
tokens/s, TPOT ratio, and whether the texts agree.
"""
from __future__ import annotations

import os
import sys
import time

import torch

from .config import SparseConfig
from .data import PROSE, TRACES, trace_texts
from .engine import Engine
from .models import load_model
from .sampling import SamplingParams



def long_context(tok, n_tokens: int) -> tuple[list[int], str]:
    if os.path.exists(TRACES):
        prompt, output = max(trace_texts(TRACES), key=lambda r: len(r[1]))
        ids = tok(prompt + output, add_special_tokens=False)["input_ids"]
        return ids[:n_tokens], "a real DeepSeek-R1-Distill reasoning trace (../shared/data/reasoning_traces.jsonl)"
    if os.path.exists(PROSE):
        with open(PROSE) as f:
            return tok(f.read(60_000), add_special_tokens=False)["input_ids"][:n_tokens], "tinyshakespeare prose"
    g = torch.Generator().manual_seed(0)
    return torch.randint(100, 40_000, (n_tokens,), generator=g).tolist(), "random tokens (no shared data found)"


def main(context: int = 6000, new_tokens: int = 96, budget: int = 1024) -> int:
    def say(msg):
        print(f"[demo] {msg}", file=sys.stderr, flush=True)
    model, tok = load_model(None, torch.float32, progress=say)
    ids, what = long_context(tok, context)
    say(f"context: {len(ids)} tokens of {what}; continuing for {new_tokens} tokens, greedy, fp32")
    runs = {}
    for name, cfg, selector in (
            ("full", SparseConfig(method="full"), "sync"),
            ("asyncspade", SparseConfig(method="asyncspade", budget=budget, prefilter="pages"), "async")):
        # asyncspade: the engine decodes on cores - 1 threads, the cache-rank worker runs on the last core
        eng = Engine(model, tok, cfg, max_batch=1, max_tokens=len(ids) + new_tokens + 8, selector=selector)
        t0 = time.perf_counter()
        seq = eng.add(ids, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
        eng.step()
        say(f"{name}: prefill {time.perf_counter() - t0:.1f} s, decoding...")
        eng.run([seq], on_event=lambda ev: (print(ev.text, end="", flush=True) if ev.text else None))
        print()
        late = getattr(eng.rt.selector, "late_rate", 0.0) if eng.rt.selector is not None else 0.0
        runs[name] = (seq, late)
        eng.close()
    (full, _), (sparse, late) = runs["full"], runs["asyncspade"]
    same = next((i for i, (a, b) in enumerate(zip(full.output_ids, sparse.output_ids)) if a != b), new_tokens)
    print("\n" + "=" * 72)
    print(f"context {len(ids)} tokens, {new_tokens} new tokens, fp32, {os.cpu_count()} cores")
    print(f"{'method':12s} {'TPOT ms':>9s} {'tok/s':>7s}")
    for name, (seq, _) in runs.items():
        print(f"{name:12s} {seq.tpot_s * 1e3:9.1f} {1 / seq.tpot_s:7.1f}")
    print(f"asyncspade / full TPOT: {sparse.tpot_s / full.tpot_s:.2f}  (budget {budget} tokens per layer and KV head; "
          f"selection late on {100 * late:.0f}% of layer-steps)")
    print(f"texts agree on the first {same} of {new_tokens} tokens"
          + (" (identical)" if same == new_tokens else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
