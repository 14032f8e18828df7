"""``asyncspade bench``: decode speed of the methods side by side on one filled cache, and vs Hugging Face.

One KV store is filled once (a real dense prefill of up to ``--fill`` tokens of prose, tiled to the longest
context: speed does not depend on what the keys say, and positions past the model's 8K are fine for speed) and
every method's engine decodes from it in turn, interleaved over ``--rounds`` (each round starting at the next
method). The zero-cost bound (``bound``: the same sparse forward fed fixed indices, no selection) is measured
whenever a sparse method is. Dense, Quest, oracle and the bound use ``--threads`` intra-op threads;
``lastq``/``asyncspade`` with the asynchronous selector give one core to the decode loop and one to the cache-rank
worker. TPOT is the mean decode step.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import torch
from tqdm import tqdm

from .arch import head_dim
from .cli.args import (UserError, add_model_args, add_sparse_args, engine_options, int_list, load,
                       methods_from_args, sparse_from_args)
from .data import PROSE
from .engine import Engine, kv_store_dtype
from .config import SparseConfig
from .costmodel import measure
from .kvcache import KVStore
from .methods import method_class
from .placement import auto_selector
from .roofline import kv_bytes, read_bandwidth
from .sampling import SamplingParams


def add_arguments(p) -> None:
    add_model_args(p)
    add_sparse_args(p, "full,quest,oracle,lastq,asyncspade", multi=True, selector=True)
    g = p.add_argument_group("benchmark")
    g.add_argument("--contexts", default="4096,16384", help="cache lengths to decode at, comma-separated (default "
                   "4096,16384; past the model's positions, 8192 for the bundled model, the cache is filled by tiling "
                   "real text: right for timing, which does not depend on what the keys say)")
    g.add_argument("--batches", dest="batch", default="1", help="batch sizes (concurrent sequences), comma-separated")
    g.add_argument("--batch", dest="batch", default=argparse.SUPPRESS, help=argparse.SUPPRESS)   # its former name
    g.add_argument("--budgets", default=None, help="budgets to sweep, comma-separated (default: --budget)")
    g.add_argument("--steps", type=int, default=16, help="timed decode steps per method and round")
    g.add_argument("--warmup", type=int, default=3, help="untimed decode steps before timing")
    g.add_argument("--rounds", type=int, default=2,
                   help="methods are interleaved over this many rounds, each round starting at the next method")
    g.add_argument("--threads", type=int, default=2, help="intra-op threads for the synchronous methods")
    g.add_argument("--decode-threads", type=int, default=1,
                   help="intra-op threads of the decode loop when a cache-rank worker runs beside it")
    g.add_argument("--fill", type=int, default=2048, help="tokens of real prefill the cache is tiled from")
    g.add_argument("--vs-hf", action="store_true",
                   help="instead: our engine (full) vs Hugging Face generate (sdpa), in fp32 and bf16")
    g.add_argument("--roofline", action="store_true",
                   help="measure the machine's read bandwidth (1 and 2 threads) and print next to every row the bytes "
                   "its decode step reads and the time those bytes take at that bandwidth (the byte floor)")
    g.add_argument("--peer", default=None, metavar="PATH.json",
                   help="llama.cpp timings from scripts/peer_llamacpp.py --json, shown beside full at each context")
    g.add_argument("--json", default=None, metavar="PATH", help="write the rows and the machine description here")
    g.add_argument("--plot", default=None, metavar="PATH", help="write a TPOT-vs-context plot here (PNG)")


def machine() -> dict:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def prose_ids(tok, n: int) -> list[int]:
    if os.path.exists(PROSE):
        with open(PROSE) as f:
            ids = tok(f.read(200_000), add_special_tokens=False)["input_ids"]
    else:                                       # no shared data: random ids are as good for timing
        ids = torch.randint(100, len(tok) - 1, (n,)).tolist()
    return (ids * (n // len(ids) + 1))[:n]


def fill_store(model, tok, store: KVStore, fill: int, length: int, slots: int,
               options: dict) -> tuple[list[int], float]:
    """Dense prefill of ``fill`` real tokens into slot 0, tiled to ``length`` and copied to ``slots`` slots.
    Returns the ids and the prefill's time to first token (seconds: the prefill and one sampled token)."""
    ids = prose_ids(tok, length)
    fill = min(fill, length)
    eng = Engine(model, tok, max_batch=store.slots, max_tokens=store.max_tokens, store=store, **options)
    [seq] = eng.run([eng.add(ids[:fill], SamplingParams(max_tokens=1, ignore_eos=True))])
    eng.close()
    for kv in (store.k, store.v):
        for start in range(fill, length, fill):
            n = min(fill, length - start)
            kv[:, 0, :, start:start + n] = kv[:, 0, :, :n]
        kv[:, 1:slots, :, :length] = kv[:, :1, :, :length]
    for layer in range(store.num_layers):        # page bounds and key sketch of the copies
        for s in range(slots):
            store.rebuild(layer, s, 0, length)
    return ids, seq.ttft_s


