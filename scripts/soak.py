"""Soak test for ``asyncspade serve``: mixed traffic for a long time, and what the server holds meanwhile.

Starts ``asyncspade serve --max-batch 8`` (bundled model unless ``--model``; loopback, a free port) and keeps
``--concurrency`` clients busy for ``--duration`` seconds with a mix of streaming, non-streaming and cancelled
requests (a stream closed after a few chunks, a non-streaming request whose client times out) on windows of the
bundled long text, chat and completions alike. Every ``--interval`` seconds it samples the server's resident memory
(the server process and, separately, its children: the cache-rank workers), the used bytes of /dev/shm and the
open file descriptors of the server and its children. At the end the server gets SIGTERM (its drain is part of the
test) and /dev/shm must be back where it started. Writes ``--out``.json and ``--out``.png (three curves over time).

    python scripts/soak.py --duration 900 --concurrency 16 --out results/soak

Exit code 1 if a request that was not cancelled on purpose failed, or /dev/shm did not come back.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

SHM = "/dev/shm"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    """Every live descendant of ``pid``."""
    parent_of = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                parent_of[int(p)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            pass
    out, todo = [], [pid]
    while todo:
        cur = todo.pop()
        kids = [c for c, pp in parent_of.items() if pp == cur]
        out += kids
        todo += kids
    return out


def status_mb(pid: int, field: str = "VmRSS") -> float:
    """A memory line of /proc/PID/status (VmRSS, RssShmem, ...) in MB; 0 for a process that is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024
    except (OSError, StopIteration):
        return 0.0


def fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def shm_used_mb() -> float:
    return shutil.disk_usage(SHM).used / 2**20


def sample(pid: int, t0: float, stats: dict) -> dict:
    kids = children(pid)
    return {"t_s": round(time.monotonic() - t0, 1), "server_rss_mb": round(status_mb(pid), 1),
            "children_rss_mb": round(sum(status_mb(k) for k in kids), 1), "children": len(kids),
            "shm_used_mb": round(shm_used_mb(), 1), "server_shmem_mb": round(status_mb(pid, "RssShmem"), 1),
            "server_fds": fds(pid), "children_fds": sum(fds(k) for k in kids), **stats}


def windows(text: str, rng: random.Random) -> str:
    """A window of the text: 200 to 4000 characters (~50 to ~1000 tokens)."""
    n = rng.randint(200, 4000)
    start = rng.randint(0, len(text) - n)
    return text[start:start + n]


async def client_loop(i: int, url: str, text: str, deadline: float, stats: dict) -> None:
    rng = random.Random(i)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=30)) as client:
        while time.monotonic() < deadline:
            kind = rng.choices(["stream", "plain", "cancel_stream", "cancel_plain"], [0.45, 0.3, 0.15, 0.1])[0]
            chat = rng.random() < 0.5
            body = {"max_tokens": rng.randint(8, 96), "temperature": rng.choice([0, 0.8]), "seed": rng.randint(0, 9999),
                    "stream": kind in ("stream", "cancel_stream")}
            if chat:
                path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": windows(text, rng)}]
            else:
                path, body["prompt"] = "/v1/completions", windows(text, rng)
            try:
                if kind == "cancel_plain":             # the client gives up while the server decodes
                    with_timeout = rng.uniform(0.5, 5)
                    try:
                        r = await client.post(url + path, json=body, timeout=with_timeout)
                        stats["ok"] += r.status_code == 200
                        stats["failed"] += r.status_code != 200
                    except httpx.TimeoutException:
                        stats["cancelled"] += 1
                    continue
                if not body["stream"]:
                    r = await client.post(url + path, json=body)
                    ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
                    stats["ok" if ok else "failed"] += 1
                    if not ok:
                        stats["errors"].append(r.text[:200])
                    continue
                keep = rng.randint(1, 4) if kind == "cancel_stream" else None
                async with client.stream("POST", url + path, json=body) as r:
                    if r.status_code != 200:
                        stats["failed"] += 1
                        stats["errors"].append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                        continue
                    seen, done = 0, False
                    async for line in r.aiter_lines():
                        if line == "data: [DONE]":
                            done = True
                        elif line.startswith("data: {") and '"error"' in line:
                            stats["errors"].append(line[:200])
                        elif line.startswith("data: "):
                            seen += 1
                            if keep is not None and seen >= keep:
                                break                  # leaving the block closes the connection mid-stream
                    if keep is not None:
                        stats["cancelled"] += 1
                    else:
                        stats["ok" if done else "failed"] += 1
            except httpx.HTTPError as e:
                stats["failed"] += 1
                stats["errors"].append(f"{type(e).__name__}: {e}"[:200])


