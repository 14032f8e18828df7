import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import torch

torch.set_num_threads(1)   # the suite shares 2 cores with worker processes: no OpenMP spinning
# tests decode tiny caches, where the cost model would (rightly) choose dense attention: sparse from the budget on,
# here and in every process a test starts (test_costmodel.py covers the cost model itself)
os.environ["ASYNCSPADE_MIN_SPARSE"] = "0"

from asyncspade.models import tiny_model

# the engine in the Hugging Face model's own precision (fp32 weights and KV): what tests comparing with HF use
EXACT = dict(weights="fp32", kv_dtype="fp32")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data(name: str) -> Path:
    """A file of ``../shared/data``; the test is skipped (not failed) in a clone that is not next to it."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"shared data file {path} not present")
    return path


def proc_state(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) of a live process; None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state, ppid = fh.read().rsplit(")", 1)[1].split()[:2]
    except (OSError, ValueError):
        return None
    return None if state == "Z" else (state, int(ppid))


def child_pids(parent: int | None = None, tracker: bool = False) -> set[int]:
    """Live child processes of ``parent`` (default: this process); multiprocessing's resource tracker (one per
    parent, by design) only with ``tracker=True``."""
    parent = os.getpid() if parent is None else parent
    out = set()
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        if (proc_state(pid) or ("", 0))[1] != parent:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if not tracker and b"resource_tracker" in fh.read():
                    continue
        except OSError:
            continue
        out.add(pid)
    return out


def decode_recording_logits(model, tok, ids: list[int], params, sparse=None, **engine):
    """Decode one request with the engine; (the finished sequence, the raw logits behind each sampled token)."""
    from asyncspade.config import SparseConfig
    from asyncspade.engine import Engine
    eng = Engine(model, tok, sparse or SparseConfig(), max_batch=1, **engine)
    logits, append = [], eng._append

    def spy(seq, lg):
        if seq.fed >= len(seq.prompt_ids):
            logits.append(lg.clone())
        return append(seq, lg)
    eng._append = spy
    try:
        [seq] = eng.run([eng.add(ids, params)])
    finally:
        eng.close()
    return seq, logits


def shm_leftovers(before: set[str], wait_s: float = 15.0) -> set[str]:
    """Entries of /dev/shm that were not in ``before`` and stay: a leak stays, while the shared memory of another
    process (a test suite running beside this one) comes and goes."""
    end = time.monotonic() + wait_s
    while set(os.listdir("/dev/shm")) - before and time.monotonic() < end:
        time.sleep(0.5)
    return set(os.listdir("/dev/shm")) - before


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine it spins (up to 10x slower):
    modules of tiny-model tests run on one (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def lively(model, std: float = 0.15, seed: int = 0):
    """Random tiny models repeat one token at the default init; larger weights give varied greedy outputs,
    so token-equality tests can actually fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture(scope="session", params=["llama", "qwen3"])
def tiny(request):
    model, tok = tiny_model(request.param)
    return lively(model), tok


@pytest.fixture(scope="session")
def tiny_llama():
    model, tok = tiny_model("llama")
    return lively(model), tok


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama checkpoint directory (lively weights, the bundled tokenizer and its chat template), for
    tests that go through ``--model DIR`` like a user."""
    model, tok = tiny_model("llama", seed=3)
    lively(model)
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


# ------------------------------------------------------------------------------------ a real server around a tiny model
BUDGET = 64                       # small, so the tiny model's decoding runs sparse past 64 cached tokens
NAME = "asyncspade-smollm2"
KEY = "sekrit"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``asyncspade serve`` around a tiny random model (tests/tiny_server.py) in its own process. Unless ``flags``
    say otherwise, a SIGTERM drains for 2 s (the tests stop servers with requests still running)."""

    def __init__(self, *flags: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="asyncspade-server-", suffix=".log", delete=False)
        drain = [] if "--shutdown-timeout" in flags else ["--shutdown-timeout", "2"]
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "tiny_server.py"), "--host",
                                      "127.0.0.1", "--port", str(self.port), "--budget", str(BUDGET), *drain, *flags],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=None if env is None else {**os.environ, **env})

    def wait_ready(self, headers=None, timeout=90.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc.poll() is None, f"server exited: {self.output()}"
            try:
                if httpx.get(self.url + "/health", headers=headers, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready: {self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-3000:]

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)

    def client(self, key: str = "none"):
        from openai import OpenAI
        return OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def metric(self, name: str, headers=None) -> float:
        text = httpx.get(self.url + "/metrics", headers=headers, timeout=10).text
        return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))
