"""``asyncspade eval report DIR``: one Markdown report from the JSON results and PNG plots found under DIR.

Each ``*.json`` is recognised by its shape: fidelity (``settings`` + ``results`` keyed ``method@budget``), bench
(``rows`` of TPOT measurements), passkey and math (``settings.eval``, methods at the top level). Other JSON files are
listed as skipped. A plot whose name starts with a result's file stem is shown in that result's section; the other
plots are linked at the end.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..cli.args import UserError

KINDS = ("fidelity", "passkey", "math", "bench")
# one meaning, as in ``asyncspade bench``'s table: the method's TPOT over full's at the same context and batch
VS_FULL = "TPOT vs full"
VS_FULL_MEANS = "the method's TPOT divided by full attention's at the same context and batch (below 1: faster)."
BENCH_COLS = ("context", "batch", "budget", "method")


def add_arguments(p) -> None:
    p.add_argument("dir", help="directory with the JSON results (searched recursively)")
    p.add_argument("--md", dest="out", default=None, metavar="PATH", help="Markdown file to write (default "
                   "DIR/REPORT.md)")
    p.add_argument("--out", dest="out", default=argparse.SUPPRESS, help=argparse.SUPPRESS)   # its former name


def kind_of(data) -> str | None:
    """Which evaluation wrote ``data``, or None."""
    if not isinstance(data, dict):
        return None
    rows = data.get("rows")
    if isinstance(rows, list) and rows and all(isinstance(r, dict) and "tpot_s" in r for r in rows):
        return "bench"
    settings = data.get("settings")
    if isinstance(settings, dict) and settings.get("eval") in ("passkey", "math"):
        return settings["eval"]
    results = data.get("results")
    if isinstance(settings, dict) and isinstance(results, dict) and results and all("@" in k for k in results):
        return "fidelity"
    return None


def _fmt(v) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c if isinstance(c, str) else _fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _scalars(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _settings_line(settings: dict) -> str:
    """The scalar settings (and short lists) as one line."""
    items = []
    for k, v in settings.items():
        if isinstance(v, list) and len(v) <= 12 and all(not isinstance(x, (dict, list)) for x in v):
            items.append(f"`{k}={','.join(map(_fmt, v))}`")
        elif not isinstance(v, (dict, list)) and k != "eval":
            items.append(f"`{k}={_fmt(v)}`")
    return "Settings: " + ", ".join(items) if items else ""


def _methods(data: dict) -> dict:
    return {k: v for k, v in data.items() if k != "settings" and isinstance(v, dict)}


def ctx_label(c: int) -> str:
    """2048 -> "2K"."""
    return f"{c // 1024}K" if c % 1024 == 0 else str(c)


def render_passkey(data: dict) -> str:
    methods = _methods(data)
    contexts = data["settings"].get("contexts") or sorted({int(c) for r in methods.values() for c in r["by_context"]})
    depths = sorted({float(d) for r in methods.values() for d in r["by_depth"]})
    t1 = md_table(["method", "budget", "accuracy", "same as full"] + [ctx_label(c) for c in contexts],
                  [[m, "-" if m == "full" else _fmt(r.get("config", {}).get("budget")), _pct(r["accuracy"]),
                    _pct(r.get("same_as_full"))] + [_pct(r["by_context"].get(str(c))) for c in contexts]
                   for m, r in methods.items()])
    t2 = md_table(["method"] + [f"depth {d:.0%}" for d in depths],
                  [[m] + [_pct(r["by_depth"].get(f"{d:.3f}")) for d in depths] for m, r in methods.items()])
    return f"Accuracy by context:\n\n{t1}\n\nAccuracy by needle depth (all contexts):\n\n{t2}"


def render_math(data: dict) -> str:
    n = data["settings"].get("n_samples", "n")
    rows = [[m, r.get("problems"), r.get("samples"), _pct(r.get("pass@1")), _pct(r.get("majority")),
             f"{r.get('mean_len', 0):.0f}", r.get("max_len"), _pct(r.get("truncated")),
             f"{r.get('tokens_per_s', 0):.1f}", f"{r.get('tpot_ms', 0):.1f}"]
            for m, r in _methods(data).items()]
    return md_table(["method", "problems", "samples", "pass@1", f"maj@{n}", "mean len", "max len", "hit max",
                     "tokens/s", "TPOT ms"], rows)


def render_fidelity(data: dict) -> str:
    results = data["results"]
    cols: list[str] = []      # scalar metrics in order of appearance; method and budget are in the key
    for r in results.values():
        cols += [k for k in _scalars(r) if k not in cols and k not in ("method", "budget")]
    rows = [[key] + [r.get(c) for c in cols] for key, r in results.items()]
    return md_table(["method@budget"] + cols, rows)


def _sort_key(v) -> tuple:
    return (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))


def render_bench(data: dict) -> str:
    rows = data["rows"]
    full = {(r.get("context"), r.get("batch")): r["tpot_s"] for r in rows if r.get("method") == "full"}
    extra = [k for k in ("late_rate", "wait_s") if any(k in r for r in rows)]
    order = sorted(rows, key=lambda r: tuple(_sort_key(r.get(c)) for c in BENCH_COLS[:3]))   # methods in file order
    body = []
    for r in order:
        base = full.get((r.get("context"), r.get("batch")))
        ratio = f"{r['tpot_s'] / base:.2f}" if base and r["tpot_s"] else ""
        cells = [r.get(c) for c in BENCH_COLS] + [f"{1000 * r['tpot_s']:.2f}", ratio]
        for k in extra:
            v = r.get(k)
            cells.append(f"{1000 * v:.2f}" if k == "wait_s" and isinstance(v, (int, float)) else v)
        body.append(cells)
    header = list(BENCH_COLS) + ["TPOT ms", VS_FULL] + [("wait ms" if k == "wait_s" else k) for k in extra]
    text = md_table(header, body) + f"\n\n{VS_FULL}: {VS_FULL_MEANS}"
    machine = data.get("machine")
    if machine:
        m = ", ".join(f"{k}={_fmt(v)}" for k, v in machine.items()) if isinstance(machine, dict) else _fmt(machine)
        text = f"Machine: {m}\n\n{text}"
    return text


RENDER = {"fidelity": render_fidelity, "passkey": render_passkey, "math": render_math, "bench": render_bench}
TITLES = {"fidelity": "Fidelity (sparse vs dense)", "passkey": "Passkey retrieval", "math": "Math accuracy",
          "bench": "Decode speed"}


def build_report(root: Path, out: Path) -> tuple[str, int]:
    """The Markdown text and the number of results it contains."""
    found, skipped = [], []
    for path in sorted(root.rglob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None
        kind = kind_of(data)
        if kind:
            found.append((kind, path, data))
        else:
            skipped.append(path)
    pngs = sorted(root.rglob("*.png"))
    link = lambda p: Path(os.path.relpath(p, out.parent)).as_posix()  # noqa: E731
    used = set()
    parts = [f"# asyncspade results\n\nGathered from `{root}`: {len(found)} result file(s)."]
    for kind in KINDS:
        runs = [(p, d) for k, p, d in found if k == kind]
        if not runs:
            continue
        parts.append(f"## {TITLES[kind]}")
        for path, data in runs:
            parts.append(f"### `{path.relative_to(root).as_posix()}`")
            settings = data.get("settings")
            line = _settings_line(settings) if isinstance(settings, dict) else ""
            if line:
                parts.append(line)
            try:
                parts.append(RENDER[kind](data))
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                parts.append(f"(could not render: {type(e).__name__}: {e})")
            for png in pngs:
                if png.parent == path.parent and png.stem.startswith(path.stem) and png not in used:
                    used.add(png)
                    parts.append(f"![{png.name}]({link(png)})")
    rest = [p for p in pngs if p not in used]
    if rest:
        parts.append("## Other plots\n\n" + "\n".join(f"- [{p.relative_to(root).as_posix()}]({link(p)})" for p in rest))
    if skipped:
        parts.append("Not recognised: " + ", ".join(f"`{p.relative_to(root).as_posix()}`" for p in skipped))
    return "\n\n".join(parts) + "\n", len(found)


def run(args) -> int:
    root = Path(args.dir)
    if not root.is_dir():
        raise UserError(f"not a directory: {root}")
    out = Path(args.out) if args.out else root / "REPORT.md"
    text, n = build_report(root, out)
    if n == 0:
        raise UserError(f"no fidelity, passkey, math or bench JSON results under {root}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out} ({n} result file(s))")
    return 0