async def drive(url: str, text: str, args, pid: int) -> list[dict]:
    stats = {"ok": 0, "failed": 0, "cancelled": 0, "errors": []}
    t0 = time.monotonic()
    deadline = t0 + args.duration
    tasks = [asyncio.create_task(client_loop(i, url, text, deadline, stats)) for i in range(args.concurrency)]
    samples = []
    while any(not t.done() for t in tasks):
        s = sample(pid, t0, {k: v for k, v in stats.items() if k != "errors"})
        samples.append(s)
        print(json.dumps(s), flush=True)
        await asyncio.sleep(args.interval)
    await asyncio.gather(*tasks)
    samples.append(sample(pid, t0, {k: v for k, v in stats.items() if k != "errors"}))
    samples[-1]["errors"] = stats["errors"][:20]
    return samples


def plot(samples: list[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    t = [s["t_s"] / 60 for s in samples]
    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    axes[0].plot(t, [s["server_rss_mb"] for s in samples], label="server")
    axes[0].plot(t, [s["children_rss_mb"] for s in samples], label="cache-rank worker(s)")
    axes[0].set_ylabel("RSS (MB)")
    axes[1].plot(t, [s["shm_used_mb"] for s in samples], label="/dev/shm used (whole machine)")
    axes[1].plot(t, [s["server_shmem_mb"] for s in samples], label="server's resident shared memory")
    axes[1].set_ylabel("shared memory (MB)")
    axes[1].legend(fontsize=8)
    axes[2].plot(t, [s["server_fds"] for s in samples], label="server")
    axes[2].plot(t, [s["children_fds"] for s in samples], label="children")
    axes[2].set_ylabel("open fds")
    axes[2].set_xlabel("minutes")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=900, help="seconds of traffic (default 900)")
    p.add_argument("--concurrency", type=int, default=16, help="clients (default 16)")
    p.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch (default 8)")
    p.add_argument("--interval", type=float, default=10, help="seconds between samples (default 10)")
    p.add_argument("--model", default=None, help="the server's --model (default: the bundled SmolLM2)")
    p.add_argument("--server-args", default="", help="more flags for the server")
    p.add_argument("--out", default="results/soak", help="output prefix: PREFIX.json, PREFIX.png "
                   "(default results/soak)")
    args = p.parse_args(argv)
    from asyncspade.cli.demo import bundled_text
    text = bundled_text()
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix="soak-server-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "asyncspade", "serve", "--port", str(port), "--max-batch", str(args.max_batch),
           "--shutdown-timeout", "20", *(["--model", args.model] if args.model else []), *args.server_args.split()]
    shm_before = shm_used_mb()
    print(f"[soak] {' '.join(cmd)} (log: {log.name}); /dev/shm used {shm_before:.1f} MB", file=sys.stderr)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                print(f"[soak] the server exited; see {log.name}", file=sys.stderr)
                return 1
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > end:
                print("[soak] the server did not start", file=sys.stderr)
                return 1
            time.sleep(0.5)
        samples = asyncio.run(drive(url, text, args, proc.pid))
        health = httpx.get(url + "/health", timeout=30).json()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    time.sleep(2)
    shm_after = shm_used_mb()
    first = next((s for s in samples if s["t_s"] >= 60), samples[0])      # after a minute of warm-up
    last = samples[-1]
    summary = {"settings": vars(args), "health_at_end": health, "shm_before_mb": shm_before,
               "shm_after_exit_mb": shm_after, "server_exit_code": proc.returncode, "start": first, "end": last,
               "samples": samples}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(summary, indent=1))
    plot(samples, args.out + ".png", f"asyncspade serve --max-batch {args.max_batch}, {args.concurrency} clients, "
         f"{args.duration / 60:.0f} min: {last['ok']} ok, {last['cancelled']} cancelled, {last['failed']} failed")
    for name in ("server_rss_mb", "children_rss_mb", "shm_used_mb", "server_shmem_mb", "server_fds", "children_fds"):
        print(f"{name:16s} start {first[name]:>8} end {last[name]:>8}")
    print(f"requests: {last['ok']} ok, {last['cancelled']} cancelled on purpose, {last['failed']} failed; /dev/shm "
          f"{shm_before:.1f} MB before, {shm_after:.1f} MB after the server exited (code {proc.returncode}); "
          f"health at the end: {health}")
    if last.get("errors"):
        print("errors:", *last["errors"], sep="\n  ")
    print(f"wrote {args.out}.json and {args.out}.png")
    return 1 if last["failed"] or shm_after > shm_before + 1 else 0


if __name__ == "__main__":
    sys.exit(main())
