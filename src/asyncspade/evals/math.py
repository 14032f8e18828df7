"""``asyncspade eval math``: math accuracy with several samples per problem and majority voting, per method.

All samples of all pending problems are queued at once, so the engine keeps ``--max-batch`` of them in flight
(samples of several problems side by side, as in test-time scaling). Each sample's seed derives from ``--seed``, the
data set, the problem and the sample index, so every method sees the same random numbers and a resumed run
samples what an uninterrupted one would (up to floating-point effects of a different batch composition).

Resuming: with ``--out DIR`` every finished problem is appended at once to ``DIR/math-<method>.jsonl`` (one line
per problem, full texts included); a rerun with the same settings skips those problems. ``DIR/math-settings.json``
records the settings, and a rerun with different ones is refused rather than mixing results.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from ..cli.args import UserError, add_data_arg, add_model_args, add_sparse_args, data_default, load, \
    methods_from_args, sparse_from_args
from ..engine import Engine
from ..models import encode_prompt
from ..sampling import SamplingParams
from .math_data import build_messages, extract_answer, is_correct, load_problems, majority_vote

DEFAULT_DATA = "gsm8k_test.jsonl"          # in the data directory
TIMING = ("wall_s", "tpot_s")     # per-run measurements: they differ between runs, everything else must not


def add_arguments(p) -> None:
    add_model_args(p)
    add_sparse_args(p, "full,asyncspade", multi=True)
    g = p.add_argument_group("math")
    g.add_argument("--data", default=None, help="JSONL problems: gsm8k_test, math500_test, aime24, aime25 "
                   f"(default: {DEFAULT_DATA} in the data directory)")
    add_data_arg(g)
    g.add_argument("--limit", type=int, default=None, help="only the first N problems")
    g.add_argument("--n-samples", type=int, default=4, help="samples per problem (default 4)")
    g.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    g.add_argument("--max-new-tokens", type=int, default=512, help="generated tokens per sample at most (default 512)")
    g.add_argument("--max-batch", type=int, default=8, help="samples decoded concurrently (default 8)")
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="apply the model's chat template (default on)")
    g.add_argument("--seed", type=int, default=0, help="base seed of the per-sample seeds (default 0)")
    g.add_argument("--out", default=None, metavar="DIR", help="keep finished problems here and skip them on a rerun")
    g.add_argument("--json", default=None, metavar="PATH", help="write the summary as JSON")


def sample_seed(seed: int, source: str, pid: str, index: int) -> int:
    """A seed per (problem, sample), stable across runs, processes and methods."""
    digest = hashlib.sha256(f"{seed}/{source}/{pid}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _check(args) -> None:
    if args.n_samples < 1:
        raise UserError(f"--n-samples must be >= 1, got {args.n_samples}")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    if args.max_new_tokens < 1 or args.max_batch < 1:
        raise UserError("--max-new-tokens and --max-batch must be >= 1")
    try:
        SamplingParams(temperature=args.temperature, top_p=args.top_p).validate()
    except ValueError as e:
        raise UserError(str(e)) from None


def _settings(args, configs: dict) -> dict:
    """What decides the results; ``--limit``, ``--max-batch`` and the output paths do not."""
    return {"eval": "math", "data": str(Path(args.data).resolve()), "model": args.model, "dtype": args.dtype,
            "chat": args.chat, "n_samples": args.n_samples, "temperature": args.temperature, "top_p": args.top_p,
            "max_new_tokens": args.max_new_tokens, "seed": args.seed,
            "methods": {m: ({"method": "full"} if m == "full" else cfg.to_dict()) for m, cfg in configs.items()}}


class Store:
    """Finished problems under ``--out``: one JSONL file per method, appended and flushed per problem."""

    def __init__(self, out: str | None, settings: dict):
        self.dir = Path(out) if out else None
        self.files = {}
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "math-settings.json"
        try:
            saved = json.loads(path.read_text()) if path.is_file() else None
        except ValueError:
            raise UserError(f"{path} is not valid JSON; remove it or use another --out directory") from None
        if saved is not None:
            common = {k: v for k, v in settings.items() if k != "methods"}
            diff = [k for k, v in common.items() if saved.get(k) != v]
            diff += [m for m, c in settings["methods"].items() if saved.get("methods", {}).get(m, c) != c]
            if diff:
                raise UserError(f"{self.dir} holds a run with other settings ({', '.join(diff)}); "
                                "use another --out directory")
            settings = {**settings, "methods": {**saved.get("methods", {}), **settings["methods"]}}
        path.write_text(json.dumps(settings, indent=1))

    def load(self, method: str) -> dict[str, dict]:
        """Finished problems of ``method`` by id; a line cut by a crash is dropped (and removed)."""
        if self.dir is None:
            return {}
        path = self.dir / f"math-{method}.jsonl"
        if not path.is_file():
            return {}
        done, lines = {}, path.read_text(encoding="utf-8").splitlines()
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "id" in rec:
                done[rec["id"]] = rec
        if len(done) != len([ln for ln in lines if ln.strip()]):
            path.write_text("".join(json.dumps(r) + "\n" for r in done.values()), encoding="utf-8")
        return done

    def add(self, method: str, rec: dict) -> None:
        if self.dir is None:
            return
        if method not in self.files:
            self.files[method] = open(self.dir / f"math-{method}.jsonl", "a", encoding="utf-8")
        f = self.files[method]
        f.write(json.dumps(rec) + "\n")
        f.flush()

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def _record(problem, seqs, seeds: list[int], wall_s: float) -> dict:
    answers = [extract_answer(s.text) for s in seqs]
    vote = majority_vote(answers, problem.answer)
    return {"id": problem.id, "source": problem.source, "gold": problem.answer, "vote": vote,
            "vote_correct": is_correct(vote, problem.answer), "wall_s": wall_s,
            "samples": [{"seed": sd, "answer": a, "correct": is_correct(a, problem.answer), "tokens": len(s.output_ids),
                         "finish": s.finish_reason, "tpot_s": s.tpot_s, "text": s.text}
                        for s, a, sd in zip(seqs, answers, seeds)]}


def decode_problems(model, tokenizer, cfg, problems, args, on_record, bar=None) -> None:
    """Sample every problem ``args.n_samples`` times under ``cfg``; ``on_record(rec)`` as each problem finishes.

    ``wall_s`` of a problem is the wall time since the previous problem finished (since the start for the first):
    the run's time split over its problems, so tokens/s can be summed over resumed runs.
    """
    prompts = [encode_prompt(tokenizer, build_messages(p.question), chat=args.chat) for p in problems]
    limit = model.config.max_position_embeddings
    engine = Engine(model, tokenizer, cfg, max_batch=args.max_batch,
                    max_tokens=min(limit, max(map(len, prompts)) + args.max_new_tokens))
    try:
        owner, left, seqs, seeds = {}, {}, {}, {}
        for p, ids in zip(problems, prompts):
            seeds[p.id] = [sample_seed(args.seed, p.source, p.id, i) for i in range(args.n_samples)]
            seqs[p.id] = [engine.add(ids, SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature,
                                                         top_p=args.top_p, seed=sd)) for sd in seeds[p.id]]
            owner.update({s.id: p for s in seqs[p.id]})
            left[p.id] = args.n_samples
        last = time.perf_counter()

        def on_event(ev):
            nonlocal last
            if not ev.finished:
                return
            if bar is not None:
                bar.update(1)
            p = owner[ev.seq.id]
            left[p.id] -= 1
            if left[p.id] == 0:
                now = time.perf_counter()
                on_record(_record(p, seqs[p.id], seeds[p.id], now - last))
                last = now

        engine.run([s for group in seqs.values() for s in group], on_event)
    finally:
        engine.close()


def summarize(records: list[dict]) -> dict:
    samples = [s for r in records for s in r["samples"]]
    lengths = [s["tokens"] for s in samples]
    wall = sum(r["wall_s"] for r in records)
    return {
        "problems": len(records),
        "samples": len(samples),
        "pass@1": sum(s["correct"] for s in samples) / len(samples),
        "majority": sum(r["vote_correct"] for r in records) / len(records),
        "mean_len": sum(lengths) / len(lengths),
        "max_len": max(lengths),
        "truncated": sum(s["finish"] == "length" for s in samples) / len(samples),
        "tokens_per_s": sum(lengths) / wall if wall > 0 else 0.0,
        "tpot_ms": 1000 * sum(s["tpot_s"] for s in samples) / len(samples),
        "per_problem": [{"id": r["id"], "gold": r["gold"], "vote": r["vote"], "vote_correct": r["vote_correct"],
                         "answers": [s["answer"] for s in r["samples"]],
                         "correct": [s["correct"] for s in r["samples"]],
                         "lengths": [s["tokens"] for s in r["samples"]]} for r in records],
    }


def _table(results: dict, n: int) -> str:
    head = f"{'method':<12}{'problems':>9}{'pass@1':>8}{f'maj@{n}':>8}{'mean len':>9}{'max len':>8}{'tok/s':>8}"
    rows = [f"{m:<12}{r['problems']:>9}{r['pass@1']:>8.1%}{r['majority']:>8.1%}{r['mean_len']:>9.0f}"
            f"{r['max_len']:>8}{r['tokens_per_s']:>8.1f}" for m, r in results.items()]
    return "\n".join([head, *rows])


def run(args) -> int:
    _check(args)
    methods = methods_from_args(args)
    configs = {m: sparse_from_args(args, m) for m in methods}
    if not Path(data_default(args, "data", DEFAULT_DATA)).is_file():
        raise UserError(f"data file not found: {args.data}")
    try:
        problems = load_problems(args.data, args.limit)
    except ValueError as e:
        raise UserError(str(e)) from None
    if not problems:
        raise UserError(f"no problems in {args.data}")
    settings = _settings(args, configs)
    store = Store(args.out, settings)
    done = {m: store.load(m) for m in methods}
    pending = {m: [p for p in problems if p.id not in done[m]] for m in methods}
    results = {}
    try:
        if any(pending.values()):
            model, tokenizer = load(args)
            total = sum(map(len, pending.values())) * args.n_samples
            with tqdm(total=total, desc="math", unit="sample", file=sys.stderr) as bar:
                for m in methods:
                    bar.set_postfix_str(m)

                    def keep(rec, m=m):
                        store.add(m, rec)
                        done[m][rec["id"]] = rec
                        votes = [r["vote_correct"] for r in done[m].values()]
                        bar.set_postfix_str(f"{m} maj {sum(votes)}/{len(votes)}")
                    if pending[m]:
                        decode_problems(model, tokenizer, configs[m], pending[m], args, keep, bar)
    finally:
        store.close()
    for m in methods:
        results[m] = {**summarize([done[m][p.id] for p in problems]), "config": settings["methods"][m]}
    print(_table(results, args.n_samples))
    if args.json:
        settings["problems"] = len(problems)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"settings": settings, **results}, indent=1))
    return 0