def resolved_selector(args) -> str:
    return auto_selector() if args.selector == "auto" else args.selector


def time_method(model, tok, store, cfg, ids, context, batch, args) -> dict:
    ahead = method_class(cfg).ahead
    selector = resolved_selector(args) if ahead else "sync"
    # the engine decodes on --decode-threads when a cache-rank worker runs beside it, on --threads otherwise
    eng = Engine(model, tok, cfg, max_batch=batch, max_tokens=store.max_tokens, store=store, selector=selector,
                 on_late=args.on_late, decode_threads=args.decode_threads, **engine_options(args))
    threads = eng.decode_threads or args.threads
    rt = eng.rt
    row_bytes = store.kv_heads * store.head_dim * store.k.element_size()
    weights = eng.lean.weight_bytes if eng.lean is not None else sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if "embed" not in n)
    sparse_now = rt.cfg.sparse and bool(rt.cfg.sparse_at(context))
    kv = kv_bytes(rt.cfg if sparse_now else SparseConfig(), len(rt.sparse_layers),
                  store.num_layers - len(rt.sparse_layers), context, row_bytes)
    sel_bytes = 0.0
    if sparse_now:              # what the selection reads per step, in-line and ahead (both on the memory bus)
        plan = rt.selector.plan if rt.selector is not None else None
        rows = sum(f + t * context for f, t in rt.method.selection_rows(plan))
        sel_bytes = batch * len(rt.sparse_layers) * rows * row_bytes
    step_bytes = weights + batch * kv + sel_bytes
    params = SamplingParams(max_tokens=args.warmup + args.steps + 1, ignore_eos=True)
    for b in range(batch):
        eng.adopt(b, ids[:context], params)
    for _ in range(args.warmup):
        eng.step()
    sel = eng.rt.selector
    if sel is not None:
        sel.steps = sel.late = 0
        sel.wait_s = 0.0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t0)
    calls = rt.sparse_calls + rt.dense_calls
    row = {"context": context, "batch": batch, "budget": cfg.budget if cfg.sparse else None, "method": cfg.method,
           "times_s": times, "threads": threads, "selector": selector if ahead else None,
           "late_rate": sel.late_rate if sel is not None else 0.0, "bytes": step_bytes, "path": eng.path,
           "sel_bytes": sel_bytes, "sparse_share": rt.sparse_calls / calls if calls else None,
           "wait_s": (sel.wait_s / max(1, args.steps)) if sel is not None else 0.0}
    eng.close()
    store.lengths.zero_()
    return row


