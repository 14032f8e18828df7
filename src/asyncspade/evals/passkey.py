"""``asyncspade eval passkey``: pass key retrieval over context lengths and needle depths (Quest's protocol).

A case is a haystack of real text with a random 5-digit pass key sentence at some depth. The haystack is prefilled
densely; the question goes through the decode path one token at a time (``decode_tail``), so the sparse selection
acts on it exactly as in decoding; then a few tokens are generated greedily and checked for the key. Every method
sees the same cases. ``--contexts`` counts everything: prompt and generated tokens.

Prompt layout: ``--no-chat`` (default) is the plain-text protocol of LongLoRA/Quest, the question ending in "The pass
key is" so the model completes the number. ``--chat`` wraps the haystack in the chat template and asks "What is the
pass key?" in the user turn (the question and the end of the turn go through the decode path). Dense, on the bundled
SmolLM2-135M-Instruct with the Shakespeare haystack, plain text retrieved more keys (1K: 3/6 vs 2/6; 2K: 1/10 vs
0/10): in the chat layout the model tends to talk about the play instead of quoting the number.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..cli.args import UserError, add_data_arg, add_model_args, add_sparse_args, data_default, int_list, load, \
    methods_from_args, sparse_from_args
from ..engine import Engine
from ..sampling import SamplingParams
from .passkey_data import QUESTION, check_passkey, make_passkey_prompt, random_key
from .report import ctx_label

DEFAULT_HAYSTACK = "tinyshakespeare.txt"          # in the data directory
CHAT_QUESTION = "\nWhat is the pass key?"


@dataclass
class Case:
    context: int
    depth: float
    key: str
    prompt_ids: list[int]
    tail: int                 # last prompt tokens fed through the decode path (the question)
    needle_pos: int


def add_arguments(p) -> None:
    add_model_args(p)
    add_sparse_args(p, "full,quest,asyncspade,streaming", multi=True)
    g = p.add_argument_group("passkey")
    g.add_argument("--haystack", default=None,
                   help=f"text file for the haystack (default: {DEFAULT_HAYSTACK} in the data directory)")
    add_data_arg(g)
    g.add_argument("--contexts", dest="context", default="2048,4096,8192", help="comma-separated context lengths in "
                   "tokens, prompt and generated tokens included (default 2048,4096,8192)")
    g.add_argument("--context", dest="context", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    g.add_argument("--depths", type=int, default=10,
                   help="number of needle depths, evenly spaced over 0..1 (default 10)")
    g.add_argument("--trials", type=int, default=2, help="cases per (context, depth), each with its own key and "
                   "haystack offset (default 2)")
    g.add_argument("--new-tokens", type=int, default=8, help="tokens generated after the question (default 8)")
    g.add_argument("--max-batch", type=int, default=4, help="cases decoded concurrently (default 4)")
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=False,
                   help="wrap the prompt in the chat template (default: plain text, which retrieves better on the "
                   "bundled model)")
    g.add_argument("--seed", type=int, default=0, help="seed of the keys and haystack offsets (default 0)")
    g.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    g.add_argument("--plot", default=None, metavar="PATH.png", help="depth x context heat map per method")


def depth_grid(n: int) -> list[float]:
    """``n`` depths evenly spaced over [0, 1] (one depth: the middle)."""
    return [i / (n - 1) for i in range(n)] if n > 1 else [0.5]


def _chat_frame(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids the chat template puts before and after the user's content."""
    marker = "\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True,
                                         tokenize=False)
    head, tail = text.split(marker)
    enc = lambda s: list(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    return enc(head), enc(tail)


def build_cases(tokenizer, haystack: str, contexts: list[int], depths: list[float], trials: int, seed: int,
                new_tokens: int, chat: bool) -> list[Case]:
    """All cases, deterministic in ``seed``: a key and a haystack offset (at a line start) per case."""
    if chat and not getattr(tokenizer, "chat_template", None):
        raise UserError("--chat: the tokenizer has no chat template; use --no-chat")
    head, tail = _chat_frame(tokenizer) if chat else ([], [])
    plain_q = len(tokenizer(QUESTION, add_special_tokens=False)["input_ids"])
    chat_q = list(tokenizer(CHAT_QUESTION, add_special_tokens=False)["input_ids"]) + tail
    rng = random.Random(seed)
    cases = []
    for ctx in contexts:
        # room for the frame, our question (chat) and the generated tokens; make_passkey_prompt counts its own question
        room = ctx - new_tokens - (len(head) + len(chat_q) - plain_q if chat else 0)
        for depth in depths:
            for _ in range(trials):
                key = random_key(rng)
                offset = haystack.find("\n", rng.randrange(len(haystack))) + 1   # a line start (0 if none follows)
                try:
                    c = make_passkey_prompt(tokenizer, haystack, room, depth, key, offset)
                except ValueError as e:
                    raise UserError(f"--contexts {ctx}: {e}") from None
                question = chat_q if chat else c.question_ids
                ids = head + c.prefill_ids + question
                cases.append(Case(ctx, depth, str(key), ids, len(question), len(head) + c.needle_token_pos))
    return cases


def decode_cases(model, tokenizer, cfg, cases: list[Case], new_tokens: int, max_batch: int, bar=None) -> list[str]:
    """Greedy answers of every case under one sparse configuration, decoded as a batch."""
    engine = Engine(model, tokenizer, cfg, max_batch=max_batch,
                    max_tokens=max(len(c.prompt_ids) for c in cases) + new_tokens)
    try:
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0)
        seqs = [engine.add(c.prompt_ids, params, decode_tail=c.tail) for c in cases]
        engine.run(seqs, on_event=lambda ev: bar.update(1) if bar is not None and ev.finished else None)
    finally:
        engine.close()
    return [s.text for s in seqs]


