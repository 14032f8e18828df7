"""Load generator for ``asyncspade serve``: N streaming requests at concurrency C, measured client-side.

Reports, per (method, concurrency): generated tokens/s, p50/p95 TPOT, p50 TTFT and failures; ``--out`` writes JSON.
With ``--methods`` it starts one server per method itself (loopback, a free port) and compares them in one run:

    python scripts/loadgen.py --methods full,asyncspade --budget 1024 --prompt-tokens 6000 --max-tokens 256 \\
        --concurrency 1,4,8 --out results/loadgen.json

Without ``--methods`` it loads an already running server (``--port``). Loopback hosts only: it is a benchmark, not a
stress tool for other machines. Prompts are distinct windows of real text (``--source``) of exactly
``--prompt-tokens`` tokens, cut with the served model's tokenizer (``--model``) and sent as token ids.
Every request sets ``ignore_eos`` so each decodes exactly ``--max-tokens`` tokens.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import pathlib
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
from tqdm import tqdm

from asyncspade.data import PROSE, TRACES, trace_texts

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_REQUESTS = 1000


def fail(msg: str) -> None:
    print(f"loadgen: error: {msg}", file=sys.stderr)
    sys.exit(2)


def ints(text: str, name: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        vals = []
    if not vals or any(v <= 0 for v in vals):
        fail(f"{name} must be comma-separated positive integers, got {text!r}")
    return vals


def loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


def source_text(source: str) -> str:
    path = ROOT / (PROSE if source == "shakespeare" else TRACES)
    if not path.exists():
        fail(f"data file not found: {path}")
    if source == "shakespeare":
        return path.read_text()
    return "\n\n".join(prompt + output for prompt, output in trace_texts(path))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``asyncspade serve`` for one method, started and stopped by the load generator."""

    def __init__(self, args, method: str, max_batch: int):
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"loadgen-{method}-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "asyncspade", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--method", method, "--budget", str(args.budget), "--max-batch", str(max_batch),
               "--dtype", args.dtype, *(["--model", args.model] if args.model else []),
               *shlex.split(args.server_args)]
        print(f"[loadgen] starting: {shlex.join(cmd)} (log: {self.log.name})", file=sys.stderr)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, url: str, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                fail(f"the server exited with code {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        fail(f"the server was not ready after {timeout:.0f} s; see {self.log.name}")

    def stop(self, keep_log: bool = True) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        if not keep_log:
            os.unlink(self.log.name)


def tokenize_source(model: str | None, text: str) -> list[int]:
    """The source text as token ids of the served model's tokenizer (prompts are then sent as token ids, so every
    request has exactly ``--prompt-tokens`` tokens)."""
    from asyncspade.models import load_model
    _, tok = load_model(model)
    return tok(text, add_special_tokens=False)["input_ids"]


def prompts(ids: list[int], n_tokens: int, n: int) -> list[list[int]]:
    """``n`` distinct windows of ``n_tokens`` token ids, spread over the source."""
    if n_tokens >= len(ids):
        fail(f"the source text has {len(ids)} tokens, fewer than one prompt needs ({n_tokens})")
    span = len(ids) - n_tokens
    return [ids[i * span // max(n, 1):][:n_tokens] for i in range(n)]


async def one_request(client: httpx.AsyncClient, url: str, headers: dict, prompt: str, max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, usage = [], None
    try:
        async with client.stream("POST", url + "/v1/completions", headers=headers, json=body) as r:
            if r.status_code != 200:
                return {"ok": False, "error": f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                if "error" in obj:
                    return {"ok": False, "error": obj["error"].get("message", "error event")}
                usage = obj.get("usage") or usage
                if any(c.get("text") for c in obj.get("choices", [])):
                    times.append(time.perf_counter())
    except httpx.HTTPError as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    if usage is None or not times:
        return {"ok": False, "error": "stream ended without tokens or usage"}
    n = usage["completion_tokens"]
    return {"ok": True, "prompt_tokens": usage["prompt_tokens"], "tokens": n, "ttft_s": times[0] - t0,
            "tpot_s": (times[-1] - times[0]) / (n - 1) if n > 1 else None, "start": t0, "end": times[-1]}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def late_rate(url: str, headers: dict) -> dict[str, float]:
    """The server's selector late rate per engine (``method/budget``), from /metrics."""
    out = {}
    for line in httpx.get(url + "/metrics", headers=headers, timeout=30).text.splitlines():
        if line.startswith("asyncspade_selector_late_rate{"):
            labels, value = line[len("asyncspade_selector_late_rate{"):].split("} ")
            kv = dict(p.split("=") for p in labels.split(","))
            out[f"{kv['method'].strip(chr(34))}/{kv['budget'].strip(chr(34))}"] = float(value)
    return out


async def run_level(url: str, headers: dict, texts: list[list[int]], concurrency: int, max_tokens: int,
                    deadline: float, request_timeout: float) -> dict:
    sem = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(texts), desc=f"concurrency {concurrency}", file=sys.stderr, leave=False)
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=request_timeout, limits=limits) as client:
        async def guarded(p):
            async with sem:
                res = await one_request(client, url, headers, p, max_tokens)
            bar.update()
            return res
        tasks = [asyncio.create_task(guarded(p)) for p in texts]
        t0 = time.perf_counter()
        done, pending = await asyncio.wait(tasks, timeout=max(deadline - time.monotonic(), 0))
        for t in pending:
            t.cancel()
        wall = time.perf_counter() - t0
    bar.close()
    results = [t.result() for t in tasks if t in done]
    ok = [r for r in results if r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    tpots = [r["tpot_s"] for r in ok if r["tpot_s"] is not None]
    errors = [r["error"] for r in results if not r["ok"]] + ["timed out (--max-time)"] * len(pending)
    return {"concurrency": concurrency, "requests": len(texts), "ok": len(ok), "failures": len(errors),
            "errors": sorted(set(errors))[:5], "wall_s": wall, "tokens": tokens,
            "tokens_per_s": tokens / wall if wall > 0 else 0.0,
            "tpot_p50_ms": _ms(pct(tpots, 0.5)), "tpot_p95_ms": _ms(pct(tpots, 0.95)),
            "ttft_p50_ms": _ms(pct([r["ttft_s"] for r in ok], 0.5)),
            "prompt_tokens_mean": statistics.fmean(r["prompt_tokens"] for r in ok) if ok else None}


def _ms(v: float | None) -> float | None:
    return None if v is None else v * 1000


def measure(args, url: str, label: str, ids: list[int], deadline: float) -> list[dict]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    # warm-up (excluded): first forward passes, lazy allocations
    httpx.post(url + "/v1/completions", headers=headers, timeout=args.request_timeout,
               json={"prompt": "Hello", "max_tokens": 4, "ignore_eos": True})
    rows = []
    for c in args.concurrency:
        if time.monotonic() >= deadline:
            print(f"[loadgen] --max-time reached; skipping {label} concurrency {c}", file=sys.stderr)
            continue
        n = args.requests or max(2, c)
        row = asyncio.run(run_level(url, headers, prompts(ids, args.prompt_tokens, n), c, args.max_tokens, deadline,
                                    args.request_timeout))
        row.update(method=label, late_rate=late_rate(url, headers))
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


HEADER = (f"{'method':<12} {'conc':>4} {'ok':>4} {'fail':>4} {'prompt':>7} {'tok/s':>8} {'TPOT p50':>9} "
          f"{'TPOT p95':>9} {'TTFT p50':>9}")


def format_row(r: dict) -> str:
    def f(v, w, d=1):
        return f"{v:>{w}.{d}f}" if v is not None else f"{'-':>{w}}"
    return (f"{r['method']:<12} {r['concurrency']:>4} {r['ok']:>4} {r['failures']:>4} "
            f"{f(r['prompt_tokens_mean'], 7, 0)} "
            f"{f(r['tokens_per_s'], 8, 2)} {f(r['tpot_p50_ms'], 7)}ms {f(r['tpot_p95_ms'], 7)}ms "
            f"{f(r['ttft_p50_ms'], 7, 0)}ms")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--methods", default=None, help="start one server per method and compare them, e.g. "
                   "full,asyncspade (default: load the running server at --host/--port)")
    p.add_argument("--budget", type=int, default=1024, help="sparse budget of the started servers (default 1024)")
    p.add_argument("--model", default=None, help="--model of the started servers, and the tokenizer prompts are cut "
                   "with (default: bundled SmolLM2)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="--dtype of the started servers")
    p.add_argument("--server-args", default="", help="more flags for the started servers, e.g. '--predictor ridge'")
    p.add_argument("--host", default="127.0.0.1", help="server host, loopback only (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port of an already running server (default 8000)")
    p.add_argument("--api-key", default=None, help="bearer token of an already running server")
    p.add_argument("--concurrency", default="1,4,8", help="concurrency levels (default 1,4,8)")
    p.add_argument("--requests", type=int, default=0, help="requests per level (default: the concurrency, at least 2)")
    p.add_argument("--prompt-tokens", type=int, default=6000, help="prompt length in tokens (default 6000)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens generated per request (default 256)")
    p.add_argument("--source", default="shakespeare", choices=["shakespeare", "traces"],
                   help="prompt text: ../shared/data/tinyshakespeare.txt or the reasoning traces (default shakespeare)")
    p.add_argument("--max-time", type=float, default=3600, help="bound on the whole run in seconds (default 3600)")
    p.add_argument("--request-timeout", type=float, default=900, help="per request, in seconds (default 900)")
    p.add_argument("--start-timeout", type=float, default=600, help="wait for a started server (default 600 s)")
    p.add_argument("--out", default=None, help="write the results as JSON to this file")
    args = p.parse_args(argv)
    args.concurrency = ints(args.concurrency, "--concurrency")
    if not loopback(args.host):
        fail(f"--host {args.host!r} is not a loopback address; the load generator only targets this machine")
    if not 0 <= args.requests <= MAX_REQUESTS:
        fail(f"--requests must be within 0..{MAX_REQUESTS}")
    if args.prompt_tokens < 1 or args.max_tokens < 2 or args.max_time <= 0:
        fail("--prompt-tokens must be >= 1, --max-tokens >= 2 and --max-time > 0")
    ids = tokenize_source(args.model, source_text(args.source))
    deadline = time.monotonic() + args.max_time
    rows = []
    print(HEADER, flush=True)
    if args.methods:
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            server = ServerProcess(args, method, max(args.concurrency))
            url = f"http://127.0.0.1:{server.port}"
            try:
                server.wait_ready(url, args.start_timeout)
                rows += measure(args, url, method, ids, deadline)
            finally:
                server.stop(keep_log=sys.exc_info()[0] is not None or any(r["failures"] for r in rows))
    else:
        rows = measure(args, f"http://{args.host}:{args.port}", "server", ids, deadline)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        meta = {k: v for k, v in vars(args).items() if k != "api_key"}
        pathlib.Path(args.out).write_text(json.dumps({"settings": meta, "results": rows}, indent=2))
        print(f"[loadgen] wrote {args.out}", file=sys.stderr)
    return 1 if any(r["failures"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