def run_sweep(args) -> dict:
    contexts, batches = int_list(args.contexts, "--contexts"), int_list(args.batch, "--batch")
    budgets = int_list(args.budgets, "--budgets") if args.budgets else [args.budget]
    methods = methods_from_args(args)
    sparse = [m for m in methods if m != "full"]
    if sparse and "bound" not in methods:
        methods.append("bound")
    cfgs = {("full", None): sparse_from_args(args, "full")} if "full" in methods else {}
    for b in budgets:
        for m in methods:
            if m != "full":
                cfgs[(m, b)] = sparse_from_args(args, m).replace(budget=b).validate()
    if args.steps <= 0 or args.rounds <= 0 or args.warmup < 0:
        raise UserError("--steps and --rounds must be positive, --warmup >= 0")
    model, tok = load(args)
    cfg0 = model.config
    max_len = max(contexts) + args.rounds * (args.warmup + args.steps) + 8
    bandwidth = {t: read_bandwidth(t) for t in (1, 2)} if args.roofline else None
    rates = None
    if args.roofline:       # the cost model's rates: scattered rows (the sparse path's) cost more than streamed ones
        cm = measure(cfg0.num_key_value_heads, cfg0.num_attention_heads // cfg0.num_key_value_heads, head_dim(cfg0),
                     kv_store_dtype(model, args.kv_dtype))
        rates = {"streamed": 1 / cm.byte, "scattered": 1 / cm.gather}
    store = KVStore(cfg0.num_hidden_layers, max(batches), cfg0.num_key_value_heads, max_len, head_dim(cfg0),
                    kv_store_dtype(model, args.kv_dtype), args.page_size,
                    track_pages=any(method_class(c).needs_pages(c) for c in cfgs.values()),
                    track_sketch=any(method_class(c).needs_sketch(c) for c in cfgs.values()),
                    shared=resolved_selector(args) == "async" and any(method_class(c).ahead for c in cfgs.values()),
                    device=args.device)
    print(f"[asyncspade] filling a {max(contexts)}-token cache for {max(batches)} sequences "
          f"({store.k.numel() * store.k.element_size() * 2 / 2**30:.1f} GiB)...", file=sys.stderr)
    torch.set_num_threads(args.threads)
    ids, prefill_s = fill_store(model, tok, store, args.fill, max(contexts), max(batches), engine_options(args))
    fill = min(args.fill, max(contexts))
    print(f"[asyncspade] prefill of {fill} tokens: {prefill_s:.2f} s ({fill / prefill_s:.0f} tokens/s, "
          f"{args.threads} threads)", file=sys.stderr)
    rows = {}
    total = len(contexts) * len(batches) * len(cfgs) * args.rounds
    with tqdm(total=total, desc="bench", file=sys.stderr) as bar:
        for context in contexts:
            for batch in batches:
                for rnd in range(args.rounds):
                    # each round starts at the next method: none always runs first, on a cache its predecessor left
                    order = list(cfgs.items())
                    for key, cfg in order[rnd % len(order):] + order[:rnd % len(order)]:
                        bar.set_postfix_str(f"ctx={context} b={batch} {key[0]}@{key[1]}")
                        r = time_method(model, tok, store, cfg, ids, context, batch, args)
                        k = (context, batch, key)
                        if k in rows:
                            rows[k]["times_s"] += r["times_s"]
                            rows[k]["late_rate"] = (rows[k]["late_rate"] + r["late_rate"]) / 2
                            rows[k]["wait_s"] = (rows[k]["wait_s"] + r["wait_s"]) / 2
                        else:
                            rows[k] = r
                        bar.update()
    out = []
    for r in rows.values():
        times = r.pop("times_s")
        # TPOT is the mean step (vLLM's definition: what a token costs over a run); the median alone would hide
        # work done every few steps (the refinement's candidate refresh)
        r["tpot_s"], r["median_s"], r["max_s"] = statistics.mean(times), statistics.median(times), max(times)
        out.append(r)
    fill_note = f"real prefill of {min(args.fill, max(contexts))} tokens of prose, tiled to each context"
    if bandwidth:
        for r in out:
            r["floor_s"] = r["bytes"] / max(bandwidth.values())      # the bus, whichever cores read it
    peer = read_peer(args.peer) if args.peer else None
    return {"rows": out, "machine": machine(), "cache": fill_note, "bandwidth": bandwidth, "rates": rates, "peer": peer,
            "prefill": {"tokens": fill, "seconds": prefill_s},
            "formats": {"weights": args.weights, "kv_dtype": args.kv_dtype},
            "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")}}


