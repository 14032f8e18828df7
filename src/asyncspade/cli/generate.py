"""``asyncspade generate``: decode one prompt, streaming the text to stdout, timings to stderr.

    asyncspade generate --prompt "Why is the sky blue?" --method asyncspade --budget 1024
    echo "Count to ten." | asyncspade generate --method full --json          # one JSON object on stdout
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..config import SparseConfig
from ..sampling import SamplingParams
from .args import UserError, add_model_args, add_model_len_arg, add_sparse_args, check_model_len, engine_options, \
    load, say, sparse_from_args, utf8_text

FLAGS = {"max_tokens": "--max-new-tokens", "temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k",
         "min_p": "--min-p", "repetition_penalty": "--repetition-penalty", "stop": "--stop"}


def add_arguments(p) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", default=None, help="the prompt; '-' or omitted: read it from stdin")
    g.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most (default 256)")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default 0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold in (0, 1] (default 1)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = off (default 0)")
    g.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens below min-p x the most likely token's probability (default 0)")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 discourages tokens of the prompt and the output (default 1: off)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text is produced (repeatable; the text itself is not printed)")
    g.add_argument("--no-chat", action="store_true", help="feed the raw text instead of the chat template")
    g.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="write one JSON object (text, tokens, ttft_s, tpot_s, method, prompt_tokens, finish_reason) to "
                   "PATH, or to stdout without PATH, instead of streaming")
    add_model_len_arg(g, "KV cache capacity in tokens, prompt included (default: the model's context)")
    g.add_argument("--max-context", dest="max_model_len", type=int, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)              # its former name
    add_model_args(p)
    add_sparse_args(p, "asyncspade", selector=True)


def read_prompt(arg: str | None) -> str:
    if arg is None or arg == "-":
        if arg is None and sys.stdin.isatty():
            raise UserError("no prompt: give --prompt TEXT, or pipe the prompt on stdin")
        raw = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"the prompt on stdin is not valid UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                                f"{e.start})") from None
        arg = utf8_text(raw, "the prompt on stdin")
    if not arg.strip():
        raise UserError("empty prompt")
    return arg


def check_args(args) -> tuple[SamplingParams, SparseConfig]:
    """Everything that can be checked without the model, so bad input fails before the model loads."""
    try:
        params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                                seed=args.seed, stop=list(args.stop)).validate()
    except ValueError as e:          # name the flag, not the SamplingParams field
        field, _, rest = str(e).partition(" ")
        raise UserError(f"{FLAGS.get(field, field)} {rest}") from None
    if args.max_model_len is not None and args.max_model_len <= args.max_new_tokens:
        raise UserError(f"--max-model-len ({args.max_model_len}) must exceed --max-new-tokens "
                        f"({args.max_new_tokens})")
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
    check_model_len(args.max_model_len, model)

    from ..models import encode_prompt             # transformers loads here, not for `--help` or bad flags
    from ..placement import new_engine

    engine = new_engine(model, tokenizer, cfg, 1, args.max_model_len, args.selector, args.on_late,
                        engine_options(args))
    say(engine.path_note)
    try:
        seq = engine.add(encode_prompt(tokenizer, prompt, chat=not args.no_chat), params)
        if args.json:
            engine.run([seq])
            text = json.dumps({"text": seq.text, "tokens": len(seq.output_ids), "ttft_s": seq.ttft_s,
                               "tpot_s": seq.tpot_s, "method": cfg.method, "prompt_tokens": len(seq.prompt_ids),
                               "finish_reason": seq.finish_reason})
            if args.json == "-":
                print(text)
            else:
                with open(args.json, "w", encoding="utf-8") as f:
                    f.write(text + "\n")
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
