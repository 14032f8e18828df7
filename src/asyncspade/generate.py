"""``asyncspade generate``: decode one prompt, streaming the text to stdout, timings to stderr.

    asyncspade generate --prompt "Why is the sky blue?" --method asyncspade --budget 1024
    echo "Count to ten." | asyncspade generate --method full --json
"""
from __future__ import annotations

import json
import os
import sys

from .cli import UserError, add_model_args, add_sparse_args, load, sparse_from_args
from .config import SparseConfig
from .sampling import SamplingParams

FLAGS = {"max_tokens": "--max-new-tokens", "temperature": "--temperature", "top_p": "--top-p", "stop": "--stop"}


def add_arguments(p) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", default=None, help="the prompt; '-' or omitted: read it from stdin")
    g.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most (default 256)")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default 0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold in (0, 1] (default 1)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text is produced (repeatable; the text itself is not printed)")
    g.add_argument("--no-chat", action="store_true", help="feed the raw text instead of the chat template")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object (text, tokens, ttft_s, tpot_s, method, prompt_tokens, finish_reason) "
                   "instead of streaming")
    g.add_argument("--max-context", type=int, default=None,
                   help="KV cache capacity in tokens, prompt included (default: the model's context)")
    add_model_args(p)
    add_sparse_args(p, "asyncspade", selector=True)


def read_prompt(arg: str | None) -> str:
    if arg is None or arg == "-":
        if arg is None and sys.stdin.isatty():
            raise UserError("no prompt: give --prompt TEXT, or pipe the prompt on stdin")
        arg = sys.stdin.read()
    if not arg.strip():
        raise UserError("empty prompt")
    return arg


def check_args(args) -> tuple[SamplingParams, SparseConfig]:
    """Everything that can be checked without the model, so bad input fails before the model loads."""
    try:
        params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                seed=args.seed, stop=list(args.stop)).validate()
    except ValueError as e:          # name the flag, not the SamplingParams field
        field, _, rest = str(e).partition(" ")
        raise UserError(f"{FLAGS.get(field, field)} {rest}") from None
    if args.max_context is not None and args.max_context <= args.max_new_tokens:
        raise UserError(f"--max-context ({args.max_context}) must exceed --max-new-tokens ({args.max_new_tokens})")
    return params, sparse_from_args(args)


def summary(seq, cfg: SparseConfig) -> str:
    parts = [f"{len(seq.output_ids)} tokens", f"TTFT {seq.ttft_s * 1e3:.0f} ms"]
    if seq.tpot_s > 0:
        parts.append(f"TPOT {seq.tpot_s * 1e3:.1f} ms ({1 / seq.tpot_s:.1f} tok/s)")
    method = f"{cfg.method} (budget {cfg.budget})" if cfg.sparse else cfg.method
    return f"[asyncspade] {', '.join(parts)}, method {method}, finish {seq.finish_reason}"


def run(args) -> int:
    params, cfg = check_args(args)
    prompt = read_prompt(args.prompt)
    model, tokenizer = load(args)

    from .engine import Engine              # transformers loads here, not for `--help` or bad flags
    from .models import encode_prompt

    engine = Engine(model, tokenizer, cfg, max_batch=1, max_tokens=args.max_context, selector=args.selector,
                    on_late=args.on_late)
    try:
        seq = engine.add(encode_prompt(tokenizer, prompt, chat=not args.no_chat), params)
        if args.json:
            engine.run([seq])
            print(json.dumps({"text": seq.text, "tokens": len(seq.output_ids), "ttft_s": seq.ttft_s,
                              "tpot_s": seq.tpot_s, "method": cfg.method, "prompt_tokens": len(seq.prompt_ids),
                              "finish_reason": seq.finish_reason}))
            return 0
        try:
            engine.run([seq], on_event=lambda ev: print(ev.text, end="", flush=True))
            print("" if seq.text.endswith("\n") else "\n", end="", flush=True)
        except BrokenPipeError:          # e.g. `| head`: stop quietly, and keep Python from failing at exit too
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
        print(summary(seq, cfg), file=sys.stderr)
        return 0
    finally:
        engine.close()
