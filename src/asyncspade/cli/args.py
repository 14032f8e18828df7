"""The flags and helpers the commands share: model and sparse-attention flags, the data directory, list parsing,
model loading, and the help formatter that shows every default. Commands import this, never the dispatcher."""
from __future__ import annotations

import argparse
import sys

from ..config import (DEFAULT_KV_DTYPE, DEFAULT_WEIGHTS, METHODS, PREDICTORS, PREFILTERS, RIDGE_KINDS,
                      WEIGHT_FORMATS, SparseConfig)


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


class Formatter(argparse.HelpFormatter):
    """``--help`` ends every flag's help with its default, unless the help states it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.default in (None, False, argparse.SUPPRESS)
                or text == argparse.SUPPRESS):
            return text
        return text + " (default %(default)s)"


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="HF checkpoint directory, Hugging Face model id (from the local cache, offline) or .gguf file "
                   "(default: the bundled SmolLM2-135M-Instruct)")
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


def add_model_len_arg(p, help_: str = "context per sequence in tokens, prompt and output included (default: the "
                      "model's maximum positions)") -> None:
    """``--max-model-len`` (vLLM's name), the one name of the context limit in every command."""
    p.add_argument("--max-model-len", type=int, default=None, metavar="TOKENS", help=help_)


def add_sparse_args(p: argparse.ArgumentParser, method_default: str = "asyncspade", multi: bool = False,
                    selector: bool = False) -> None:
    """The sparse-attention flags. ``selector=True`` adds where lastq/asyncspade select (``--selector``,
    ``--on-late``): timing, not results, so evaluations that compare selections leave it out (``auto``: see
    :mod:`asyncspade.placement`)."""
    d = SparseConfig()
    g = p.add_argument_group("sparse attention")
    if multi:
        g.add_argument("--methods", default=method_default,
                       help=f"comma-separated methods to compare, from: {', '.join(METHODS)}")
    else:
        g.add_argument("--method", default=method_default, help=f"attention method: {', '.join(METHODS)}")
    g.add_argument("--budget", type=int, default=d.budget, help="tokens attended per sparse layer and KV head, "
                   f"sinks and recent window included (default {d.budget}; full attention has none)")
    g.add_argument("--page-size", type=int, default=d.page_size,
                   help=f"page size of Quest and of the page prefilter (default {d.page_size})")
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
                   help="refine/hybrid: candidates kept by the ahead pass, in multiples of k "
                   f"(default {d.superset})")
    g.add_argument("--prefilter", default=d.prefilter, choices=list(PREFILTERS),
                   help="asyncspade/lastq step-ahead pass: score every token from a 4-bit copy of the keys the store "
                   "keeps (sketch: a quarter of the key bytes), rank pages by their min/max bound with the forecast "
                   "query and take the best pages' tokens (pages: an eighth, coarser), or score every key exactly "
                   f"(none) (default {d.prefilter})")
    g.add_argument("--check", type=int, default=d.check,
                   help="asyncspade/lastq with --refine: the layer's true query adds its best N tokens of the whole "
                   "cache, scored from a 4-bit key copy, to the forecast's candidates in-line: the tokens no forecast "
                   "saw coming (reads a quarter of the key bytes every step) (default "
                   f"{d.check})")
    g.add_argument("--min-candidates", type=int, default=d.min_candidates,
                   help=f"with --refine: at least this many candidates (default {d.min_candidates})")
    g.add_argument("--refine", action=argparse.BooleanOptionalAction, default=d.refine,
                   help="asyncspade/lastq: the ahead pass proposes max(--superset x k, --min-candidates) candidates "
                   "and the layer's true query picks the exact top-k among them in-line (--no-refine: the ahead "
                   f"selection is final, as in the paper) (default {'on' if d.refine else 'off'})")
    g.add_argument("--refresh", type=int, default=d.refresh,
                   help=f"with --refine: run the step-ahead pass every N steps, N <= --recent (default {d.refresh})")
    g.add_argument("--min-sparse", type=int, default=d.min_sparse, metavar="N",
                   help="caches up to N tokens decode densely (default: measured at start by the cost model, the "
                   "length from which sparse attention is cheaper on this machine; 0: sparse from the budget on)")
    g.add_argument("--aggregate", default=d.aggregate, choices=["sum", "max"],
                   help=f"GQA: combine per-head softmax scores by sum or max (default {d.aggregate})")
    if selector:
        g.add_argument("--selector", default="auto", choices=["auto", "async", "sync", "thread", "dist"],
                       help="where lastq/asyncspade select: auto (the cache-rank worker when the machine has a core "
                       "for it beyond the decode loop's two, else in-process: BENCHMARKS.md measures why), async "
                       "(the cache-rank worker process over shared memory, off the decode loop's critical path; sync "
                       "with a warning when /dev/shm is too small for the KV store and auto chose it), dist (a cache "
                       "rank over torch.distributed with its own key copy, for another device or host), thread (a "
                       "thread of the decode loop's process), or sync (in-process, when each selection becomes "
                       "possible) (default auto)")
        g.add_argument("--on-late", default="wait", choices=["wait", "reuse"],
                       help="async selection not ready when the layer needs it: wait for it, or reuse the previous "
                       "step's set (default wait)")


