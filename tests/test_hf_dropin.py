"""The Hugging Face drop-in (asyncspade.hf): ``model.generate`` with our cache runs the engine's algorithm."""
from __future__ import annotations

import pytest
import torch

import asyncspade
from asyncspade.config import METHODS, ConfigError, SparseConfig
from asyncspade.engine import Engine
from asyncspade.hf import HANDLE_ATTR, disable
from asyncspade.models import tiny_model
from asyncspade.sampling import SamplingParams
from conftest import EXACT

SMALL = dict(budget=32, sink=4, recent=8, dense_layers=1, max_tokens=256)   # prompt 100 >> budget: sparse decode
NEW = 20


def make_model(arch: str):
    """A tiny random model whose greedy tokens vary (default init repeats one token, making equality tests weak)."""
    model, tok = tiny_model(arch, seed=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15, generator=g)
    return model, tok


pytestmark = pytest.mark.usefixtures("one_thread")      # tiny tensors: see conftest.one_thread


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def tiny(request):
    return make_model(request.param)


@pytest.fixture(scope="module")
def prompts():
    """Three prompts of random token ids (the tiny models are random too: real text would add nothing)."""
    g = torch.Generator().manual_seed(7)
    return [torch.randint(100, 5000, (n,), generator=g).tolist() for n in (100, 100, 90)]


def uses(model, cache) -> dict:
    """``generate`` keyword arguments that pass ``cache`` (its keyword depends on the transformers release)."""
    return {asyncspade.cache_keyword(model): cache}


def hf_greedy(model, ids, **kw) -> list[list[int]]:
    x = torch.tensor(ids if isinstance(ids[0], list) else [ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False, **kw)
    return [row[x.shape[1]:].tolist() for row in out]


def hf_greedy_handle(handle, ids):
    return handle.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False)[0, len(ids):].tolist()


def engine_greedy(model, tok, prompts_, **settings) -> list[list[int]]:
    settings = dict(settings)
    max_tokens = settings.pop("max_tokens")
    previous = model.config._attn_implementation
    eng = Engine(model, tok, SparseConfig(**settings), max_batch=len(prompts_), max_tokens=max_tokens, **EXACT)
    try:
        seqs = [eng.add(p, SamplingParams(max_tokens=NEW)) for p in prompts_]
        eng.run(seqs)
    finally:
        eng.close()
        model.set_attn_implementation(previous)      # the engine leaves its attention implementation on
    return [s.output_ids for s in seqs]


def strip_eos(tokens: list[int], tok) -> list[int]:
    """HF keeps the EOS it stopped on; the engine does not emit it."""
    return tokens[:-1] if tokens and tokens[-1] == tok.eos_token_id else tokens


def count_sparse_steps(model) -> list[int]:
    """Count decode attention calls that used a sparse selection (via the runtime's probe)."""
    n = [0]
    getattr(model, HANDLE_ATTR).rt.probe = lambda layer, q, batch, sel: n.__setitem__(0, n[0] + (sel is not None))
    return n


def test_full_reproduces_hf_generate_and_exit_restores(tiny, prompts):
    model, _ = tiny
    ref = hf_greedy(model, prompts[0])
    assert len(set(ref[0])) > 5, "tiny model too degenerate for an equality test"
    with asyncspade.sparse_attention(model, method="full", **SMALL) as cache:
        assert model.config._attn_implementation == "asyncspade"
        assert hf_greedy(model, prompts[0], **uses(model, cache)) == ref
    with asyncspade.sparse_attention(model, method="streaming", **SMALL) as cache:
        sparse = hf_greedy(model, prompts[0], **uses(model, cache))
    assert sparse != ref          # budget 32 of 120 tokens changes the output: the sparse path was really on
    assert model.config._attn_implementation == "sdpa"
    assert not hasattr(model, HANDLE_ATTR)
    assert not model.model._forward_pre_hooks
    assert all(not hasattr(layer.self_attn, "asyncspade_rt") for layer in model.model.layers)
    assert hf_greedy(model, prompts[0]) == ref


@pytest.mark.parametrize("method,extra", [
    ("oracle", {}), ("quest", {}), ("asyncspade", {"predictor": "hybrid"}), ("asyncspade", {"predictor": "ridge"}),
    ("lastq", {}), ("streaming", {}),
])
def test_generate_equals_engine(tiny, prompts, method, extra):
    model, tok = tiny
    want = engine_greedy(model, tok, [prompts[0]], method=method, **SMALL, **extra)[0]
    with asyncspade.sparse_attention(model, method=method, **SMALL, **extra) as cache:
        steps = count_sparse_steps(model)
        got = hf_greedy(model, prompts[0], **uses(model, cache))[0]
    assert steps[0] == (NEW - 1) * (model.config.num_hidden_layers - 1)     # every sparse layer, every decode step
    assert strip_eos(got, tok) == want


