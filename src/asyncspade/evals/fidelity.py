"""Teacher-forced fidelity of sparse vs dense decoding, every method side by side in one pass over the data.

Each window of tokens (a reasoning trace: prompt + output; or a cut of plain text, the Quest perplexity protocol)
is prefilled densely up to ``prefill`` and then fed token by token through the decode path of one engine per
(method, budget) and of one dense reference engine, all stepped in lockstep on the same model. At every decode step
the sparse logits are compared with the dense ones: top-1 agreement, KL(dense || sparse), and the NLL of the true
next token (-> perplexity). A probe inside the sparse layers measures what the selection covers: attention-mass
recall against the true dense attention, overlap with the oracle top-k set, and cosine(forecast query, true query)
for the methods that select ahead (read from ``selector.forecast``). ``--predictors`` puts several asyncspade
forecasters (ridge kinds, cross-layer leads) side by side in the same pass.

Every metric counts only the steps whose cache exceeds the budget (before that, sparse attention *is* dense).
Trace prompts are fed as raw text by default: they already carry another model's template (R1-distill, ending in
``<think>``); ``--chat`` wraps them in the loaded model's chat template instead.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..cli.args import (UserError, add_data_arg, add_model_args, add_sparse_args, data_default, engine_options,
                        int_list, load, methods_from_args, sparse_from_args)
from ..config import PREDICTORS, RIDGE_KINDS, WEIGHT_FORMATS, SparseConfig, sparse_at
from ..data import trace_texts
from ..engine import Engine
from ..models import encode_prompt
from ..sampling import SamplingParams
from ..scoring import topk_tokens

DEFAULT_DATA = "reasoning_traces.jsonl"          # in the data directory
TEXT_MAX_TOKENS, TEXT_PREFILL, TEXT_WINDOWS = 4096, 1024, 4
REF = "full (reference)"


@dataclass
class Window:
    ids: list[int]
    prefill: int           # tokens prefilled densely; the rest is decoded teacher-forced


# ------------------------------------------------------------------------------------------------------------ data
def data_path(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--data {path}: no such file (give a .jsonl of reasoning traces or a plain-text file)")
    return path


def read_windows(path: str | Path, tokenizer, context: int, *, chat: bool = False, limit: int | None = None,
                 max_tokens: int | None = None, prefill: int | None = None,
                 windows: int = TEXT_WINDOWS) -> list[Window]:
    """JSONL reasoning traces (fields ``prompt``, ``output``) or windows of a plain-text file, as token windows."""
    path = data_path(path)
    if path.suffix == ".jsonl":
        return _trace_windows(path, tokenizer, min(max_tokens or context - 1, context - 1), chat, limit, prefill)
    return _text_windows(path, tokenizer, min(max_tokens or TEXT_MAX_TOKENS, context - 1),
                         TEXT_PREFILL if prefill is None else prefill, windows)


def _trace_windows(path, tokenizer, max_tokens, chat, limit, prefill) -> list[Window]:
    out = []
    try:
        traces = trace_texts(path)
    except ValueError as e:
        raise UserError(str(e)) from None
    for prompt, output in traces:
        if limit is not None and len(out) >= limit:
            break
        p = encode_prompt(tokenizer, prompt, chat=chat)
        ids = (p + tokenizer(output, add_special_tokens=False)["input_ids"])[:max_tokens]
        n_pre = len(p) if prefill is None else prefill
        if n_pre < len(ids) - 1:            # at least two decoded tokens (one with a true next token)
            out.append(Window(ids, n_pre))
    if not out:
        raise UserError(f"{path}: no trace longer than its prefill (+2 tokens) within --max-tokens {max_tokens}")
    return out


def _text_windows(path, tokenizer, max_tokens, prefill, count) -> list[Window]:
    if prefill >= max_tokens - 1:
        raise UserError(f"--prefill ({prefill}) must be smaller than --max-tokens - 1 ({max_tokens - 1})")
    text = path.read_text(encoding="utf-8", errors="replace")
    ids = tokenizer(text[:count * max_tokens * 8], add_special_tokens=False)["input_ids"]   # >= 1 char per token
    out = [Window(ids[o:o + max_tokens], prefill) for o in range(0, len(ids) - max_tokens + 1, max_tokens)][:count]
    if not out:
        raise UserError(f"{path}: shorter than one window of {max_tokens} tokens ({len(ids)} tokens)")
    return out


# ------------------------------------------------------------------------------------------------------------ metrics
class Meter:
    """Running means of named metrics, overall and per position bin (for the plot)."""

    def __init__(self, bin_width: int):
        self.bin_width = bin_width
        self.sum: dict[str, float] = defaultdict(float)
        self.n: dict[str, int] = defaultdict(int)
        self.bins: dict[str, dict[int, list]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0]))

    def add(self, name: str, values: torch.Tensor, pos: torch.Tensor | None = None) -> None:
        values = values.double()
        self.sum[name] += float(values.sum())
        self.n[name] += values.numel()
        if pos is not None:
            for b, v in zip((pos // self.bin_width).tolist(), values.tolist()):
                cell = self.bins[name][b]
                cell[0] += v
                cell[1] += 1

    def mean(self, name: str) -> float | None:
        return self.sum[name] / self.n[name] if self.n[name] else None

    def curve(self, name: str) -> tuple[list[float], list[float]]:
        cells = sorted(self.bins[name].items())
        return [(b + 0.5) * self.bin_width for b, _ in cells], [s / n for _, (s, n) in cells]


def selected(sel, batch, cfg) -> torch.Tensor:
    """``[B, KVH, k]`` bool: the entries of a selection the attention takes (valid, and within the positions
    between the sinks and the recent window, as the attention's limits require)."""
    idx = sel.idx
    ok = (idx >= cfg.sink) & (idx < (batch.lengths - cfg.recent).view(-1, 1, 1))
    return ok if sel.valid is None else ok & sel.valid


def attended_mask(sel, batch, cfg, n: int) -> torch.Tensor:
    """``[B, KVH, n]`` bool: the positions a sparse decode step attends (sinks | selection | recent window), every
    cached position for rows whose cache fits in the budget."""
    b, kvh, _ = sel.idx.shape
    w = selected(sel, batch, cfg).float()
    att = torch.zeros(b, kvh, n).scatter_add_(-1, sel.idx.clamp(0, n - 1), w) > 0
    pos = torch.arange(n)
    lengths = batch.lengths[:, None]
    att |= ((pos < cfg.sink) | ((pos >= lengths - cfg.recent) & (pos < lengths)))[:, None, :]
    dense = (~cfg.sparse_at(batch.lengths))[:, None, None] & (pos < lengths)[:, None, :]
    return att | dense


class Probe:
    """``engine.rt.probe``: per sparse layer and decode step, what the selection covers, for rows past the budget."""

    def __init__(self, engine: Engine, meter: Meter):
        self.engine, self.meter = engine, meter
        self.rt, self.cfg = engine.rt, engine.rt.cfg

    def __call__(self, layer: int, q: torch.Tensor, batch, sel) -> None:
        cfg, slots = self.cfg, self.engine.slots
        rows = [r for r in range(batch.size) if slots[batch.lo + r] is not None and cfg.sparse_at(batch.lengths[r])]
        if sel is None or not rows:
            return
        rows = torch.tensor(rows)
        pos = batch.start[rows]
        keys = self.engine.store.keys(layer, batch)                                 # [B, KVH, n, D]
        b, h, d = q.shape
        kvh, n = keys.shape[1], keys.shape[2]
        # true dense attention of every query head
        s = torch.matmul(q.float().view(b, kvh, h // kvh, d), keys.float().transpose(-1, -2)) * self.rt.scale
        s = s.masked_fill((torch.arange(n) >= batch.lengths[:, None]).view(b, 1, 1, n), float("-inf"))
        attended = attended_mask(sel, batch, cfg, n)
        recall = (s.softmax(-1) * attended[:, :, None]).sum(-1).mean((1, 2))
        self.meter.add("attn_recall", recall[rows], pos)
        if cfg.method != "oracle":
            oracle = topk_tokens(q, keys, cfg.sink, batch.lengths - cfg.recent, cfg.k_mid, self.rt.scale, cfg.aggregate)
            in_oracle = torch.zeros(b, kvh, n, dtype=torch.bool).scatter_(-1, oracle, True)
            hit = in_oracle.gather(-1, sel.idx.clamp(0, n - 1)) & selected(sel, batch, cfg)
            self.meter.add("overlap", hit.sum(-1).float().mean(1)[rows] / cfg.k_mid)
        # the query that chose this selection (the in-process selector keeps it per slot)
        forecast = getattr(self.rt.selector, "forecast", None)
        if forecast is not None:
            q_hat = forecast(layer, batch)
            self.meter.add("cosine", F.cosine_similarity(q_hat.float(), q.float(), dim=-1).mean(1)[rows])


def _score(meter: Meter, dense: dict, sparse: dict, windows: list[Window], budget: int | None) -> None:
    """Compare one decode step's logits ``{record: (fed, logits [V])}`` of a method with the dense reference."""
    if sorted(sparse) != sorted(dense):
        raise RuntimeError("engines fell out of lockstep")
    recs = [r for r in sorted(dense) if budget is None or sparse_at(dense[r][0] + 1, budget)]   # sparse this step
    if not recs:
        return
    pos = torch.tensor([dense[r][0] for r in recs])
    ld = torch.stack([dense[r][1] for r in recs]).float().log_softmax(-1)
    ls = torch.stack([sparse[r][1] for r in recs]).float().log_softmax(-1)
    meter.add("kl", (ld.exp() * (ld - ls)).sum(-1), pos)
    meter.add("top1", (ld.argmax(-1) == ls.argmax(-1)).float())
    ids = [windows[r].ids for r in recs]
    nxt = torch.tensor([t[p + 1] if p + 1 < len(t) else -1 for t, p in zip(ids, pos.tolist())])   # true next token
    has = (nxt >= 0).nonzero()[:, 0]
    if len(has):
        meter.add("nll", -ls[has, nxt[has]])
        meter.add("nll_dense", -ld[has, nxt[has]])


def compare(model, tokenizer, windows: list[Window], configs: dict[str, SparseConfig], batch: int = 4,
            bin_width: int = 256, progress: bool = True, options: dict | None = None,
            ref_options: dict | None = None, config_options: dict[str, dict] | None = None
            ) -> tuple[dict, dict[str, Meter]]:
    """Run every window through a dense reference and every config in lockstep; returns (results, meters).

    ``options`` are engine settings (weight format, KV dtype) for every engine; ``ref_options`` override them for
    the reference and ``config_options[name]`` for one config (comparing formats: a fp32 reference)."""
    max_tokens = max(len(w.ids) for w in windows) + 1
    options, config_options = options or {}, config_options or {}

    def engine(cfg, extra):
        return Engine(model, tokenizer, cfg, max_batch=batch, max_tokens=max_tokens, **{**options, **extra})
    engines = {REF: engine(SparseConfig(), ref_options or {})}
    engines.update({k: engine(c, config_options.get(k, {})) for k, c in configs.items()})
    meters = {k: Meter(bin_width) for k in configs}
    got: dict[str, dict] = {}
    try:
        for name, eng in engines.items():
            record = {}
            for i, w in enumerate(windows):
                s = eng.add(w.ids, SamplingParams(max_tokens=1, ignore_eos=True), decode_tail=len(w.ids) - w.prefill)
                record[s.id] = i

            def hook(seqs, logits, name=name, record=record):
                got[name] = {record[s.id]: (s.fed, logits[j]) for j, s in enumerate(seqs)}
            eng.logits_hook = hook
            if name in meters and eng.rt.cfg.sparse:
                eng.rt.probe = Probe(eng, meters[name])
        bar = tqdm(total=sum(len(w.ids) - w.prefill for w in windows), desc="fidelity", unit="tok", file=sys.stderr,
                   disable=not progress, dynamic_ncols=True)
        while engines[REF].has_work():
            got.clear()
            for eng in engines.values():
                eng.step()
            dense = got.pop(REF, {})
            for name, cfg in configs.items():
                _score(meters[name], dense, got.get(name, {}), windows, cfg.budget if cfg.sparse else None)
            bar.update(len(dense))
        bar.close()
    finally:
        for eng in engines.values():
            eng.close()
    return {k: _result(c, meters[k]) for k, c in configs.items()}, meters


def _result(cfg: SparseConfig, m: Meter) -> dict:
    def ppl(name):
        v = m.mean(name)
        return None if v is None else math.exp(v)
    steps = m.n["top1"]
    overlap = 1.0 if cfg.method == "oracle" and m.n["attn_recall"] else m.mean("overlap")
    return {"method": cfg.method, "budget": cfg.budget if cfg.sparse else None, "top1_agreement": m.mean("top1"), "kl_mean": m.mean("kl"),
            "ppl": ppl("nll"), "ppl_dense": ppl("nll_dense"), "attn_recall": m.mean("attn_recall"),
            "overlap": overlap, "cosine": m.mean("cosine"), "steps": steps}


# ------------------------------------------------------------------------------------------------------------ output
COLUMNS = [("budget", "budget", "{}"), ("steps", "steps", "{}"),
           ("top1_agreement", "top-1", "{:.4f}"), ("kl_mean", "KL", "{:.5f}"), ("ppl_dense", "ppl dense", "{:.3f}"),
           ("ppl", "ppl sparse", "{:.3f}"), ("attn_recall", "attn recall", "{:.4f}"), ("overlap", "overlap", "{:.4f}"),
           ("cosine", "cos(q^,q)", "{:.4f}")]


def format_table(results: dict) -> str:
    """A Markdown table, one row per method@budget."""
    head = ["method"] + [c[1] for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for name, r in results.items():
        cells = [name.rsplit("@", 1)[0]] + ["-" if r[k] is None else fmt.format(r[k]) for k, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(meters: dict[str, Meter], path: str | Path, title: str) -> None:
    """KL and attention recall vs position in the window, binned, one line per method@budget."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = ((axes[0], "kl", "KL(dense || sparse)"), (axes[1], "attn_recall", "attention-mass recall"))
    for ax, metric, label in panels:
        for name, m in meters.items():
            x, y = m.curve(metric)
            if x:
                ax.plot(x, y, marker=".", label=name)
        ax.set_xlabel("position in the window (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("symlog", linthresh=1e-3)
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------------ CLI
def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_sparse_args(p, "oracle,quest,lastq,asyncspade,streaming", multi=True)
    g = p.add_argument_group("fidelity")
    g.add_argument("--data", default=None, help="JSONL reasoning traces (prompt + output) or a plain-text file cut "
                   f"into windows (default: {DEFAULT_DATA} in the data directory)")
    add_data_arg(g)
    g.add_argument("--chat", action="store_true", help="traces: wrap the prompt in the model's chat template (default: "
                   "raw text, the prompts already carry the trace model's template)")
    g.add_argument("--limit", type=_positive, default=None,
                   help="traces: only the first N records longer than their prefill")
    g.add_argument("--windows", type=_positive, default=TEXT_WINDOWS,
                   help=f"text: number of consecutive windows (default {TEXT_WINDOWS})")
    g.add_argument("--max-tokens", type=_positive, default=None, help="tokens per window (default: traces whole, up "
                   f"to the model's context; text {TEXT_MAX_TOKENS})")
    g.add_argument("--prefill", type=_positive, default=None, help="tokens prefilled densely, the rest decoded "
                   f"teacher-forced (default: traces their prompt; text {TEXT_PREFILL})")
    g.add_argument("--budgets", default=None, help="comma-separated budgets to compare (overrides --budget)")
    g.add_argument("--predictors", default=None, metavar="LIST", help="asyncspade: compare forecasters in one pass, "
                   "comma-separated PREDICTOR[:X], X a ridge kind for ridge or the lead for xlayer/hybrid, e.g. "
                   "ridge:ar,ridge:last,xlayer:2,hybrid:1 (default: --predictor alone)")
    g.add_argument("--variants", default=None, metavar="LIST",
                   help="asyncspade: compare settings in one pass, comma-separated, each FIELD=VALUE joined by '+', "
                   "e.g. default,superset=2,refine=0+prefilter=none (fields of SparseConfig; default: the settings as "
                   "given)")
    g.add_argument("--formats", default=None, metavar="LIST",
                   help="instead of methods: compare weight/KV formats of dense decoding with an fp32/fp32 reference, "
                   "comma-separated WEIGHTS/KV, e.g. int8/bf16,int4/bf16,bf16/bf16 (every step counts)")
    g.add_argument("--max-batch", dest="batch", type=_positive, default=4,
                   help="windows decoded together per engine (default 4)")
    g.add_argument("--batch", dest="batch", type=_positive, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    g.add_argument("--json", default=None, metavar="PATH", help="write settings and results as JSON")
    g.add_argument("--plot", default=None, metavar="PATH.png", help="plot KL and recall vs position")


def predictor_variants(text: str) -> dict[str, dict]:
    """``"ridge:mean,xlayer:2"`` -> ``{"ridge:mean": {"predictor": "ridge", "ridge_kind": "mean"}, ...}``."""
    out = {}
    for item in (x.strip() for x in text.split(",") if x.strip()):
        pred, _, x = item.partition(":")
        if pred not in PREDICTORS:
            raise UserError(f"--predictors: unknown predictor {pred!r}; choose from: {', '.join(PREDICTORS)}")
        changes = {"predictor": pred}
        if x and pred == "ridge":
            if x not in RIDGE_KINDS:
                raise UserError(f"--predictors: unknown ridge kind {x!r}; choose from: {', '.join(RIDGE_KINDS)}")
            changes["ridge_kind"] = x
        elif x:
            if not x.isdigit():
                raise UserError(f"--predictors: the lead of {pred} must be a positive integer, got {x!r}")
            changes["lead"] = int(x)
        out[item] = changes
    if not out:
        raise UserError("--predictors is empty")
    return out


def setting_variants(text: str) -> dict[str, dict]:
    """``"refine=1+superset=2,prefilter=none"`` -> ``{"refine=1+superset=2": {"refine": True, "superset": 2}, ...}``
    (values converted to the field's type); ``default`` is the settings unchanged."""
    fields = {f.name: f for f in dataclasses.fields(SparseConfig)}
    out = {}
    for item in (x.strip() for x in text.split(",") if x.strip()):
        changes = {}
        if item == "default":                  # the settings as given, beside the variants
            out[item] = changes
            continue
        for part in item.split("+"):
            key, _, val = part.partition("=")
            if key not in fields or key in ("method", "budget") or not val:
                raise UserError(f"--variants: {part!r} is not FIELD=VALUE with FIELD a sparse setting")
            default = getattr(SparseConfig(), key)
            kind = type(default) if default is not None else int
            try:
                changes[key] = val.lower() in ("1", "true", "on", "yes") if kind is bool else kind(val)
            except ValueError:
                raise UserError(f"--variants: {part!r}: {val!r} is not a {kind.__name__}") from None
        out[item] = changes
    if not out:
        raise UserError("--variants is empty")
    return out


def configs_from_args(args) -> dict[str, SparseConfig]:
    """``"<method>@<budget>"`` (``"asyncspade[<variant>]@<budget>"`` with ``--predictors``) -> settings."""
    methods = methods_from_args(args)
    budgets = int_list(args.budgets, "--budgets") if args.budgets else [args.budget]
    variants = predictor_variants(args.predictors) if args.predictors else None
    if args.variants:
        variants = {**(variants or {}), **setting_variants(args.variants)}
    configs = {}
    for b in budgets:
        for m in methods:
            cfg = sparse_from_args(argparse.Namespace(**{**vars(args), "budget": b}), m)
            if cfg.min_sparse is None:
                cfg = cfg.replace(min_sparse=0)       # measure the method on every step past the budget
            if m == "asyncspade" and variants:
                configs.update({f"{m}[{v}]@{b}": cfg.replace(**c).validate() for v, c in variants.items()})
            else:
                configs[f"{m}@{b}"] = cfg
    return configs


def format_variants(text: str) -> dict[str, dict]:
    """``"int8/bf16,int4/bf16"`` -> ``{"int8/bf16": {"weights": "int8", "kv_dtype": "bf16"}, ...}``."""
    out = {}
    for item in (x.strip() for x in text.split(",") if x.strip()):
        w, _, kv = item.partition("/")
        if w not in WEIGHT_FORMATS or kv not in ("fp32", "bf16"):
            raise UserError(f"--formats: {item!r} is not WEIGHTS/KV with WEIGHTS in {', '.join(WEIGHT_FORMATS)} "
                            f"and KV in fp32, bf16")
        out[item] = {"weights": w, "kv_dtype": kv}
    if not out:
        raise UserError("--formats is empty")
    return out


def run(args) -> int:
    formats = format_variants(args.formats) if args.formats else None
    configs = {f"full[{f}]": SparseConfig() for f in formats} if formats else configs_from_args(args)
    data_path(data_default(args, "data", DEFAULT_DATA))         # fail before the model loads
    model, tok = load(args)
    windows = read_windows(args.data, tok, model.config.max_position_embeddings, chat=args.chat, limit=args.limit,
                           max_tokens=args.max_tokens, prefill=args.prefill, windows=args.windows)
    longest = max(len(w.ids) for w in windows)
    print(f"[asyncspade] {len(windows)} windows, {sum(len(w.ids) for w in windows)} tokens "
          f"({sum(len(w.ids) - w.prefill for w in windows)} decoded), longest {longest}", file=sys.stderr)
    kw = dict(batch=args.batch, bin_width=max(16, -(-longest // 32)), options=engine_options(args))
    if formats:
        kw.update(ref_options={"weights": "fp32", "kv_dtype": "fp32"},
                  config_options={f"full[{f}]": o for f, o in formats.items()})
    results, meters = compare(model, tok, windows, configs, **kw)
    print(format_table(results))
    base = next(iter(configs.values())).to_dict()
    settings = {"data": args.data, "model": args.model or "bundled SmolLM2-135M-Instruct", "dtype": args.dtype,
                "weights": args.weights, "kv_dtype": args.kv_dtype, "formats": args.formats,
                "windows": len(windows), "tokens": sum(len(w.ids) for w in windows),
                "decoded": sum(len(w.ids) - w.prefill for w in windows), "chat": args.chat,
                "max_tokens": args.max_tokens, "prefill": args.prefill, "batch": args.batch,
                "methods": methods_from_args(args), "predictors": args.predictors,
                "budgets": sorted({c.budget for c in configs.values()}),
                "sparse": {k: v for k, v in base.items() if k not in ("method", "budget")}}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"settings": settings, "results": results}, indent=1))
    if args.plot:
        plot(meters, args.plot, f"{Path(args.data).name}: {len(windows)} windows, {args.dtype}")
    return 0
