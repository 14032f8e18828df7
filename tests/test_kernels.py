"""The compiled decode kernels against their torch references (kernels/reference.py), over the dtypes, head dims and
group sizes they specialise on (vectorised G x D fast paths, the generic vector path, the scalar path)."""
from __future__ import annotations

import pytest
import torch

from asyncspade import kernels as K
from asyncspade.kernels import reference as R

GEN = torch.Generator()


def randn(*shape):
    return torch.randn(*shape, generator=GEN.manual_seed(sum(shape) * 31 + len(shape)))


SHAPES = [(64, 3), (128, 4), (64, 5), (16, 2), (24, 3)]      # (head dim, query heads per KV head)
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True, scope="module")
def built():
    if K.backend() != "c":
        pytest.skip(f"C kernels unavailable here: {K.why_not()}")


def store(b, kvh, t, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a slot range of a larger store: the views the engine passes are not at offset 0
    full = torch.randn(b + 2, kvh, t, d, generator=g).to(dtype)
    return full[1:b + 1]


def close(a, r, dtype):
    torch.testing.assert_close(a.float(), r.float(), atol=2e-5 if dtype == torch.float32 else 2e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,g", SHAPES)
def test_attend_dense_and_sparse(dtype, d, g):
    b, kvh, t = 3, 2, 700                       # 700 > the 256-position chunk: several work items per row
    k, v = store(b, kvh, t, d, dtype), store(b, kvh, t, d, dtype, seed=1)
    q = randn(b, kvh, g, d)
    begin, end = torch.tensor([0, 5, 600]), torch.tensor([700, 300, 640])
    close(K.attend(q, k, v, 0.1, torch.empty(b, kvh, g, d), begin, end), R.attend(q, k, v, 0.1, begin, end), dtype)
    gen = torch.Generator().manual_seed(2)
    idx = torch.randint(0, t, (b, kvh, 90), generator=gen)
    valid = torch.rand(b, kvh, 90, generator=gen) > 0.3
    pre, use = torch.tensor([4, 0, 4]), torch.tensor([True, False, True])
    lim_hi = torch.tensor([650, 700, 500])
    args = (begin, end, pre, idx, valid, use, 4, lim_hi)
    close(K.attend(q, k, v, 0.1, torch.empty(b, kvh, g, d), *args), R.attend(q, k, v, 0.1, *args), dtype)
    out = torch.empty(b, kvh, g, d, dtype=torch.bfloat16)        # bf16 output (the int formats' activations)
    close(K.attend(q, k, v, 0.1, out, *args), R.attend(q, k, v, 0.1, *args), torch.bfloat16)


def test_attend_with_nothing_to_attend_writes_zeros():
    k = v = store(1, 1, 32, 64, torch.float32)
    q = randn(1, 1, 2, 64)
    idx = torch.zeros(1, 1, 4, dtype=torch.int64)
    out = K.attend(q, k, v, 0.1, torch.full((1, 1, 2, 64), 7.0), torch.tensor([3]), torch.tensor([3]),
                   idx=idx, valid=torch.zeros(1, 1, 4, dtype=torch.bool))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,g", SHAPES)
@pytest.mark.parametrize("aggregate", ["sum", "max"])
def test_score_tokens_and_pages(dtype, d, g, aggregate):
    b, kvh, t = 2, 3, 2500                      # > one 1024-candidate chunk
    k = store(b, kvh, t, d, dtype)
    q = randn(b, kvh, g, d)
    hi = torch.tensor([2400, 900])
    kw = dict(lo=4, hi=hi, n=2450, aggregate=aggregate)
    close(K.score(q, k, 0.1, **kw), R.score(q, k, 0.1, **kw), dtype)
    idx = torch.randint(0, t, (b, kvh, 300), generator=torch.Generator().manual_seed(3))
    close(K.score(q, k, 0.1, lo=4, hi=hi, idx=idx, aggregate=aggregate),
          R.score(q, k, 0.1, lo=4, hi=hi, idx=idx, aggregate=aggregate), dtype)
    # the candidates' keys gathered in order: the same scores as read in place
    gathered = R.gather_rows(k, idx)
    in_place = K.score(q, k, 0.1, lo=4, hi=hi, idx=idx, aggregate=aggregate)
    assert torch.equal(K.score(q, gathered, 0.1, lo=4, hi=hi, idx=idx, aggregate=aggregate, gathered=True), in_place)
    close(R.score(q, gathered, 0.1, lo=4, hi=hi, idx=idx, aggregate=aggregate, gathered=True), in_place, dtype)
    kmax = (k.float() + randn(*k.shape).abs()).to(dtype)             # page minima/maxima
    close(K.score(q, k, 0.1, kmax=kmax, **kw), R.score(q, k, 0.1, kmax=kmax, **kw), dtype)


def sketch_of(k, start, count, impl):
    """A fresh sketch ``(ks, kq)`` of ``k [B, KVH, T, D]`` with positions ``[start, start + count)`` written."""
    b, kvh, t, d = k.shape
    ks = torch.zeros(b, kvh, (t + 15) // 16, 8 * d, dtype=torch.uint8)
    kq = torch.zeros(b, kvh, 2, t)
    impl.sketch_write(k, ks, kq, torch.full((b,), start), count)
    return ks, kq


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,g", [(64, 3), (128, 4), (24, 3), (16, 2)])
@pytest.mark.parametrize("aggregate", ["sum", "max"])
def test_sketch_matches_reference(dtype, d, g, aggregate):
    b, kvh, t = 2, 3, 2500                      # > one 1024-candidate chunk, not a whole number of blocks
    k = store(b, kvh, t, d, dtype) * torch.linspace(0.2, 3.0, d)     # channels of different ranges, as RoPE keys
    k = k.to(dtype)
    ks, kq = sketch_of(k, 0, t, K)
    rs, rq = sketch_of(k, 0, t, R)
    # the same nibbles but where a value sits on a rounding boundary (the compiled division may differ in an ulp)
    assert (ks != rs).float().mean() < 1e-3
    torch.testing.assert_close(kq, rq, atol=1e-6, rtol=1e-5)
    u, scale, mn = R.sketch_keys(ks, kq, t)
    err = (u * scale[..., None] + mn[..., None] - k.double()).abs()
    assert bool((err <= scale[..., None] / 2 + 1e-4).all())         # each channel within half a step of its key
    q = randn(b, kvh, g, d)
    hi = torch.tensor([2400, 900])
    got = K.sketch_score(q, ks, kq, 0.1, 4, hi, 2450, aggregate)
    torch.testing.assert_close(got, R.sketch_score(q, ks, kq, 0.1, 4, hi, 2450, aggregate), atol=1e-6, rtol=1e-4)
    assert bool((got[:, :, :4] == -1).all()) and bool((got[1, :, 900:] == -1).all())    # outside [lo, hi)
    # the check's ranking: the largest score less its head's maximum, no softmax
    logit = K.sketch_score(q, ks, kq, 0.1, 4, hi, 2450, "logit")
    torch.testing.assert_close(logit, R.sketch_score(q, ks, kq, 0.1, 4, hi, 2450, "logit"), atol=1e-5, rtol=1e-5)
    assert bool((logit[..., 4:2400] <= 0).all()) and float(logit[0, 0, 4:2400].max()) == 0.0
    assert bool((logit[1, :, 900:] < -1e30).all())
    # close to the exact scores of the keys it copies: the same best tokens, nearly
    exact = R.score(q, k, 0.1, lo=4, hi=hi, n=2446, aggregate=aggregate)
    top = lambda x, lo: set((x[0, 0].topk(200).indices + lo).tolist())
    assert len(top(got, 0) & top(exact, 4)) >= 150


def test_sketch_written_token_by_token_equals_one_write():
    """Decode writes one token at a time into blocks of 16 that earlier writes filled in part."""
    k = store(2, 3, 100, 64, torch.bfloat16, seed=7)
    ks, kq = sketch_of(k, 0, 37, K)
    for p in range(37, 100):
        K.sketch_write(k, ks, kq, torch.tensor([p, p]), 1)
    whole, whole_q = sketch_of(k, 0, 100, K)
    assert torch.equal(ks, whole) and torch.equal(kq, whole_q)


def test_sketch_scores_equal_exact_scores_when_lossless():
    """Keys that take 16 evenly spaced values per token and an int8 query lose nothing in the sketch: the scores are
    the exact ones, so the sketch proposes the exact top-k."""
    g = torch.Generator().manual_seed(8)
    b, kvh, t, d, grp = 1, 2, 600, 64, 3
    u = torch.randint(0, 16, (b, kvh, t, d), generator=g).float()
    u[..., 0], u[..., 1] = 0.0, 15.0                  # every token spans the whole range: min 0, step 1
    k = u * 0.25 - 1.0
    q = torch.randint(-127, 128, (b, kvh, grp, d), generator=g).float()
    q[..., 0] = 127.0                                 # int8 scale exactly 1
    q = q / 200.0
    ks, kq = sketch_of(k, 0, t, K)
    hi = torch.tensor([580])
    got = K.sketch_score(q, ks, kq, 0.05, 4, hi, 580)
    exact = R.score(q, k, 0.05, lo=4, hi=hi, n=576)
    assert bool((got[..., :4] == -1).all())
    torch.testing.assert_close(got[..., 4:], exact, atol=1e-7, rtol=1e-4)
    assert torch.equal(K.topk(got, 100), K.topk(exact, 100, lo=4))


def test_topk_matches_reference_and_breaks_ties_low():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(2, 3, 500, generator=g)
    s[0, 0, 10:20] = 5.0                         # ten equal best scores: the five lowest candidates win
    got = K.topk(s, 5)
    assert torch.equal(got[0, 0], torch.arange(10, 15))
    assert torch.equal(got, R.topk(s, 5))
    idx = torch.randint(0, 10_000, (2, 3, 500), generator=g)
    assert torch.equal(K.topk(s, 40, idx=idx), R.topk(s, 40, idx=idx))
    assert torch.equal(K.topk(s, 8, lo=2, expand=16), R.topk(s, 8, lo=2, expand=16))
    assert torch.equal(K.topk(s[..., :3], 5), R.topk(s[..., :3], 5))              # fewer candidates than k
    big = torch.randn(2, 3, 40_000, generator=g)                  # a few of many (the in-line check's case)
    big[1, 2, 1000:1100] = 9.0                                    # more equal best scores than k: the lowest win
    for k in (1, 20, 64, 700):
        assert torch.equal(K.topk(big, k), R.topk(big, k))
    # a candidate list of pages: tokens at or past hi are -1, then the positions reserved from hi on (capped)
    hi = torch.tensor([70, 7990])
    got = K.topk(s, 8, lo=2, expand=16, hi=hi, gap=3, limit=7992)
    assert torch.equal(got, R.topk(s, 8, lo=2, expand=16, hi=hi, gap=3, limit=7992))
    plain = K.topk(s, 8, lo=2, expand=16)
    assert torch.equal(got[..., :128], torch.where(plain < hi.view(-1, 1, 1), plain, -1))
    assert got[0, 0, 128:].tolist() == [70, 71, 72] and got[1, 2, 128:].tolist() == [7990, 7991, 7991]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm,bias", [(False, False), (True, False), (False, True)])
def test_qkv_post_and_layer_glue(dtype, norm, bias):
    h, kvh, d, n, pmax = 6, 2, 64, 5, 64
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(n, (h + 2 * kvh) * d, generator=g).to(dtype)
    b = torch.randn((h + 2 * kvh) * d, generator=g) if bias else None
    qn, kn = (torch.rand(d, generator=g) + 0.5, torch.rand(d, generator=g) + 0.5) if norm else (None, None)
    ang = torch.rand(pmax, d // 2, generator=g) * 6
    slot, pos = torch.tensor([0, 1, 1, 2, 0]), torch.tensor([3, 7, 8, 60, 4])
    outs = []
    for impl in (K, R):
        ks, vs = torch.zeros(3, kvh, pmax, d, dtype=dtype), torch.zeros(3, kvh, pmax, d, dtype=dtype)
        q = torch.empty(n, h, d)
        impl.qkv_post(qkv, b, qn, kn, 1e-6, ang.cos(), ang.sin(), slot, pos, ks, vs, h, kvh, q)
        outs.append((q, ks, vs))
    for a, r in zip(*outs):
        close(a, r, dtype)
    x = torch.randn(4, 576, generator=g)
    delta, w = torch.randn(4, 576, generator=g).to(dtype), torch.rand(576, generator=g)
    hk, hr = x.clone(), x.clone()
    ok, orf = torch.empty(4, 576, dtype=dtype), torch.empty(4, 576, dtype=dtype)
    K.add_rmsnorm(hk, delta, w, 1e-5, ok)
    R.add_rmsnorm(hr, delta, w, 1e-5, orf)
    close(hk, hr, torch.float32)
    close(ok, orf, dtype)
    gu = torch.randn(3, 2 * 1536, generator=g).to(dtype)
    close(K.silu_mul(gu, torch.empty(3, 1536, dtype=dtype)), R.silu_mul(gu, torch.empty(3, 1536, dtype=dtype)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_page_append_matches_reference(dtype):
    # rows at a page's first token (reset), inside a page (fold in) and on the last token of a page
    k = store(3, 2, 64, 32, dtype, seed=3)
    start = torch.tensor([16, 21, 47])
    outs = []
    for impl in (K, R):
        pmin, pmax = store(3, 2, 4, 32, dtype, seed=4).clone(), store(3, 2, 4, 32, dtype, seed=5).clone()
        impl.page_append(k, pmin, pmax, start, 16)
        outs.append((pmin, pmax))
    for a, r in zip(*outs):
        assert torch.equal(a, r)
    pmin, pmax = outs[0]
    assert torch.equal(pmin[0, :, 1], k[0, :, 16]) and torch.equal(pmax[0, :, 1], k[0, :, 16])
    assert not torch.equal(pmin[1, :, 1], k[1, :, 21])      # folded in, not reset


@pytest.mark.parametrize("n,k", [(40, 64), (17, 96), (96, 576), (24, 1536)])
def test_linear_i4_matches_reference_and_each_row_stands_alone(n, k):
    # K/32 groups not a multiple of 4 (masked chunks), N not a multiple of the row tiles, 1..9 activation rows
    from asyncspade.quant import Linear
    g = torch.Generator().manual_seed(n + k)
    lin = Linear.from_weight("int4", torch.randn(n, k, generator=g) * 0.05)
    w4, sm = lin.t["w4"], lin.t["sm"]
    x = torch.randn(9, k, generator=g)
    x[2, :32] = 0                                                   # a group of zeros: no division by zero
    ours = K.linear_i4(x, w4, sm)
    torch.testing.assert_close(ours, R.linear_i4(x, w4, sm), atol=1e-4, rtol=1e-4)
    for m in (1, 2, 3, 5):                                          # a row's result does not depend on its batch
        assert torch.equal(K.linear_i4(x[:m], w4, sm), ours[:m])
    assert torch.equal(K.linear_i4(x.to(torch.bfloat16), w4, sm), K.linear_i4(x.to(torch.bfloat16).float(), w4, sm))
    # the activations' int8 rounding only: close to the fp32 product with the same weights
    exact = x @ lin.dequantized().t()
    assert (ours - exact).norm() / exact.norm() < 0.03
    assert torch.equal(K.dequant_i4(w4, sm), R.dequant_i4(w4, sm))


def test_results_do_not_depend_on_the_thread_count():
    k, v = store(1, 3, 5000, 64, torch.bfloat16), store(1, 3, 5000, 64, torch.bfloat16, seed=1)
    q = randn(1, 3, 3, 64)
    n = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(K.attend(q, k, v, 0.1, torch.empty(1, 3, 3, 64), torch.tensor([0]), torch.tensor([5000])))
    finally:
        torch.set_num_threads(n)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("order", [1, 4])
def test_ridge_forecast_matches_the_torch_predictor(order):
    from asyncspade.predictor import forecast
    w = torch.randn(3, 9, 16, 64, generator=torch.Generator().manual_seed(6)).cumsum(2)   # correlated in time
    count = torch.tensor([16, 9, order])          # a full window, a partial one, one too short to fit
    got = forecast(w, count, "ar", order, 1e-2)
    with K.torch_only():
        want = forecast(w, count, "ar", order, 1e-2)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got[2], w[2, :, -1])       # too short: the last query