def read_peer(path: str) -> dict:
    """llama.cpp's TPOT (mean step, as ours; the median where a result lacks its steps) by context from
    ``scripts/peer_llamacpp.py --json``."""
    try:
        peer = json.loads(open(path).read())
        rows = {int(r["context"]): (statistics.mean(r["times_ms"]) if r.get("times_ms") else r["tpot_ms"]["median"])
                / 1e3 for r in peer["rows"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--peer {path}: not a peer_llamacpp.py JSON result ({e})") from None
    return {"name": f"llama.cpp {peer.get('version', '')}".strip(), "tpot_s": rows,
            "prefill_tok_s": {int(r["context"]): r.get("prefill_tok_s") for r in peer["rows"]}}


def ratios(result: dict) -> list[dict]:
    """Each row with its ratios against full, quest and the bound at the same context/batch(/budget)."""
    idx = {(r["context"], r["batch"], r["budget"], r["method"]): r for r in result["rows"]}
    out = []
    for r in result["rows"]:
        c, b, k = r["context"], r["batch"], r["budget"]
        full = idx.get((c, b, None, "full"))
        quest = idx.get((c, b, k, "quest"))
        bound = idx.get((c, b, k, "bound"))
        peer = (result.get("peer") or {}).get("tpot_s", {}).get(c) if b == 1 else None
        out.append({**r, "vs_full": r["tpot_s"] / full["tpot_s"] if full else None,
                    "vs_quest": r["tpot_s"] / quest["tpot_s"] if quest else None,
                    "vs_bound": r["tpot_s"] / bound["tpot_s"] if bound else None,
                    "vs_peer": r["tpot_s"] / peer if peer else None,
                    "vs_floor": r["tpot_s"] / r["floor_s"] if r.get("floor_s") else None})
    order = {"full": 0, "bound": 1, "quest": 2, "oracle": 3, "streaming": 4, "lastq": 5, "asyncspade": 6}
    return sorted(out, key=lambda r: (r["batch"], r["context"], r["budget"] or 0, order.get(r["method"], 9)))


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    fmt = result.get("formats", {})
    t = Table(title=f"decode TPOT ({result['machine']['cpu']}, {result['machine']['date']}; "
              f"{fmt.get('weights')} weights, {fmt.get('kv_dtype')} KV)")
    cols = ["context", "batch", "budget", "method", "TPOT ms", "median ms", "tok/s", "vs full", "vs quest",
            "vs bound", "sparse %", "sel MB/step"]
    peer, roof = result.get("peer"), result.get("bandwidth")
    if peer:
        cols.append("vs llama.cpp")
    if roof:
        cols += ["MB/step", "floor ms", "x floor"]
    cols += ["late %", "wait ms"]
    for col in cols:
        t.add_column(col, justify="right")
    f = lambda x: "" if x is None else f"{x:.2f}"     # noqa: E731
    for r in ratios(result):
        cells = [str(r["context"]), str(r["batch"]), str(r["budget"] or "-"), r["method"],
                 f"{r['tpot_s'] * 1e3:.1f}", f"{r['median_s'] * 1e3:.1f}", f"{r['batch'] / r['tpot_s']:.1f}",
                 f(r["vs_full"]), f(r["vs_quest"]),
                 f(r["vs_bound"]), "" if r.get("sparse_share") is None else f"{100 * r['sparse_share']:.0f}",
                 f"{r.get('sel_bytes', 0) / 1e6:.1f}" if r["budget"] else ""]
        if peer:
            cells.append(f(r["vs_peer"]))
        if roof:
            cells += [f"{r['bytes'] / 1e6:.0f}", f"{r['floor_s'] * 1e3:.1f}", f(r["vs_floor"])]
        remote = r["selector"] in ("async", "thread", "dist")
        cells += [f"{100 * r['late_rate']:.0f}" if remote else "", f"{r['wait_s'] * 1e3:.2f}" if remote else ""]
        t.add_row(*cells)
    if peer:
        for c, tp in sorted(peer["tpot_s"].items()):
            t.add_row(str(c), "1", "-", peer["name"], f"{tp * 1e3:.1f}", "", f"{1 / tp:.1f}", *[""] * (len(cols) - 7))
    Console(file=sys.stdout, width=200).print(t)
    print(f"cache: {result['cache']}")
    print("TPOT: the mean decode step (tok/s and every ratio use it); median ms: the middle step")
    pf = result.get("prefill")
    if pf:
        line = f"prefill: {pf['tokens']} tokens in {pf['seconds']:.2f} s ({pf['tokens'] / pf['seconds']:.0f} tokens/s)"
        peer_tok_s = (peer or {}).get("prefill_tok_s", {}).get(pf["tokens"])
        if peer_tok_s:
            line += f"; {peer['name']}: {peer_tok_s:.0f} tokens/s ({pf['tokens'] / pf['seconds'] / peer_tok_s:.2f}x)"
        print(line)
    if roof:
        print("read bandwidth: " + ", ".join(f"{t} thread{'s' * (t > 1)} {bw / 1e9:.1f} GB/s" for t, bw in roof.items())
              + "; floor = the step's bytes (weights + KV read + selection) / the larger of the two")
    rates = result.get("rates")
    if rates:
        print(f"attention rows, 1 thread (cost model): streamed {rates['streamed'] / 1e9:.1f} GB/s, scattered "
              f"16-token pages from memory {rates['scattered'] / 1e9:.1f} GB/s (the floor counts both at the bus rate)")


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["rows"]
    panels = sorted({(r["batch"], r["budget"]) for r in rows if r["budget"] is not None}) or [(rows[0]["batch"], None)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (b, k) in zip(axes[0], panels):
        for m in sorted({r["method"] for r in rows}):
            pts = sorted((r["context"], r["tpot_s"] * 1e3) for r in rows
                         if r["batch"] == b and r["method"] == m and (r["budget"] in (k, None)))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m, linestyle="--" if m == "bound" else "-")
        ax.set(xscale="log", xlabel="context (tokens)", ylabel="TPOT (ms)", title=f"batch {b}, budget {k}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------- vs Hugging Face generate
def hf_tpot(model, ids: torch.Tensor, steps: int) -> float:
    """Median gap between streamed tokens of ``model.generate`` (prefill excluded)."""
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.t = []

        def put(self, value):
            self.t.append(time.perf_counter())

        def end(self):
            pass
    st = Stamps()
    model.set_attn_implementation("sdpa")
    model.generate(ids, max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False, streamer=st,
                   pad_token_id=0)
    gaps = [b - a for a, b in zip(st.t[2:], st.t[3:])]        # t[0]: prompt echo, t[1]: first token
    return statistics.median(gaps)


def ours_tpot(model, tok, ids: list[int], batch: int, steps: int) -> float:
    eng = Engine(model, tok, max_batch=batch, max_tokens=len(ids) + steps + 8)
    seqs = [eng.add(ids, SamplingParams(max_tokens=steps + 1, ignore_eos=True)) for _ in range(batch)]
    eng.step()                                                # prefill + first token of every sequence
    times = []
    while not all(s.finished for s in seqs):
        t0 = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t0)
    eng.close()
    return statistics.median(times)


def run_vs_hf(args) -> dict:
    from .models import load_model
    contexts, batches = int_list(args.contexts, "--contexts"), int_list(args.batch, "--batch")
    torch.set_num_threads(args.threads)
    rows = []
    models = {}
    for dt in (torch.float32, torch.bfloat16):
        # two copies: the engine lays fp32 weights out for decoding, HF gets the model as loaded
        say = lambda m: print(f"[asyncspade] {m}", file=sys.stderr)   # noqa: E731
        models[dt] = (load_model(args.model, dt, progress=say), load_model(args.model, dt, progress=say))
    total = len(contexts) * len(batches) * 4
    with tqdm(total=total, desc="vs hf", file=sys.stderr) as bar:
        for c in contexts:
            for b in batches:
                for dt, ((model, tok), (hf_model, _)) in models.items():
                    ids = prose_ids(tok, c)
                    name = "fp32" if dt == torch.float32 else "bf16"
                    ours = ours_tpot(model, tok, ids, b, args.steps)
                    bar.update()
                    hf = hf_tpot(hf_model, torch.tensor([ids] * b), args.steps)
                    bar.update()
                    rows += [{"context": c, "batch": b, "dtype": name, "engine": "asyncspade (full)", "tpot_s": ours},
                             {"context": c, "batch": b, "dtype": name, "engine": "hf generate (sdpa)", "tpot_s": hf}]
    return {"vs_hf": rows, "machine": machine(), "settings": {k: v for k, v in vars(args).items()
                                                              if not k.startswith("_")}}


def print_vs_hf(result: dict) -> None:
    idx = {(r["context"], r["batch"], r["dtype"], r["engine"]): r["tpot_s"] for r in result["vs_hf"]}
    print(f"decode TPOT, ours (full attention) vs Hugging Face generate (sdpa); {result['machine']['cpu']}, "
          f"{result['machine']['date']}")
    print("| context | batch | ours fp32 ms | HF fp32 ms | speedup fp32 | ours bf16 ms | HF bf16 ms | speedup bf16 |"
          " ours bf16 vs HF fp32 (defaults) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c, b in sorted({(r["context"], r["batch"]) for r in result["vs_hf"]}):
        g = lambda dt, e: idx[(c, b, dt, e)]                  # noqa: E731
        o32, h32 = g("fp32", "asyncspade (full)"), g("fp32", "hf generate (sdpa)")
        o16, h16 = g("bf16", "asyncspade (full)"), g("bf16", "hf generate (sdpa)")
        print(f"| {c} | {b} | {o32 * 1e3:.1f} | {h32 * 1e3:.1f} | {h32 / o32:.2f}x | {o16 * 1e3:.1f} | "
              f"{h16 * 1e3:.1f} | {h16 / o16:.2f}x | {h32 / o16:.2f}x |")


def run(args) -> int:
    if args.threads < 1 or args.decode_threads < 1:
        raise UserError(f"--threads and --decode-threads must be >= 1, got {args.threads} and {args.decode_threads}")
    if args.vs_hf:
        result = run_vs_hf(args)
        print_vs_hf(result)
    else:
        result = run_sweep(args)
        print_table(result)
        if args.plot:
            plot(result, args.plot)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0
