"""``asyncspade generate | bench | eval {fidelity,passkey,math,report} | serve``.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``; this file
only wires them and turns user errors into one line on stderr and exit code 2 (never a traceback).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .config import (DEFAULT_KV_DTYPE, DEFAULT_WEIGHTS, METHODS, PREDICTORS, RIDGE_KINDS, WEIGHT_FORMATS, ConfigError,
                     SparseConfig)

COMMANDS = {
    "generate": ("asyncspade.generate", "generate text for one prompt (streams tokens, reports TTFT/TPOT)"),
    "bench": ("asyncspade.bench", "decode speed (TPOT) of the methods side by side, and vs Hugging Face generate"),
    "serve": ("asyncspade.server", "OpenAI-compatible HTTP server with continuous batching"),
}
EVALS = {
    "fidelity": ("asyncspade.evals.fidelity", "teacher-forced fidelity of sparse vs dense on reasoning traces or prose"),
    "passkey": ("asyncspade.evals.passkey", "pass key retrieval over context lengths and depths"),
    "math": ("asyncspade.evals.math", "math accuracy with several samples per problem and majority voting"),
    "report": ("asyncspade.evals.report", "gather JSON results of a directory into one Markdown report"),
}


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="HF checkpoint directory or .gguf file (default: the bundled SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="dtype the checkpoint is loaded in (the Hugging Face modules' precision; the lean forward "
                   "converts from it to --weights) (default fp32)")
    g.add_argument("--weights", default=DEFAULT_WEIGHTS, choices=WEIGHT_FORMATS,
                   help="weight format of the lean forward (Llama family): fp32, bf16, int8 (per-channel scales) or "
                   f"int4 (groups of 32); quantized at load and cached (default {DEFAULT_WEIGHTS}: BENCHMARKS.md)")
    g.add_argument("--kv-dtype", default=DEFAULT_KV_DTYPE, choices=["fp32", "bf16"],
                   help=f"KV cache dtype of the lean forward (default {DEFAULT_KV_DTYPE})")
    g.add_argument("--device", default="cpu",
                   help="where the lean forward's weights and the KV cache live, e.g. cuda (default cpu; the "
                   "asynchronous cache-rank worker needs cpu)")


def add_sparse_args(p: argparse.ArgumentParser, method_default: str = "asyncspade", multi: bool = False,
                    selector: bool = False) -> None:
    """The sparse-attention flags. ``selector=True`` adds where lastq/asyncspade select (``--selector``,
    ``--on-late``): timing, not results, so evaluations that compare selections leave it out."""
    d = SparseConfig()
    g = p.add_argument_group("sparse attention")
    if multi:
        g.add_argument("--methods", default=method_default,
                       help=f"comma-separated methods to compare, from: {', '.join(METHODS)}")
    else:
        g.add_argument("--method", default=method_default, help=f"attention method: {', '.join(METHODS)}")
    g.add_argument("--budget", type=int, default=d.budget, help="tokens attended per sparse layer and KV head, "
                   f"sinks and recent window included (default {d.budget})")
    g.add_argument("--page-size", type=int, default=d.page_size, help=f"Quest page size (default {d.page_size})")
    g.add_argument("--sink", type=int, default=d.sink, help=f"first tokens always attended (default {d.sink})")
    g.add_argument("--recent", type=int, default=d.recent, help=f"newest tokens always attended (default {d.recent})")
    g.add_argument("--dense-layers", type=int, default=d.dense_layers,
                   help=f"the first N layers stay dense (default {d.dense_layers})")
    g.add_argument("--predictor", default=d.predictor, choices=PREDICTORS,
                   help="asyncspade query forecaster: ridge (temporal, the paper's), xlayer (from the residual of an "
                   f"earlier layer), hybrid (ridge candidates refined by xlayer) (default {d.predictor})")
    g.add_argument("--lead", type=int, default=d.lead, help=f"xlayer/hybrid: layers of lead (default {d.lead})")
    g.add_argument("--window", type=int, default=d.window, help=f"ridge: window of recent queries (default {d.window})")
    g.add_argument("--order", type=int, default=d.order, help=f"ridge: AR order (default {d.order})")
    g.add_argument("--ridge", type=float, default=d.ridge, help=f"ridge: regulariser (default {d.ridge})")
    g.add_argument("--ridge-kind", default=d.ridge_kind, choices=RIDGE_KINDS,
                   help=f"ridge: forecaster variant (default {d.ridge_kind})")
    g.add_argument("--superset", type=int, default=d.superset,
                   help=f"hybrid: candidates kept by the step-ahead pass, in multiples of k (default {d.superset})")
    g.add_argument("--prefilter", default=d.prefilter, choices=["none", "pages"],
                   help="asyncspade/lastq step-ahead pass: score every key (none), or rank pages by their min/max "
                   f"bound with the forecast query and score tokens only inside the best ones (default {d.prefilter})")
    g.add_argument("--refine", action=argparse.BooleanOptionalAction, default=d.refine,
                   help="asyncspade/lastq: the ahead pass proposes --superset x k candidates and the layer's true "
                   f"query picks the exact top-k among them in-line (default {'on' if d.refine else 'off'})")
    g.add_argument("--refresh", type=int, default=d.refresh,
                   help=f"with --refine: run the step-ahead pass every N steps, N <= --recent (default {d.refresh})")
    g.add_argument("--min-sparse", type=int, default=d.min_sparse, metavar="N",
                   help="caches up to N tokens decode densely (default: measured at start by the cost model, the "
                   "length from which sparse attention is cheaper on this machine; 0: sparse from the budget on)")
    g.add_argument("--aggregate", default=d.aggregate, choices=["sum", "max"],
                   help="GQA: combine per-head softmax scores by sum or max (default sum)")
    if selector:
        g.add_argument("--selector", default="async", choices=["async", "sync", "dist"],
                       help="where lastq/asyncspade select: async (the cache-rank worker process over shared "
                       "memory, off the decode loop's critical path), dist (a cache rank over torch.distributed "
                       "with its own key copy, for another device or host), or sync (in-process, when each "
                       "selection becomes possible) (default async)")
        g.add_argument("--on-late", default="wait", choices=["wait", "reuse"],
                       help="async selection not ready when the layer needs it: wait for it, or reuse the previous "
                       "step's set (default wait)")


def engine_options(args) -> dict:
    """The engine's format settings from the model flags (``Engine(..., **engine_options(args))``)."""
    return {"weights": args.weights, "kv_dtype": args.kv_dtype, "device": args.device}