def engine_options(args) -> dict:
    """The engine's format settings from the model flags (``Engine(..., **engine_options(args))``)."""
    return {"weights": args.weights, "kv_dtype": args.kv_dtype, "device": args.device}


def add_data_arg(p: argparse.ArgumentParser) -> None:
    from ..data import DATA_ENV, REPO_DATA
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help=f"directory of the shared data files (default: ${DATA_ENV}, else {REPO_DATA})")


def sparse_from_args(args, method: str | None = None) -> SparseConfig:
    cfg = SparseConfig(method=method or getattr(args, "method", "full"), budget=args.budget, page_size=args.page_size,
                       sink=args.sink, recent=args.recent, dense_layers=args.dense_layers, predictor=args.predictor,
                       lead=args.lead, window=args.window, order=args.order, ridge=args.ridge,
                       ridge_kind=args.ridge_kind, superset=args.superset, aggregate=args.aggregate,
                       prefilter=args.prefilter, refine=args.refine, refresh=args.refresh, check=args.check,
                       min_sparse=args.min_sparse, min_candidates=args.min_candidates)
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


def say(msg: str) -> None:
    print(f"[asyncspade] {msg}", file=sys.stderr, flush=True)


def load(args, progress=None):
    """Load the model from ``--model/--dtype``, reporting progress on stderr."""
    from ..models import load_model, parse_dtype
    return load_model(args.model, parse_dtype(args.dtype), progress=progress or say)


def check_model_len(max_model_len: int | None, model) -> None:
    """A context beyond the model's positions is allowed (speed runs), with a warning: outputs there are unreliable."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if max_model_len and limit and max_model_len > limit:
        say(f"warning: --max-model-len {max_model_len} exceeds the model's {limit} positions; tokens past {limit} "
            "are decoded at positions it was not trained for")


def utf8_text(value: str, what: str) -> str:
    """``value`` if it is valid UTF-8 text, else a :class:`UserError` naming ``what`` (command-line arguments and
    stdin reach Python with undecodable bytes as surrogates, which a tokenizer would fail on after the model load)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = value[e.start].encode("utf-8", "surrogateescape")[:1]
        raise UserError(f"{what} is not valid UTF-8 text (byte 0x{byte.hex() or '??'} at character {e.start})") \
            from None
    return value


def check_utf8_args(parser: argparse.ArgumentParser, args) -> None:
    """Every text argument must be UTF-8 (checked before any model loads)."""
    flags = {a.dest: max(a.option_strings, key=len) if a.option_strings else a.dest for a in _actions(parser)}
    for dest, value in vars(args).items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str):
                utf8_text(v, flags.get(dest, dest))


def _actions(parser: argparse.ArgumentParser):
    for a in parser._actions:
        yield a
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                yield from _actions(sub)


def data_default(args, attr: str, name: str) -> str:
    """``args.<attr>`` as given, or the shared data file ``name`` from the data directory (``--data-dir``,
    ``$ASYNCSPADE_DATA``, the repository default), whatever the working directory; a :class:`UserError` naming the
    three when it is missing."""
    from ..data import DataNotFound, data_file
    if getattr(args, attr) is None:
        try:
            setattr(args, attr, str(data_file(name, getattr(args, "data_dir", None))))
        except DataNotFound as e:
            raise UserError(str(e)) from None
    return getattr(args, attr)
