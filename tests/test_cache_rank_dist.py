"""The torch.distributed (gloo) cache rank: same tokens as the in-process selector, survives a dead or frozen
worker without hanging, leaves no process and no rendezvous file behind."""
import os
import signal
import time

import pytest
import torch
from conftest import child_pids, shared_data

from asyncspade.selection.dist import DistSelector
from asyncspade.config import SparseConfig
from asyncspade.engine import Engine
from asyncspade.sampling import SamplingParams


def prompts(seed=0):
    """Two rounds on one engine: different lengths, longer than a prefill chunk and the budget; the short-lived
    middle sequence leaves a free slot inside the decode range; round two reuses the slots."""
    g = torch.Generator().manual_seed(seed)
    p = lambda n: torch.randint(100, 5000, (n,), generator=g).tolist()
    return [[(p(70), 16), (p(130), 5), (p(93), 16)], [(p(101), 10), (p(60), 10)]]


def run(model, tok, cfg, rounds, dist=False, on_late="wait", timeout_s=10.0, fault=None, max_tokens=512):
    """Generate each round to the end; with ``dist`` the engine's selector is a DistSelector. ``fault=(sig, n)``
    sends ``sig`` to the worker after ``n`` decode steps. Returns the outputs and the selector (closed)."""
    eng = Engine(model, tok, cfg, max_batch=3, max_tokens=max_tokens, prefill_chunk=48)
    sel = eng.rt.selector
    if dist:
        rt = eng.rt
        sel = rt.selector = DistSelector(rt.cfg, eng.store, rt.heads, rt.sparse_layers, rt.scale, on_late=on_late,
                                         timeout_s=timeout_s)
        if fault is not None:
            steps = []

            def hook(seqs, logits):
                steps.append(1)
                if len(steps) == fault[1]:
                    os.kill(sel.proc.pid, fault[0])
            eng.logits_hook = hook
    outs = []
    for rnd in rounds:
        seqs = [eng.add(p, SamplingParams(max_tokens=n, ignore_eos=True)) for p, n in rnd]
        eng.run(seqs)
        outs.append([s.output_ids for s in seqs])
    eng.close()
    return outs, sel


@pytest.mark.parametrize("method,predictor,prefilter,refine", [
    ("lastq", "ridge", "none", {"refine": False}), ("asyncspade", "ridge", "none", {"refine": False}),
    ("asyncspade", "xlayer", "none", {"refine": False}), ("asyncspade", "hybrid", "none", {}),
    ("asyncspade", "hybrid", "pages", {}), ("asyncspade", "ridge", "pages", {"superset": 2, "min_candidates": 0}),
    ("asyncspade", "ridge", "sketch", {"superset": 2, "min_candidates": 0})])
def test_dist_selects_like_sync(tiny_llama, method, predictor, prefilter, refine):
    model, tok = tiny_llama
    cfg = SparseConfig(method=method, budget=48, sink=4, recent=8, dense_layers=1, predictor=predictor,
                       prefilter=prefilter, page_size=8, **refine)
    sync, _ = run(model, tok, cfg, prompts())
    dist, sel = run(model, tok, cfg, prompts(), dist=True)
    assert dist == sync
    assert sel.fallback is None and sel.steps > 0          # every selection came from the worker
    assert sel.proc.exitcode == 0                          # clean STOP, not killed
    assert not os.path.exists(sel.rendezvous) and child_pids() == set()


@pytest.mark.parametrize("sig,why", [(signal.SIGKILL, "worker died"), (signal.SIGSTOP, "stopped answering")])
def test_faulty_worker_falls_back_without_hanging(tiny_llama, capfd, sig, why):
    model, tok = tiny_llama
    cfg = SparseConfig(method="asyncspade", budget=48, sink=4, recent=8, dense_layers=1)
    t0 = time.perf_counter()
    with pytest.warns(RuntimeWarning, match=why):
        outs, sel = run(model, tok, cfg, prompts(1), dist=True, timeout_s=1.0, fault=(sig, 4))
    assert time.perf_counter() - t0 < 60                   # one timeout, no hang
    assert [len(o) for rnd in outs for o in rnd] == [n for rnd in prompts(1) for _, n in rnd]   # nothing lost
    assert sel.fallback is not None
    assert "continuing with synchronous selection" in capfd.readouterr().err
    assert not os.path.exists(sel.rendezvous) and child_pids() == set()


def test_reuse_policy_finishes_and_cleans_up(tiny_llama):
    model, tok = tiny_llama
    cfg = SparseConfig(method="asyncspade", budget=48, sink=4, recent=8, dense_layers=1, predictor="ridge")
    outs, sel = run(model, tok, cfg, prompts(2), dist=True, on_late="reuse")
    assert [len(o) for rnd in outs for o in rnd] == [n for rnd in prompts(2) for _, n in rnd]
    assert sel.fallback is None and sel.steps > 0 and 0 <= sel.late <= sel.steps
    assert sel.proc.exitcode == 0 and not os.path.exists(sel.rendezvous) and child_pids() == set()


@pytest.mark.slow
def test_dist_selects_like_sync_on_bundled_model():
    """bf16 keys and queries on the wire, 28 sparse layers, a prompt of two KEYS chunks."""
    from asyncspade.models import encode_prompt, load_model
    model, tok = load_model(None, torch.bfloat16)
    text = shared_data("tinyshakespeare.txt").read_text()
    prompt = encode_prompt(tok, "Summarise this scene:\n" + text[:1500], chat=True)
    cfg = SparseConfig(method="asyncspade", budget=256)
    rounds = [[(prompt, 8)]]
    sync, _ = run(model, tok, cfg, rounds, max_tokens=1024)
    dist, sel = run(model, tok, cfg, rounds, dist=True, max_tokens=1024)
    assert len(prompt) > 256 and dist == sync and sel.fallback is None


def test_adopted_sequence_does_not_wait_for_a_selection_nobody_asked_for(tiny_llama):
    """Benchmarks adopt sequences whose cache is already filled: the first ridge step has no job behind it, so it
    must be served at once (exact top-k), not time out into the fallback."""
    model, tok = tiny_llama
    cfg = SparseConfig(method="lastq", budget=48, sink=4, recent=8, dense_layers=1, prefilter="none")
    ids = prompts(3)[0][1][0]
    filler = Engine(model, tok, max_batch=1, max_tokens=256)
    filler.run([filler.add(ids, SamplingParams(max_tokens=1))])
    filler.close()
    eng = Engine(model, tok, cfg, max_batch=1, max_tokens=256, store=filler.store)
    rt = eng.rt
    sel = rt.selector = DistSelector(rt.cfg, eng.store, rt.heads, rt.sparse_layers, rt.scale, timeout_s=30.0)
    t0 = time.perf_counter()
    seq = eng.run([eng.adopt(0, ids, SamplingParams(max_tokens=6, ignore_eos=True))])[0]
    elapsed = time.perf_counter() - t0
    eng.close()
    assert len(seq.output_ids) == 6 and sel.fallback is None and sel.steps > 0
    assert elapsed < 30                                    # a wait for the missing selection would take 30 s
