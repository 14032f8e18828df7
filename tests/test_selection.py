"""Selection code against slow reference implementations."""
import contextlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from asyncspade import kernels
from asyncspade.attention import decode_attention
from asyncspade.config import ConfigError, SparseConfig
from asyncspade.kvcache import Batch, KVStore
from asyncspade.methods import Selection
from asyncspade.predictor import QueryWindows, forecast
from asyncspade.scoring import gather_rows, quest_page_scores, topk_pages, topk_tokens


def filled_store(layers=1, slots=3, kvh=2, T=96, d=8, track_pages=False, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    st_ = KVStore(layers, slots, kvh, T, d, dtype, page_size=4, track_pages=track_pages)
    st_.k.copy_(torch.randn(st_.k.shape, generator=g, dtype=torch.float64))
    st_.v.copy_(torch.randn(st_.v.shape, generator=g, dtype=torch.float64))
    return st_


@pytest.mark.parametrize("backend", ["c", "torch"])
@pytest.mark.parametrize("heads,kvh", [(4, 4), (6, 2)])     # MHA and GQA
def test_gather_sparse_equals_masked_dense(heads, kvh, backend):
    d, T = 8, 96
    store = filled_store(kvh=kvh, T=T, d=d, dtype=torch.float32)
    cfg = SparseConfig(method="oracle", budget=20, sink=2, recent=3, dense_layers=0)
    lengths = torch.tensor([90, 60, 75])
    batch = Batch(0, 3, lengths - 1, 1)
    g = torch.Generator().manual_seed(1)
    mid = torch.stack([torch.stack([torch.randperm(int(n) - 5, generator=g)[:cfg.k_mid] + 2 for _ in range(kvh)])
                       for n in lengths])                                                  # [B, KVH, k]
    valid = torch.rand(mid.shape, generator=g) > 0.3
    q = torch.randn(3, heads, d, generator=g)
    out = torch.empty(3, kvh, heads // kvh, d)
    with contextlib.nullcontext() if backend == "c" else kernels.torch_only():
        assert kernels.backend() == backend
        decode_attention(q, store, 0, batch, Selection(mid, valid), cfg, 0.3, out)
    out = out.view(3, heads, d)
    # reference: dense scores over the whole cache, masked to the attended set
    for b in range(3):
        n = int(lengths[b])
        for h in range(heads):
            kh = h // (heads // kvh)
            keep = torch.zeros(n, dtype=torch.bool)
            keep[:2] = True
            keep[n - 3:n] = True
            keep[mid[b, kh][valid[b, kh]]] = True
            s = (store.k[0, b, kh, :n] @ q[b, h]) * 0.3
            p = torch.where(keep, s, torch.tensor(float("-inf"), dtype=s.dtype)).softmax(-1)
            torch.testing.assert_close(out[b, h], p @ store.v[0, b, kh, :n])


def test_gather_rows_matches_indexing():
    store = filled_store(slots=4, kvh=3, T=50)
    view = store.k[0, 1:3]
    idx = torch.randint(0, 50, (2, 3, 7))
    got = gather_rows(view, idx)
    ref = torch.stack([torch.stack([view[b, h, idx[b, h]] for h in range(3)]) for b in range(2)])
    assert torch.equal(got, ref)


def test_topk_tokens_matches_reference():
    g = torch.Generator().manual_seed(2)
    keys = torch.randn(2, 2, 64, 8, generator=g, dtype=torch.float64)
    q = torch.randn(2, 4, 8, generator=g, dtype=torch.float64)
    hi = torch.tensor([50, 64])
    idx = topk_tokens(q, keys, 3, hi, 10, 0.5)
    for b in range(2):
        for kh in range(2):
            n = int(hi[b])
            probs = sum(((keys[b, kh, 3:n] @ q[b, h]) * 0.5).softmax(-1) for h in (2 * kh, 2 * kh + 1))
            ref = set((probs.argsort(descending=True)[:10] + 3).tolist())
            assert set(idx[b, kh].tolist()) == ref


def reference_quest_pages(q, keys, n, ps, sink, hi, n_pages, scale):
    """Straight from the Quest paper: per page channel-wise min/max, bound sum_c max(q_c min_c, q_c max_c)."""
    kvh, heads = keys.shape[0], q.shape[0]
    out = []
    for kh in range(kvh):
        pages = list(range(sink // ps, (hi - 1) // ps + 1))
        total = torch.zeros(len(pages), dtype=torch.float64)
        per_head = []
        for h in range(kh * heads // kvh, (kh + 1) * heads // kvh):
            s = []
            for p in pages:
                blk = keys[kh, p * ps:min((p + 1) * ps, n)]
                mn, mx = blk.min(0).values, blk.max(0).values
                s.append(torch.maximum(q[h] * mn, q[h] * mx).sum() * scale)
            per_head.append(torch.stack(s).softmax(-1))
        total = sum(per_head)
        out.append({pages[i] for i in total.argsort(descending=True)[:n_pages].tolist()})
    return out


def test_quest_metadata_and_pages_match_reference():
    d, kvh, heads, ps = 8, 2, 4, 4
    store = KVStore(1, 1, kvh, 80, d, torch.float64, page_size=ps, track_pages=True)
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(1, kvh, 70, d, generator=g, dtype=torch.float64)
    store.write(0, Batch(0, 1, torch.tensor([0]), 13), keys[:, :, :13], keys[:, :, :13])   # prefill, partial page
    for t in range(13, 70):                                                                 # appends across pages
        store.write(0, Batch(0, 1, torch.tensor([t]), 1), keys[:, :, t:t + 1], keys[:, :, t:t + 1])
        n = t + 1
        for p in range((n + ps - 1) // ps):
            blk = keys[0, :, p * ps:min((p + 1) * ps, n)]
            assert torch.equal(store.pmin[0, 0, :, p], blk.amin(1)) and torch.equal(store.pmax[0, 0, :, p], blk.amax(1))
    q = torch.randn(1, heads, d, generator=g, dtype=torch.float64)
    hi = torch.tensor([70 - 5])
    pages = topk_pages(q, store.pmin[0, 0:1], store.pmax[0, 0:1], 1, (hi - 1) // ps + 1, 5, 0.4)
    ref = reference_quest_pages(q[0], keys[0], 70, ps, 4, 65, 5, 0.4)
    assert [set(pages[0, kh].tolist()) for kh in range(kvh)] == ref
    # the two-matmul form of the bound equals the elementwise definition
    s = quest_page_scores(q, store.pmin[0, 0:1, :, :3], store.pmax[0, 0:1, :, :3], 1.0)
    ref_s = torch.maximum(q[0, 0] * store.pmin[0, 0, 0, :3], q[0, 0] * store.pmax[0, 0, 0, :3]).sum(-1)
    torch.testing.assert_close(s[0, 0, 0], ref_s.float())


def numpy_ar_forecast(win, order, ridge):
    """Least squares with scalar lags shared across channels, via explicit design matrices."""
    W, d = win.shape
    X = np.concatenate([np.stack([win[t - 1 - i] for i in range(order)], 1) for t in range(order, W)])  # [R*d, p]
    y = np.concatenate([win[t] for t in range(order, W)])
    A = X.T @ X
    a = np.linalg.solve(A + ridge * np.mean(np.diag(A)) * np.eye(order), X.T @ y)
    return sum(a[j] * win[W - 1 - j] for j in range(order))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), order=st.integers(1, 5), ridge=st.sampled_from([0.0, 1e-2, 1.0]))
def test_ridge_forecast_matches_numpy(seed, order, ridge):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((2, 3, 12, 6))
    got = forecast(torch.tensor(w, dtype=torch.float64), torch.tensor([12, 12]), "ar", order, ridge)
    for b in range(2):
        for h in range(3):
            np.testing.assert_allclose(got[b, h].numpy(), numpy_ar_forecast(w[b, h], order, ridge), rtol=1e-6, atol=1e-8)


def test_exact_ar_process_is_predicted():
    rng = np.random.default_rng(0)
    a = np.array([0.5, -0.3, 0.2])
    seq = [rng.standard_normal(16) for _ in range(3)]
    for _ in range(30):
        seq.append(sum(a[j] * seq[-1 - j] for j in range(3)))
    seq = np.array(seq)
    w = torch.tensor(seq[-17:-1][None, None])                      # window of 16, predict the next
    pred = forecast(w, torch.tensor([16]), "ar", order=3, ridge=0.0)
    np.testing.assert_allclose(pred[0, 0].numpy(), seq[-1], rtol=1e-5, atol=1e-8)


def test_query_window_keeps_newest():
    w = QueryWindows(1, 1, 1, 4, 1)
    for t in range(6):
        w.push(0, 0, 1, torch.full((1, 1, 1, 1), float(t)))
    buf, count = w.get(0, 0, 1)
    assert buf[0, 0, :, 0].tolist() == [2, 3, 4, 5] and int(count[0]) == 4
    w.push(0, 0, 1, torch.arange(10.0).view(1, 1, 10, 1))          # a prefill chunk: its last W queries
    assert w.get(0, 0, 1)[0][0, 0, :, 0].tolist() == [6, 7, 8, 9]


def test_query_windows_match_shifted_windows():
    """The ring windows read like windows shifted at every push, oldest first and zeros before the first query,
    for rows pushed at different times, one query or a prefill chunk at a time, across resets."""
    slots, layers, heads, W, d = 3, 2, 2, 5, 3
    ring = QueryWindows(slots, layers, heads, W, d)
    ref = torch.zeros(slots, layers, heads, W, d)
    count = np.zeros((slots, layers), dtype=np.int64)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        lo = int(torch.randint(0, slots, (1,), generator=g))
        hi = int(torch.randint(lo + 1, slots + 1, (1,), generator=g))
        li = int(torch.randint(0, layers, (1,), generator=g))
        if float(torch.rand(1, generator=g)) < 0.05:
            ring.reset(lo, hi)
            ref[lo:hi] = 0
            count[lo:hi] = 0
            continue
        n = 1 if float(torch.rand(1, generator=g)) < 0.7 else int(torch.randint(2, 9, (1,), generator=g))
        q = torch.randn(hi - lo, heads, n, d, generator=g)
        ring.push(li, lo, hi, q)
        m = min(n, W)
        ref[lo:hi, li] = torch.cat([ref[lo:hi, li, :, m:], q[:, :, -m:]], 2)
        count[lo:hi, li] += n
        w, c = ring.get(li, lo, hi)
        assert torch.equal(w, ref[lo:hi, li])
        assert c.tolist() == np.minimum(count[lo:hi, li], W).tolist()


@pytest.mark.parametrize("predictor", ["ridge", "xlayer", "hybrid"])
def test_ahead_selection_ignores_current_query(tiny_llama, predictor):
    """lastq/asyncspade select from information that exists before the layer runs: the current query is unused."""
    from asyncspade.engine import Engine
    from asyncspade.sampling import SamplingParams
    model, tok = tiny_llama
    for method in ("lastq", "asyncspade"):
        eng = Engine(model, tok, SparseConfig(method=method, budget=32, sink=4, recent=8, dense_layers=1,
                                              predictor=predictor, refine=False), max_batch=1, max_tokens=256)
        seen = []

        def probe(layer, q, batch, sel, eng=eng):
            again = eng.rt.method.select(eng.rt, layer, q + torch.randn_like(q) * 10, batch)
            seen.append(torch.equal(sel.idx, again.idx))
        eng.rt.probe = probe
        seq = eng.add(list(range(200, 300)), SamplingParams(max_tokens=5, ignore_eos=True))
        eng.run([seq])
        eng.close()
        assert seen and all(seen)


def test_oracle_does_use_current_query(tiny_llama):
    """The causality probe above can fail: the oracle's selection changes with the query."""
    from asyncspade.engine import Engine
    from asyncspade.sampling import SamplingParams
    model, tok = tiny_llama
    eng = Engine(model, tok, SparseConfig(method="oracle", budget=32, sink=4, recent=8, dense_layers=1),
                 max_batch=1, max_tokens=256)
    seen = []
    eng.rt.probe = lambda layer, q, batch, sel: seen.append(
        torch.equal(sel.idx.sort(-1).values,
                    eng.rt.method.select(eng.rt, layer, torch.randn_like(q), batch).idx.sort(-1).values))
    eng.run([eng.add(list(range(200, 300)), SamplingParams(max_tokens=3, ignore_eos=True))])
    eng.close()
    assert seen and not all(seen)


@pytest.mark.parametrize("bad", [dict(method="nope"), dict(method="oracle", budget=0), dict(method="oracle", budget=20),
                                 dict(method="quest", budget=32), dict(method="quest", budget=200, page_size=48),
                                 dict(recent=0), dict(order=20)])
def test_config_rejects_bad_settings(bad):
    with pytest.raises(ConfigError):
        SparseConfig(**bad).validate()


def test_step_ahead_settings_bind_only_the_methods_that_select_ahead():
    """The page prefilter and the refresh period belong to lastq / asyncspade: a small oracle budget, or a short
    recent window under streaming, must not be refused for settings those methods never use."""
    for method in ("oracle", "streaming", "quest"):
        SparseConfig(method=method, budget=32, page_size=8, recent=2).validate()
    for method in ("asyncspade", "lastq"):
        SparseConfig(method=method, budget=32, page_size=16).validate()        # refine: candidates are whole pages
        SparseConfig(method=method, budget=32, page_size=16, refine=False, prefilter="sketch").validate()  # tokens
        with pytest.raises(ConfigError, match="page prefilter"):
            SparseConfig(method=method, budget=32, page_size=16, refine=False).validate()
        with pytest.raises(ConfigError, match="refresh"):
            SparseConfig(method=method, budget=64, recent=2).validate()


def test_full_attention_has_no_budget():
    assert SparseConfig(method="full", budget=0).validate().budget == 0
    with pytest.raises(ConfigError, match="page size must be a positive"):
        SparseConfig(method="quest", page_size=0).validate()


def test_page_prefilter_candidates_are_the_best_pages():
    """The prefilter keeps whole pages chosen by the Quest bound of the forecast query, within [sink, hi)."""
    from asyncspade.selection.passes import page_candidates
    d, kvh, ps = 8, 2, 4
    store = KVStore(1, 1, kvh, 80, d, torch.float64, page_size=ps, track_pages=True)
    g = torch.Generator().manual_seed(4)
    keys = torch.randn(1, kvh, 64, d, generator=g, dtype=torch.float64)
    store.write(0, Batch(0, 1, torch.tensor([0]), 64), keys, keys)
    q = torch.randn(1, 4, d, generator=g, dtype=torch.float64)
    cfg = SparseConfig(method="asyncspade", budget=40, sink=4, recent=8, page_size=ps, prefilter="pages")
    cand = page_candidates(cfg, q, store.pmin[0, 0:1], store.pmax[0, 0:1], torch.tensor([56]), 12, 0.4)
    ref = reference_quest_pages(q[0], keys[0], 64, ps, 4, 56, 3, 0.4)
    for kh in range(kvh):
        assert {int(t) // ps for t in cand[0, kh]} == ref[kh]
        assert sorted(cand[0, kh].tolist()) == sorted(p * ps + j for p in ref[kh] for j in range(ps))


@pytest.mark.parametrize("predictor", ["ridge", "hybrid"])
def test_page_prefilter_on_a_store_smaller_than_the_superset(predictor):
    """The superset (superset * k) exceeds the store and the store is not a whole number of pages: the step-ahead
    pass still returns `width` in-range positions, and the refinement picks valid ones only."""
    from asyncspade.kvcache import Batch
    from asyncspade.selection.local import SyncSelector
    T, n = 101, 90
    store = KVStore(1, 2, 2, T, 8, torch.float32, page_size=8, track_pages=True)
    store.k.copy_(torch.randn(store.k.shape, generator=torch.Generator().manual_seed(0)))
    for s in range(2):
        store.rebuild_pages(0, s, 0, n)
    cfg = SparseConfig(method="asyncspade", budget=32, sink=4, recent=4, dense_layers=0, predictor=predictor,
                       superset=5, page_size=8, prefilter="pages", refine=False)
    sel = SyncSelector(cfg, store, 4, [0], 1.0)
    sel.on_query(0, torch.randn(2, 4, 1, 8), Batch(0, 2, torch.tensor([n - 1, n - 1]), 1))
    ahead = sel.ahead[:, 0]
    assert ahead.shape[-1] == sel.width and int(ahead.max()) < T
    step = Batch(0, 2, torch.tensor([n, n]), 1)                       # the next step: n + 1 tokens
    if predictor == "hybrid":
        sel.on_xlayer(0, torch.randn(2, 4, 8), step)
    got = sel.get(0, step)
    assert got.shape == (2, 2, cfg.k_mid)
    assert bool(((got >= cfg.sink) & (got < n + 1 - cfg.recent)).all())
    assert all(len(set(row.tolist())) == cfg.k_mid for row in got.flatten(0, 1))    # no position twice


@pytest.mark.parametrize("prefilter", ["none", "pages", "sketch"])
def test_hybrid_with_a_superset_covering_the_cache_is_exact_topk(prefilter):
    """When superset * k covers every candidate position the step-ahead pass ranks nothing, and the cross-layer
    pass must still return the exact top-k of the cross-layer query over all candidates."""
    from asyncspade.kvcache import Batch
    from asyncspade.selection.local import SyncSelector
    T, n = 128, 70
    store = KVStore(1, 2, 2, T, 8, torch.float32, page_size=8, track_pages=True, track_sketch=True)
    store.k.copy_(torch.randn(store.k.shape, generator=torch.Generator().manual_seed(1)))
    for s in range(2):
        store.rebuild(0, s, 0, n + 1)
    cfg = SparseConfig(method="asyncspade", budget=24, sink=4, recent=4, dense_layers=0, predictor="hybrid",
                       superset=4, page_size=8, prefilter=prefilter)                  # 4 * 16 = 64 >= 70 + 1 - 8
    sel = SyncSelector(cfg, store, 4, [0], 1.0)
    sel.on_query(0, torch.randn(2, 4, 1, 8), Batch(0, 2, torch.tensor([n - 1, n - 1]), 1))
    step = Batch(0, 2, torch.tensor([n, n]), 1)
    q_x = torch.randn(2, 4, 8)
    sel.on_xlayer(0, q_x, step)
    got = sel.get(0, step)
    want = topk_tokens(q_x, store.k[0, 0:2], cfg.sink, step.lengths - cfg.recent, cfg.k_mid, 1.0)
    for g_row, w_row in zip(got.flatten(0, 1), want.flatten(0, 1)):
        assert set(g_row.tolist()) == set(w_row.tolist())


def _greedy(model, tok, cfg, prompts, n=16, **kw):
    from asyncspade.engine import Engine
    from asyncspade.sampling import SamplingParams
    eng = Engine(model, tok, cfg, max_batch=len(prompts), max_tokens=256, **kw)
    logits = []
    eng.logits_hook = lambda seqs, lg: logits.append(lg.clone())
    seqs = [eng.add(p, SamplingParams(max_tokens=n, ignore_eos=True)) for p in prompts]
    eng.run(seqs)
    eng.close()
    return [s.output_ids for s in seqs], torch.cat(logits)


@pytest.mark.parametrize("refresh", [1, 4])
@pytest.mark.parametrize("prefilter", ["none", "pages", "sketch"])
def test_refined_selection_is_the_oracle_when_candidates_cover_the_cache(tiny_llama, refresh, prefilter):
    """Candidates covering every position (superset x k beyond the cache): the true query's in-line pick is the
    exact top-k, the oracle's, at every step, also with a refresh interval (the tokens that arrive between two
    passes are kept as candidates: without them the pick would miss them and differ)."""
    model, tok = tiny_llama
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(100, 5000, (n,), generator=g).tolist() for n in (60, 85)]
    base = dict(budget=40, sink=4, recent=8, dense_layers=1, page_size=8)
    oracle = _greedy(model, tok, SparseConfig(method="oracle", **base), prompts)
    for method in ("asyncspade", "lastq"):
        cfg = SparseConfig(method=method, predictor="ridge", refine=True, superset=20, refresh=refresh,
                           prefilter=prefilter, **base)
        got = _greedy(model, tok, cfg, prompts)
        assert got[0] == oracle[0]
        torch.testing.assert_close(got[1], oracle[1])


def _vm_flags(ptr: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds address ``ptr``."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:                         # a mapping's first line: "start-end perms ..."
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= ptr < hi
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    return []


def test_kv_store_asks_for_huge_pages():
    """The store's memory is advised for 2 MiB pages (VmFlags "hg"), which Linux gives only on request where
    transparent huge pages run in "madvise" mode (whether it finds free ones is up to the machine)."""
    import pathlib
    if not pathlib.Path("/proc/self/smaps").exists():
        pytest.skip("no /proc/self/smaps here")
    store = KVStore(num_layers=4, slots=1, kv_heads=2, max_tokens=65536, head_dim=64, dtype=torch.bfloat16)
    inside = [-(-t.data_ptr() // (2 << 20)) * (2 << 20) for t in (store.k, store.v)]     # first 2 MiB boundary
    assert "hg" in _vm_flags(inside[0]) and "hg" in _vm_flags(inside[1])


def test_candidate_keys_are_the_candidates_keys_and_follow_new_lists():
    from asyncspade.selection.candidate_keys import CandidateKeys
    store = KVStore(num_layers=3, slots=3, kv_heads=2, max_tokens=64, head_dim=8, dtype=torch.bfloat16)
    store.k.copy_(torch.randn(store.k.shape, generator=torch.Generator().manual_seed(1)))
    ck = CandidateKeys(store, sparse_layers=[1, 2], width=6)
    g = torch.Generator().manual_seed(2)
    cand = torch.randint(0, 40, (2, 2, 6), generator=g)
    cand[0, 1, 2] = -1                                                     # no candidate there
    batch = Batch(lo=1, hi=3, start=torch.tensor([40, 40]), q_len=1)

    def expected(c):
        return gather_rows(store.k[2, 1:3], c.clamp(min=0))

    got = ck.get(2, batch, cand)
    ok = (cand >= 0)[..., None]
    assert torch.equal(torch.where(ok, got, 0), torch.where(ok, expected(cand), 0)) and ck.gathers == 23
    assert torch.equal(ck.get(2, batch, cand), got) and ck.gathers == 23   # same lists: nothing gathered
    new = cand.clone()
    new[1, 0, 0] = 39 if int(cand[1, 0, 0]) != 39 else 38               # one entry of row 1's list changes ...
    got = ck.get(2, batch, new)
    assert ck.gathers == 24 and torch.equal(got[1], expected(new)[1])       # ... only its key is gathered again
    late = new.clone()
    late[0, 0, 0] = 45                                                     # not written at length 41
    ck.get(2, batch, late)
    ck.get(2, batch, late)
    assert ck.gathers == 26                                                # so not held: gathered again
    store.k.copy_(torch.randn(store.k.shape, generator=g))                # new sequences in the same slots ...
    ck.reset(1, 3)
    got = ck.get(2, batch, late)                                           # ... same positions, their keys
    ok = ((late >= 0) & (late < 41))[..., None]
    assert torch.equal(torch.where(ok, got, 0), torch.where(ok, expected(late), 0))


@pytest.mark.parametrize("backend", ["c", "torch"])
def test_candidate_keys_skip_a_list_held_whole_but_not_one_with_unwritten_entries(backend):
    """With the selector's list generation, a list already held whole is not compared again; a list with a position
    not written yet is not held whole, so once the position is written its key is gathered under the same
    generation (the refreshed list's reserved newest positions)."""
    from asyncspade.selection.candidate_keys import CandidateKeys
    store = KVStore(num_layers=2, slots=2, kv_heads=2, max_tokens=64, head_dim=8, dtype=torch.bfloat16)
    store.k.copy_(torch.randn(store.k.shape, generator=torch.Generator().manual_seed(5)))
    ck = CandidateKeys(store, sparse_layers=[1], width=5)
    cand = torch.tensor([[[3, 9, 10, 11, 40], [1, 2, 5, 30, 40]], [[0, 7, 8, 20, 21], [4, 6, 12, 13, 14]]])
    gen = np.array([41, 30])
    with kernels.torch_only() if backend == "torch" else contextlib.nullcontext():
        ck.get(1, Batch(lo=0, hi=2, start=torch.tensor([39, 29]), q_len=1), cand, gen)   # row 0: 40 not written
        assert ck.gathers == 20
        got = ck.get(1, Batch(lo=0, hi=2, start=torch.tensor([40, 30]), q_len=1), cand, gen)
        assert ck.gathers == 22                                   # position 40 (both heads) written now: gathered
        assert torch.equal(got, gather_rows(store.k[1, 0:2], cand))
        other = cand.clone()
        other[1, 1, 0] = 3                                        # not a new generation: trusted to be the same list
        ck.get(1, Batch(lo=0, hi=2, start=torch.tensor([41, 31]), q_len=1), other, gen)
        assert ck.gathers == 22
        ck.get(1, Batch(lo=0, hi=2, start=torch.tensor([41, 31]), q_len=1), other, gen + 1)
        assert ck.gathers == 23                                   # a new generation: compared, the one change copied
        ck.reset(0, 2)
        ck.get(1, Batch(lo=0, hi=2, start=torch.tensor([41, 31]), q_len=1), other, gen + 1)
        assert ck.gathers == 43                                   # a new sequence: everything again


@pytest.mark.parametrize("backend", ["c", "torch"])
def test_gathered_candidates_follow_changing_lists(backend):
    """Lists of whole pages that change in part from call to call (as refreshed candidate lists do): the buffer
    always holds every listed key, through both the C kernel and its torch reference."""
    from asyncspade.selection.candidate_keys import CandidateKeys
    store = KVStore(num_layers=2, slots=2, kv_heads=3, max_tokens=256, head_dim=16, dtype=torch.bfloat16)
    store.k.copy_(torch.randn(store.k.shape, generator=torch.Generator().manual_seed(3)))
    ck = CandidateKeys(store, sparse_layers=[1], width=40)
    checked = CandidateKeys(store, sparse_layers=[1], width=46)        # with the check's 6 tokens in the last rows
    batch = Batch(lo=0, hi=2, start=torch.tensor([200, 150]), q_len=1)
    g = torch.Generator().manual_seed(4)
    with kernels.torch_only() if backend == "torch" else contextlib.nullcontext():
        for step in range(12):
            if step % 3 == 0:               # a list serves three steps (its generation), the check's tokens one
                pages = torch.stack([torch.stack([torch.randperm(12, generator=g)[:9] for _ in range(3)])
                                     for _ in range(2)])
                cand = (pages.sort(-1).values[..., None] * 4 + torch.arange(4)).flatten(2)[..., :36]  # [2, 3, 36]
                cand = torch.cat([cand, torch.full((2, 3, 4), -1)], -1)
                cand[0, 1, 5:9] = -1                                          # a page tail past the end
            extra = torch.randint(48, 150, (2, 3, 6), generator=g)
            extra[1, 2, 3] = -1                                               # already among the candidates
            generation = np.full(2, step // 3)
            for buf, ext in ((ck, None), (checked, extra)):
                got = buf.get(1, batch, cand, None if ext is None else generation, ext)
                full = cand if ext is None else torch.cat([cand, ext], -1)
                ok = (full >= 0)[..., None]
                want = gather_rows(store.k[1, 0:2], full.clamp(min=0))
                assert torch.equal(torch.where(ok, got, 0), torch.where(ok, want, 0))


def test_refresh_passes_are_spread_over_the_steps(monkeypatch):
    """With refresh r, each layer's step-ahead pass runs once every r steps on its own turn: after the first step
    (every layer, nothing made yet) a step runs about 1/r of the layers' passes, never all of them, and no layer's
    candidates get older than r steps."""
    from asyncspade.selection import local
    store = KVStore(num_layers=8, slots=1, kv_heads=2, max_tokens=400, head_dim=16, dtype=torch.float32, page_size=4,
                    track_pages=True)
    store.k.copy_(torch.randn(store.k.shape, generator=torch.Generator().manual_seed(6)))
    for layer in range(8):
        store.rebuild_pages(layer, 0, 0, 400)
    cfg = SparseConfig(method="asyncspade", budget=48, sink=2, recent=8, page_size=4, superset=2, refresh=4,
                       min_sparse=0)
    sel = local.SyncSelector(cfg, store, num_heads=4, sparse_layers=list(range(8)), scale=0.25)
    ran = []
    real = local.temporal_pass
    monkeypatch.setattr(local, "temporal_pass", lambda plan, w, li, *a: ran.append(li) or real(plan, w, li, *a))
    per_step, last = [], {}
    g = torch.Generator().manual_seed(7)
    for length in range(200, 224):
        batch = Batch(lo=0, hi=1, start=torch.tensor([length - 1]), q_len=1)
        ran.clear()
        for layer in range(8):
            sel.on_query(layer, torch.randn(1, 4, 1, 16, generator=g), batch)
        per_step.append(sorted(ran))
        for li in ran:
            last[li] = length
        assert all(length - last[li] < 4 for li in range(8))          # every list is younger than refresh
    assert per_step[0] == list(range(8))
    assert all(len(r) == 2 for r in per_step[1:])                     # 8 layers / refresh 4, every step


def test_refined_selection_differs_from_the_candidates_alone(tiny_llama):
    """With fewer candidates than the cache, the in-line pick is a real choice: refined and unrefined asyncspade
    decode differently (the check above is not vacuous), and the refined one's candidates ignore the current
    query while its pick does not."""
    from asyncspade.engine import Engine
    from asyncspade.sampling import SamplingParams
    model, tok = tiny_llama
    prompts = [list(range(200, 320))]
    base = dict(method="asyncspade", budget=32, sink=4, recent=8, dense_layers=1, predictor="ridge", superset=2,
                min_candidates=0, refresh=1)
    plain = _greedy(model, tok, SparseConfig(**base, refine=False), prompts)[1]
    refined = _greedy(model, tok, SparseConfig(**base, refine=True), prompts)[1]
    assert not torch.allclose(plain, refined)
    eng = Engine(model, tok, SparseConfig(**base, refine=True), max_batch=1, max_tokens=256)
    same_cand, same_pick = [], []

    def probe(layer, q, batch, sel):
        cand = eng.rt.method.select(eng.rt, layer, q + torch.randn_like(q) * 10, batch)
        same_cand.append(torch.equal(cand.idx, eng.rt.method.select(eng.rt, layer, q, batch).idx))
        from asyncspade.selection.passes import refine
        keys = eng.rt.store.k[layer, batch.lo:batch.hi]
        other = refine(eng.rt.selector.plan, torch.randn_like(q) * 10, keys, batch.lengths, cand.idx, eng.rt.scale)
        same_pick.append(torch.equal(other, sel.idx))
    eng.rt.probe = probe
    eng.run([eng.add(prompts[0], SamplingParams(max_tokens=5, ignore_eos=True))])
    eng.close()
    assert same_cand and all(same_cand) and not all(same_pick)


@pytest.mark.parametrize("chunk", [16, 512])
@pytest.mark.parametrize("weights", ["fp32", "int8"])
@pytest.mark.parametrize("method", ["quest", "asyncspade"])
def test_key_summaries_follow_every_write(tiny_llama, chunk, weights, method):
    """The page min/max (quest) and the key sketch (asyncspade) the selection reads are kept by every writer
    (chunked prefill, decode steps, a sequence adopted into a filled slot; decode through the torch ops and through
    the C layer glue of quantized weights): they equal summaries rebuilt from the stored keys."""
    from asyncspade.engine import Engine
    from asyncspade.sampling import SamplingParams
    model, tok = tiny_llama
    cfg = SparseConfig(method=method, budget=32, sink=4, recent=8, dense_layers=1, page_size=8, prefilter="sketch")
    eng = Engine(model, tok, cfg, max_batch=2, max_tokens=256, prefill_chunk=chunk, weights=weights)
    assert (eng.lean.glue is not None) == (weights == "int8" and kernels.backend() == "c")
    st = eng.store
    assert (st.track_pages, st.track_sketch) == ((True, False) if method == "quest" else (False, True))
    seq = eng.add(list(range(300, 377)), SamplingParams(max_tokens=13, ignore_eos=True))
    eng.run([seq])
    n = int(st.lengths[0])
    st.k[:, 1, :, :n] = st.k[:, 0, :, :n]              # a filled cache for the adopted sequence
    adopted = eng.adopt(1, list(range(300, 300 + n)), SamplingParams(max_tokens=6, ignore_eos=True))
    for layer in range(st.num_layers):
        st.rebuild(layer, 1, 0, n - 1)                  # what a bench does after filling a store
    eng.run([adopted])
    eng.close()
    for slot in (0, 1):
        m = int(st.lengths[slot])
        fresh = KVStore(st.num_layers, 1, st.kv_heads, st.max_tokens, st.head_dim, st.dtype, 8,
                        track_pages=st.track_pages, track_sketch=st.track_sketch)
        fresh.k[:, 0, :, :m] = st.k[:, slot, :, :m]
        pages = (m + 7) // 8
        for layer in range(st.num_layers):
            fresh.rebuild(layer, 0, 0, m)
            if method == "quest":
                assert torch.equal(st.pmin[layer, slot, :, :pages], fresh.pmin[layer, 0, :, :pages])
                assert torch.equal(st.pmax[layer, slot, :, :pages], fresh.pmax[layer, 0, :, :pages])
            else:
                assert torch.equal(st.kq[layer, slot, :, :, :m], fresh.kq[layer, 0, :, :, :m])
                blocks = st.ks[layer, slot, :, :(m + 15) // 16].view(st.kv_heads, -1, st.head_dim // 8, 16, 4)
                want = fresh.ks[layer, 0, :, :(m + 15) // 16].view(blocks.shape)
                tokens = lambda b: b.transpose(2, 3).flatten(1, 2)[:, :m]          # noqa: E731  [KVH, m, D/8, 4]
                assert torch.equal(tokens(blocks), tokens(want))


def test_check_adds_the_true_querys_best_tokens_the_candidates_missed():
    """The in-line check: the layer's true query scores the whole cache from the key sketch and its best tokens join
    the forecast's candidates (never twice), so a token it attends to strongly is picked even when no forecast
    proposed it."""
    from asyncspade.methods import method_class
    from asyncspade.selection.passes import check_tokens, refine
    from asyncspade.selection.plan import SelectionPlan
    T, n, d = 400, 300, 16
    store = KVStore(1, 1, 2, T, d, torch.float32, page_size=8, track_sketch=True)
    g = torch.Generator().manual_seed(9)
    store.k[0, 0, :, :n] = torch.randn(2, n, d, generator=g) * 0.3
    q = torch.randn(1, 4, d, generator=g)
    store.k[0, 0, 0, 123] = q[0, 0] * 2.0                 # the token KV head 0's first query attends to most
    store.rebuild(0, 0, 0, n)
    cfg = SparseConfig(method="asyncspade", budget=48, sink=4, recent=8, dense_layers=0, check=8)
    off = cfg.replace(check=0)
    assert method_class(cfg).needs_sketch(cfg) and not method_class(off).needs_sketch(off)
    plan = SelectionPlan.of(cfg, T)
    lengths = torch.tensor([n])
    keep = [p for p in range(cfg.sink, n - cfg.recent) if p != 123][::3]
    cand = torch.tensor(keep[:120] + [122, 124]).expand(1, 2, -1).contiguous()     # 123 missed, its neighbours not
    keys = store.k[0, 0:1]
    plain = refine(plan, q, keys, lengths, cand, 1.0)
    assert 123 not in plain[0, 0].tolist()
    union = torch.cat([cand, check_tokens(plan, q, store.sketch(0, 0, 1), lengths, cand, 1.0)], -1)
    assert union.shape[-1] == cand.shape[-1] + cfg.check
    for h in range(2):
        got = [p for p in union[0, h].tolist() if p >= 0]
        assert len(got) == len(set(got))                   # the check's tokens already among the candidates are -1
    assert 123 in union[0, 0].tolist()
    checked = refine(plan, q, keys, lengths, union, 1.0)
    assert 123 in checked[0, 0].tolist()
    # a cache shorter than the check: every position at most once
    short = torch.cat([cand[..., :4], check_tokens(SelectionPlan.of(cfg.replace(check=64), T), q,
                                                   store.sketch(0, 0, 1), torch.tensor([40]), cand[..., :4], 1.0)], -1)
    for h in range(2):
        got = [p for p in short[0, h].tolist() if p >= 0]
        assert len(got) == len(set(got)) and max(got) < 40 - cfg.recent
    with pytest.raises(ConfigError, match="check"):
        cfg.replace(check=-1).validate()

