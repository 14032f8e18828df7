"""``asyncspade demo`` (``make demo``): what asyncspade is for, in a few minutes on a CPU.

A long real text ships with the package (the Constitution of the United States, public domain; see
``assets/README.md``), so the demo needs nothing beside it. Its first ``--context`` tokens are prefilled once per
method and the model continues the text greedily: dense attention (``full``) against ``asyncspade`` with the default
sparse settings (``SparseConfig()``) and the asynchronous cache-rank worker when /dev/shm allows. The summary says
whether asyncspade was faster and by how much, and whether the two continuations agree.
"""
from __future__ import annotations

import os
import time
from importlib import resources

from ..config import SparseConfig
from ..sampling import SamplingParams
from .args import UserError, add_model_args, engine_options, load, say

TEXT = "us_constitution.txt"
TEXT_NAME = "the Constitution of the United States (public domain, bundled with asyncspade)"
SAME_SPEED = 0.02                     # TPOT ratios within 2% of 1 are reported as the same speed


def bundled_text() -> str:
    return (resources.files("asyncspade") / "assets" / TEXT).read_text(encoding="utf-8")


def add_arguments(p) -> None:
    add_model_args(p)
    g = p.add_argument_group("demo")
    g.add_argument("--context", type=int, default=6000, help="tokens of the text prefilled before decoding (default "
                   "6000: a long context, within the bundled model's 8192 positions)")
    g.add_argument("--new-tokens", type=int, default=96, help="tokens each method generates (default 96)")
    g.add_argument("--text", default=None, metavar="PATH",
                   help="a long UTF-8 text to continue instead (default: the bundled US Constitution)")


def speed_verdict(full_tpot: float, sparse_tpot: float, dense_from: int | None = None) -> str:
    """One plain sentence: was asyncspade faster than full attention, and by how much. ``dense_from``: asyncspade
    decoded every step densely, since the cost model lets it decode sparsely only past that many cached tokens."""
    ratio = full_tpot / sparse_tpot
    times = f"{sparse_tpot * 1e3:.1f} ms per token against {full_tpot * 1e3:.1f} ms"
    if dense_from is not None:
        return (f"asyncspade decoded densely, as full attention does: on this machine its cost model lets it decode "
                f"sparsely only past {dense_from} cached tokens (README: where it pays off), so the two did the same "
                f"work and their times ({times}) differ by the machine's noise.")
    if ratio >= 1 + SAME_SPEED:
        return f"asyncspade was faster: {ratio:.2f}x the decode speed of full attention ({times})."
    if ratio <= 1 - SAME_SPEED:
        return (f"asyncspade was slower: {1 / ratio:.2f}x the time per token of full attention ({times}); at this "
                "context on this machine dense attention is still cheaper (README: where it pays off).")
    return f"asyncspade and full attention decoded at the same speed, within {SAME_SPEED:.0%} ({times})."


def agreement(full_ids: list[int], sparse_ids: list[int]) -> str:
    """One plain sentence: do the two continuations agree."""
    n = max(len(full_ids), len(sparse_ids))
    same = next((i for i, (a, b) in enumerate(zip(full_ids, sparse_ids)) if a != b), min(len(full_ids),
                                                                                        len(sparse_ids)))
    if same == n:
        return f"The two continuations are identical ({n} tokens)."
    return f"The two continuations agree on the first {same} of {n} tokens, then differ."


def run(args) -> int:
    if args.context < 16 or args.new_tokens < 2:
        raise UserError("--context must be >= 16 and --new-tokens >= 2")
    if args.text is not None and not os.path.isfile(args.text):
        raise UserError(f"--text {args.text}: no such file")
    text = bundled_text() if args.text is None else open(args.text, encoding="utf-8", errors="replace").read()
    what = TEXT_NAME if args.text is None else args.text
    model, tok = load(args)

    from ..placement import new_engine                  # the engine loads torch work only after the model
    positions = model.config.max_position_embeddings
    if args.context + args.new_tokens > positions:
        raise UserError(f"--context + --new-tokens ({args.context + args.new_tokens}) exceeds the model's {positions} "
                        "positions")
    ids = tok(text, add_special_tokens=False)["input_ids"][:args.context]
    if len(ids) < args.context:
        say(f"the text has only {len(ids)} tokens; using all of them")
    formats = f"{args.weights} weights, {args.kv_dtype} KV cache"
    say(f"context: {len(ids)} tokens of {what}; each method continues it for {args.new_tokens} tokens, greedy, "
        f"{formats}")
    sparse = SparseConfig().replace(method="asyncspade")
    runs = {}
    dense_from = None
    for name, cfg in (("full", SparseConfig(method="full")), ("asyncspade", sparse)):
        # "auto": in-process selection on 2 cores; with a core to spare the cache-rank worker runs there
        eng = new_engine(model, tok, cfg, 1, len(ids) + args.new_tokens + 8, "auto", options=engine_options(args))
        try:
            t0 = time.perf_counter()
            seq = eng.add(ids, SamplingParams(max_tokens=args.new_tokens, ignore_eos=True))
            eng.step()
            label = "full attention" if name == "full" else f"asyncspade (budget {cfg.budget})"
            say(f"{label}: prefill {time.perf_counter() - t0:.1f} s; its continuation:")
            eng.run([seq], on_event=lambda ev: print(ev.text, end="", flush=True) if ev.text else None)
            print("\n")
            late = float(getattr(eng.rt.selector, "late_rate", 0.0) or 0.0)
            runs[name] = (seq, late, type(eng.rt.selector).__name__)
            if name == "asyncspade" and eng.rt.sparse_calls == 0:
                dense_from = eng.sparse.min_sparse
        finally:
            eng.close()
    (full, _, _), (fast, late, selector) = runs["full"], runs["asyncspade"]
    print("=" * 80)
    print(f"context {len(ids)} tokens of {what}")
    print(f"{args.new_tokens} new tokens each, {formats}, {os.cpu_count()} cores; asyncspade: budget "
          f"{sparse.budget} tokens per layer and KV head, predictor {sparse.predictor}, "
          f"{'worker process' if selector == 'AsyncSelector' else 'in-process selection'}"
          + (f" (selection late on {100 * late:.0f}% of layer-steps)" if selector == "AsyncSelector" else ""))
    print(f"{'method':12s} {'TPOT ms':>9s} {'tok/s':>7s}")
    for name, (seq, _, _) in runs.items():
        print(f"{name:12s} {seq.tpot_s * 1e3:9.1f} {1 / seq.tpot_s:7.1f}")
    print(speed_verdict(full.tpot_s, fast.tpot_s, dense_from))
    print(agreement(full.output_ids, fast.output_ids))
    return 0