def _acc(flags: list[bool]) -> float:
    return sum(flags) / len(flags)


def summarize(cases: list[Case], texts: list[str]) -> dict:
    """Accuracy overall, per context, per depth and per (context, depth) cell."""
    ok = [check_passkey(t, c.key) for c, t in zip(cases, texts)]
    by_ctx, by_depth, cells = defaultdict(list), defaultdict(list), defaultdict(list)
    for c, t, o in zip(cases, texts, ok):
        by_ctx[c.context].append(o)
        by_depth[c.depth].append(o)
        cells[(c.context, c.depth)].append((c, t, o))
    return {
        "accuracy": _acc(ok),
        "by_context": {str(k): _acc(v) for k, v in by_ctx.items()},
        "by_depth": {f"{k:.3f}": _acc(v) for k, v in by_depth.items()},
        "cells": [{"context": ctx, "depth": d, "accuracy": _acc([o for _, _, o in rows]), "trials": len(rows),
                   "tokens": [len(c.prompt_ids) for c, _, _ in rows], "needle_pos": [c.needle_pos for c, _, _ in rows],
                   "keys": [c.key for c, _, _ in rows], "outputs": [t for _, t, _ in rows]}
                  for (ctx, d), rows in cells.items()],
    }


def plot(results: dict, contexts: list[int], depths: list[float], path: str) -> None:
    """One depth x context heat map of accuracy per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results)
    fig, axes = plt.subplots(1, len(methods), figsize=(1.2 + (0.9 * len(contexts) + 0.8) * len(methods), 4.2),
                             squeeze=False, sharey=True)
    for ax, m in zip(axes[0], methods):
        grid = [[0.0] * len(contexts) for _ in depths]
        for cell in results[m]["cells"]:
            grid[depths.index(cell["depth"])][contexts.index(cell["context"])] = cell["accuracy"]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(contexts)), [ctx_label(c) for c in contexts])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_title(f"{m}: {results[m]['accuracy']:.0%}", fontsize=10)
        ax.set_xlabel("context")
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _table(results: dict, contexts: list[int]) -> str:
    head = f"{'method':<12}{'all':>7}" + "".join(f"{c:>8}" for c in contexts)
    rows = [f"{m:<12}{r['accuracy']:>7.0%}" + "".join(f"{r['by_context'][str(c)]:>8.0%}" for c in contexts)
            for m, r in results.items()]
    return "\n".join([head, *rows])


def run(args) -> int:
    methods = methods_from_args(args)
    configs = {m: sparse_from_args(args, m) for m in methods}
    contexts = int_list(args.context, "--contexts")
    for name in ("depths", "trials", "new_tokens", "max_batch"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    hay_path = Path(data_default(args, "haystack", DEFAULT_HAYSTACK))
    if not hay_path.is_file():
        raise UserError(f"haystack file not found: {hay_path}")
    haystack = hay_path.read_text(encoding="utf-8", errors="replace")
    if not haystack.strip():
        raise UserError(f"haystack file is empty: {hay_path}")
    depths = depth_grid(args.depths)

    model, tokenizer = load(args)
    limit = model.config.max_position_embeddings
    if max(contexts) > limit:
        raise UserError(f"--contexts {max(contexts)} exceeds the model's {limit} positions")
    cases = build_cases(tokenizer, haystack, contexts, depths, args.trials, args.seed, args.new_tokens, args.chat)
    results, texts = {}, {}
    with tqdm(total=len(cases) * len(methods), desc="passkey", unit="case", file=sys.stderr) as bar:
        for m in methods:
            bar.set_postfix_str(m)
            texts[m] = decode_cases(model, tokenizer, configs[m], cases, args.new_tokens, args.max_batch, bar)
            results[m] = {**summarize(cases, texts[m]), "config": configs[m].to_dict()}
    if "full" in texts:     # the dense model is weak at retrieval: agreement with it is the finer fidelity signal
        for m in methods:
            results[m]["same_as_full"] = _acc([a == b for a, b in zip(texts[m], texts["full"])])
    print(_table(results, contexts))
    if args.json:
        settings = {"eval": "passkey", "model": args.model or "SmolLM2-135M-Instruct (bundled)", "dtype": args.dtype,
                    "contexts": contexts, "depths": depths, "trials": args.trials, "new_tokens": args.new_tokens,
                    "chat": args.chat, "haystack": str(hay_path), "seed": args.seed, "budget": args.budget,
                    "methods": methods}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"settings": settings, **results}, indent=1))
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot(results, contexts, depths, args.plot)
    return 0
