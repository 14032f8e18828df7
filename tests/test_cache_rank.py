"""The asynchronous cache rank: same tokens as the synchronous simulation, survives faults, leaves nothing behind."""
import os
import signal

import pytest
import torch

from asyncspade.config import SparseConfig
from asyncspade.engine import Engine
from asyncspade.sampling import SamplingParams


def children() -> set[int]:
    """Live child processes, except multiprocessing's resource tracker (one per parent, by design)."""
    me = str(os.getpid())
    out = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
                if fields[1] == me and fields[0] != "Z" and b"resource_tracker" not in cmd:
                    out.add(int(pid))
            except OSError:
                pass
    return out


def generate(model, tok, cfg, prompts, n, selector, on_late="wait", kill_after=None):
    eng = Engine(model, tok, cfg, max_batch=len(prompts), max_tokens=1024, selector=selector, on_late=on_late)
    seqs = [eng.add(p, SamplingParams(max_tokens=n, ignore_eos=True)) for p in prompts]
    steps = 0
    while any(not s.finished for s in seqs):
        eng.step()
        steps += 1
        if kill_after is not None and steps == kill_after:
            os.kill(eng.rt.selector.proc.pid, signal.SIGKILL)
    stats = (eng.rt.selector.steps, eng.rt.selector.late)
    eng.close()
    return [s.output_ids for s in seqs], stats


@pytest.mark.parametrize("method,predictor,prefilter", [
    ("lastq", "ridge", "none"), ("asyncspade", "ridge", "none"), ("asyncspade", "xlayer", "none"),
    ("asyncspade", "hybrid", "none"), ("asyncspade", "ridge", "pages"), ("asyncspade", "hybrid", "pages")])
def test_async_selects_like_sync(tiny_llama, method, predictor, prefilter):
    model, tok = tiny_llama
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(100, 5000, (n,), generator=g).tolist() for n in (70, 110, 90)]
    cfg = SparseConfig(method=method, budget=48, sink=4, recent=8, dense_layers=1, predictor=predictor,
                       prefilter=prefilter, page_size=8)
    sync, _ = generate(model, tok, cfg, prompts, 20, "sync")
    asyn, (steps, late) = generate(model, tok, cfg, prompts, 20, "async")
    assert asyn == sync
    assert steps > 0          # selections really came from the worker


@pytest.mark.slow
def test_async_selects_like_sync_on_bundled_model():
    from asyncspade.models import encode_prompt, load_model
    model, tok = load_model(None, torch.bfloat16)
    text = open(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "tinyshakespeare.txt")).read()
    if not text:
        pytest.skip("shared data missing")
    prompt = encode_prompt(tok, "Summarise this scene:\n" + text[:2500], chat=True)
    cfg = SparseConfig(method="asyncspade", budget=256)
    sync, _ = generate(model, tok, cfg, [prompt], 24, "sync")
    asyn, _ = generate(model, tok, cfg, [prompt], 24, "async")
    assert len(prompt) > 256 and asyn == sync


def test_worker_killed_mid_generation_falls_back(tiny_llama, capfd):
    model, tok = tiny_llama
    prompts = [list(range(300, 400))]
    cfg = SparseConfig(method="asyncspade", budget=48, sink=4, recent=8, dense_layers=1)
    with pytest.warns(RuntimeWarning, match="worker"):
        out, _ = generate(model, tok, cfg, prompts, 16, "async", kill_after=4)
    assert len(out[0]) == 16                           # nothing lost
    assert "continuing with synchronous selection" in capfd.readouterr().err
    assert children() == set()


def test_no_leftovers_after_two_runs(tiny_llama):
    model, tok = tiny_llama
    shm_before = set(os.listdir("/dev/shm"))
    cfg = SparseConfig(method="asyncspade", budget=48, sink=4, recent=8, dense_layers=1)
    for _ in range(2):
        generate(model, tok, cfg, [list(range(300, 380))], 6, "async", on_late="reuse")
        assert children() == set()
    assert set(os.listdir("/dev/shm")) - shm_before == set()