@pytest.mark.parametrize("method", METHODS)
def test_generate_really_decodes_sparsely(tiny, prompts, method):
    """A drop-in generation at a budget far below the context takes the sparse path at every sparse layer of every
    decode step: a cache the drop-in fails to recognise (e.g. passed under a renamed keyword) would make it silently
    dense, and this count would be zero."""
    model, _ = tiny
    with asyncspade.enable(model, method=method, **SMALL) as handle:
        handle.generate(torch.tensor([prompts[0]]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
        by_handle = handle.rt.sparse_calls
        handle.rt.sparse_calls = 0
        handle.cache.reset()
        hf_greedy(model, prompts[0], min_new_tokens=NEW, **uses(model, handle.cache))
        by_generate = handle.rt.sparse_calls
    sparse_layers = model.config.num_hidden_layers - SMALL["dense_layers"]
    want = 0 if method == "full" else (NEW - 1) * sparse_layers
    assert by_handle == by_generate == want


def test_batch_of_two_equals_engine(tiny, prompts):
    model, tok = tiny
    pair = prompts[:2]
    want = engine_greedy(model, tok, pair, method="asyncspade", **SMALL)
    handle = asyncspade.enable(model, method="asyncspade", max_batch=2, **SMALL)
    try:
        got = [strip_eos(t, tok) for t in hf_greedy(model, pair, **uses(model, handle.cache))]
    finally:
        disable(model)
    assert got == want
    assert want[0] != want[1]


def test_padded_batch_falls_back_to_dense(tiny, prompts):
    model, tok = tiny
    pad = len(prompts[0]) - len(prompts[2])       # 100 and 90 tokens: left-pad the second
    ids = torch.tensor([prompts[0], [tok.pad_token_id] * pad + prompts[2]])
    mask = (torch.arange(ids.shape[1]) >= torch.tensor([[0], [pad]])).long()
    kw = dict(attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    ref = model.generate(ids, **kw)
    with asyncspade.sparse_attention(model, method="oracle", max_batch=2, **SMALL) as cache:
        steps = count_sparse_steps(model)
        got = model.generate(ids, **uses(model, cache), **kw)
    assert steps[0] == 0
    assert torch.equal(got, ref)


def test_handle_generate_uses_a_fresh_cache(tiny, prompts):
    model, tok = tiny
    want = [engine_greedy(model, tok, [p], method="lastq", **SMALL)[0] for p in prompts[:2]]
    with asyncspade.enable(model, method="lastq", **SMALL) as handle:
        got = [hf_greedy_handle(handle, p) for p in (prompts[0], prompts[1], prompts[0])]
    assert [strip_eos(t, tok) for t in got] == [want[0], want[1], want[0]]


def test_foreign_cache_runs_dense_with_a_warning(tiny, prompts):
    model, _ = tiny
    ref = hf_greedy(model, prompts[0])
    with asyncspade.sparse_attention(model, method="streaming", **SMALL):
        with pytest.warns(UserWarning, match="does not use the sparse cache"):
            got = hf_greedy(model, prompts[0])            # generate builds its own DynamicCache
    assert got == ref


def test_enable_replaces_and_rejects_bad_input(tiny, prompts):
    model, _ = tiny
    with pytest.raises(ConfigError, match="unknown method"):
        asyncspade.enable(model, method="nope")
    with pytest.raises(ConfigError, match="unknown sparse setting"):
        asyncspade.enable(model, method="oracle", bugdet=64)
    assert model.config._attn_implementation == "sdpa"        # nothing was switched on by a failed enable
    first = asyncspade.enable(model, method="oracle", **SMALL)
    second = asyncspade.enable(model, method="quest", **SMALL)
    try:
        assert len(model.model._forward_pre_hooks) == 1
        assert model.model.layers[0].self_attn.asyncspade_rt is second.rt
        with pytest.raises(ValueError, match="max_batch=1"):
            hf_greedy(model, [prompts[0], prompts[1]], **uses(model, second.cache))
    finally:
        disable(model)
    assert first.rt is not second.rt
    assert model.config._attn_implementation == "sdpa"


def test_beam_search_is_refused(tiny, prompts):
    model, _ = tiny
    with asyncspade.enable(model, method="oracle", max_batch=2, **SMALL) as handle:
        with pytest.raises(NotImplementedError, match="beam search"):
            handle.generate(torch.tensor([prompts[0]]), num_beams=2, max_new_tokens=4, do_sample=False)
    assert model.config._attn_implementation == "sdpa"
