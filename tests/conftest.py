import os
from pathlib import Path

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