def sparse_from_args(args, method: str | None = None) -> SparseConfig:
    cfg = SparseConfig(method=method or getattr(args, "method", "full"), budget=args.budget, page_size=args.page_size,
                       sink=args.sink, recent=args.recent, dense_layers=args.dense_layers, predictor=args.predictor,
                       lead=args.lead, window=args.window, order=args.order, ridge=args.ridge,
                       ridge_kind=args.ridge_kind, superset=args.superset, aggregate=args.aggregate,
                       prefilter=args.prefilter, refine=args.refine, refresh=args.refresh, min_sparse=args.min_sparse)
    return cfg.validate()


def methods_from_args(args) -> list[str]:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise UserError("--methods is empty")
    for m in methods:
        if m not in METHODS:
            raise UserError(f"unknown method {m!r}; choose from: {', '.join(METHODS)}")
    return methods


def int_list(text: str, name: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise UserError(f"{name} must be positive integers, got {text!r}")
    return vals


def load(args, progress=None):
    """Load the model from ``--model/--dtype``, reporting progress on stderr."""
    from .models import load_model, parse_dtype

    def say(msg):
        print(f"[asyncspade] {msg}", file=sys.stderr, flush=True)
    return load_model(args.model, parse_dtype(args.dtype), progress=progress or say)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """All subcommands are listed; only the one named in ``argv`` imports its module (fast ``--help``)."""
    argv = sys.argv[1:] if argv is None else argv
    chosen = set(argv[:2])
    parser = argparse.ArgumentParser(prog="asyncspade", description="Query-aware sparse attention whose top-k "
                                     "token selection runs ahead of the decode loop (AsyncSpade). "
                                     "`asyncspade COMMAND --help` explains each command's flags.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"asyncspade {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(subparsers, name, mod, help_, wanted):
        p = subparsers.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=mod)
        if wanted:
            importlib.import_module(mod).add_arguments(p)

    for name, (mod, help_) in COMMANDS.items():
        add(sub, name, mod, help_, name in chosen)
    ev = sub.add_parser("eval", help="evaluations: " + ", ".join(EVALS), description="evaluations")
    evsub = ev.add_subparsers(dest="eval", required=True, metavar="EVAL")
    for name, (mod, help_) in EVALS.items():
        add(evsub, name, mod, help_, "eval" in chosen and name in chosen)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    from .engine import RequestError
    from .models import ModelLoadError
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (UserError, ConfigError, RequestError, ModelLoadError, FileNotFoundError) as e:
        print(f"asyncspade: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("asyncspade: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
