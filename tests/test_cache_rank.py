"""The asynchronous cache rank: same tokens as the synchronous simulation, survives faults, leaves nothing behind."""
import os
import signal

import pytest
import torch
from conftest import child_pids, shared_data

from asyncspade.config import SparseConfig
from asyncspade.engine import Engine
from asyncspade.sampling import SamplingParams


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


@pytest.mark.parametrize("method,predictor,prefilter,refine", [
    ("lastq", "ridge", "none", {"refine": False}), ("asyncspade", "ridge", "none", {"refine": False}),
    ("asyncspade", "xlayer", "none", {"refine": False}), ("asyncspade", "hybrid", "none", {}),
    ("asyncspade", "ridge", "pages", {"refine": False}), ("asyncspade", "hybrid", "pages", {}),
    ("asyncspade", "ridge", "pages", {"superset": 2, "min_candidates": 0, "refresh": 1}),
    ("asyncspade", "ridge", "pages", {"superset": 2, "min_candidates": 0}),          # the defaults, fewer candidates
    ("asyncspade", "ridge", "sketch", {"superset": 2, "min_candidates": 0}),         # the store's key sketch
    ("asyncspade", "ridge", "sketch", {"refine": False}),
    ("asyncspade", "ridge", "pages", {"superset": 2, "min_candidates": 0, "check": 8}),   # the in-line check
    ("lastq", "ridge", "none", {"superset": 2, "min_candidates": 0, "refresh": 1}),
    ("asyncspade", "xlayer", "none", {"superset": 2, "min_candidates": 0, "refresh": 1})])
def test_async_selects_like_sync(tiny_llama, method, predictor, prefilter, refine):
    model, tok = tiny_llama
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(100, 5000, (n,), generator=g).tolist() for n in (70, 110, 90)]
    cfg = SparseConfig(method=method, budget=48, sink=4, recent=8, dense_layers=1, predictor=predictor,
                       prefilter=prefilter, page_size=8, **refine)
    sync, _ = generate(model, tok, cfg, prompts, 20, "sync")
    for selector in ("async", "thread"):
        asyn, (steps, late) = generate(model, tok, cfg, prompts, 20, selector)
        assert asyn == sync
        assert steps > 0          # selections really came from the worker


@pytest.mark.slow
def test_async_selects_like_sync_on_bundled_model():
    from asyncspade.models import encode_prompt, load_model
    model, tok = load_model(None, torch.bfloat16)
    text = shared_data("tinyshakespeare.txt").read_text()
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
    assert child_pids() == set()


def test_no_leftovers_after_two_runs(tiny_llama):
    model, tok = tiny_llama
    shm_before = set(os.listdir("/dev/shm"))
    cfg = SparseConfig(method="asyncspade", budget=48, sink=4, recent=8, dense_layers=1)
    for _ in range(2):
        generate(model, tok, cfg, [list(range(300, 380))], 6, "async", on_late="reuse")
        assert child_pids() == set()
    assert set(os.listdir("/dev/shm")) - shm_before == set()


def _selector_setup(seed=0, T=160, n=120, slots=2, heads=4, kvh=2, d=8):
    from asyncspade.kvcache import KVStore
    g = torch.Generator().manual_seed(seed)
    store = KVStore(2, slots, kvh, T, d, torch.float32, page_size=8, track_pages=True)
    store.k.copy_(torch.randn(store.k.shape, generator=g))
    for layer in range(2):
        for s in range(slots):
            store.rebuild_pages(layer, s, 0, n)
    cfg = SparseConfig(method="asyncspade", budget=32, sink=4, recent=4, dense_layers=0, predictor="hybrid",
                       superset=2, page_size=8)
    return cfg, store, g


@pytest.mark.parametrize("kind", ["sync", "async", "dist"])
def test_new_occupant_never_gets_stale_selection(kind):
    """A slot's previous occupant left step-ahead candidates for the very cache length the new occupant starts
    at (a sequence adopted from a filled cache). The cross-layer pass must not refine those: it scores every key,
    exactly like an exact top-k with the cross-layer query."""
    from asyncspade.kvcache import Batch
    from asyncspade.scoring import topk_tokens
    from asyncspade.selection import make_selector
    cfg, store, g = _selector_setup()
    heads, d, n = 4, 8, 120
    sel = make_selector(kind, cfg, store, heads, [0, 1], 1.0)
    try:
        sel.reset(0, 2)
        old = Batch(0, 2, torch.tensor([n - 1, n - 1]), 1)              # the old occupants' last step
        for layer in (0, 1):
            sel.on_query(layer, torch.randn(2, heads, 1, d, generator=g), old)
        sel.reset(0, 1)                                                 # slot 0: a new sequence, same length
        new = Batch(0, 2, torch.tensor([n, n]), 0)
        qx = torch.randn(2, heads, d, generator=g) * 4
        for layer in (0, 1):
            sel.on_xlayer(layer, qx, new)
        for layer in (0, 1):
            got = sel.get(layer, new, qx[:, :, None])
            want = topk_tokens(qx, store.k[layer, 0:2], cfg.sink, new.lengths - cfg.recent, cfg.k_mid, 1.0)
            assert set(got[0, 0].tolist()) == set(want[0, 0].tolist())   # slot 0: every key scored
            assert got.shape == want.shape
    finally:
        sel.close()


def test_decode_threads_leave_the_worker_a_core(tiny_llama):
    """``decode_threads`` applies to decode steps only when a worker runs beside them; prefill keeps the process's
    threads, and the process's setting is back after every step."""
    from asyncspade.engine import intra_op_threads
    model, tok = tiny_llama
    cfg = SparseConfig(method="asyncspade", budget=48, sink=4, recent=8, dense_layers=1, page_size=8)
    prompt = list(range(100, 180))
    seen = {"prefill": set(), "decode": set()}
    with intra_op_threads(2):
        for selector in ("sync", "async"):
            eng = Engine(model, tok, cfg, max_batch=1, max_tokens=256, selector=selector, decode_threads=1)
            assert eng.decode_threads == (1 if selector == "async" else None)
            prefill = eng._prefill
            eng._prefill = lambda seq: (seen["prefill"].add(torch.get_num_threads()), prefill(seq))[1]
            if selector == "async":
                eng.logits_hook = lambda seqs, logits: seen["decode"].add(torch.get_num_threads())
            seq = eng.add(prompt, SamplingParams(max_tokens=12, ignore_eos=True))
            while not seq.finished:
                eng.step()
                assert torch.get_num_threads() == 2
            eng.close()
    assert seen == {"prefill": {2}, "decode": {1}}
