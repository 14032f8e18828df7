"""Sampling controls (vLLM/OpenAI names): penalties, logit bias, top-k, min-p, stop token ids, and log-probabilities,
checked against their definitions on the engine's own logits."""
import math

import pytest
import torch

from asyncspade.config import SparseConfig
from asyncspade.engine import Engine, RequestError
from asyncspade.sampling import SamplingParams, apply_penalties, sample
from conftest import decode_recording_logits

PROMPT = [5, 9, 5, 17, 300, 301, 302, 5]


def recorded(model, tok, params: SamplingParams, prompt=PROMPT):
    # int8 weights: this tiny model's greedy continuation of PROMPT repeats tokens there, so the penalties bite
    return decode_recording_logits(model, tok, prompt, params, weights="int8")


def test_penalties_follow_their_definitions():
    x = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0])
    p = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25, logit_bias={4: 10.0})
    out = apply_penalties(x, p, prompt_ids=[0], output_ids=[1, 3, 3])
    # bias: +10 on token 4; repetition (tokens 0, 1, 3 seen): positive / 2, negative * 2;
    # presence 0.5 on tokens 1 and 3; frequency 0.25 per occurrence (token 1 once, token 3 twice)
    expected = torch.tensor([2.0 / 2, -1.0 * 2 - 0.5 - 0.25, 0.5, 3.0 / 2 - 0.5 - 0.5, -2.0 + 10])
    assert torch.allclose(out, expected)
    assert torch.equal(x, torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0]))            # the engine's logits are not touched
    assert apply_penalties(x, SamplingParams(), [0], [1]) is x                   # nothing asked: nothing done


def test_top_k_and_min_p_restrict_the_draw():
    logits = torch.tensor([5.0, 4.9, 4.8, -1.0, -1.0, -1.0])
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, SamplingParams(temperature=1.0, top_k=2), g) for _ in range(200)}
    assert draws == {0, 1}
    draws = {sample(logits, SamplingParams(temperature=1.0, min_p=0.5), g) for _ in range(200)}
    assert draws == {0, 1, 2}                                                    # within half the top probability
    assert {sample(logits, SamplingParams(temperature=1.0), g) for _ in range(2000)} > {0, 1, 2}


def test_penalized_greedy_decoding_is_argmax_of_the_penalized_logits(tiny_llama):
    model, tok = tiny_llama
    plain, _ = recorded(model, tok, SamplingParams(max_tokens=24, ignore_eos=True))
    params = SamplingParams(max_tokens=24, ignore_eos=True, presence_penalty=1.5, frequency_penalty=1.0,
                            repetition_penalty=1.3)
    seq, logits = recorded(model, tok, params)
    assert seq.output_ids != plain.output_ids                                    # the penalties change the output
    for i, (tok_id, lg) in enumerate(zip(seq.output_ids, logits)):
        penalized = apply_penalties(lg, params, PROMPT, seq.output_ids[:i])
        assert tok_id == int(penalized.argmax()), i
    assert len(set(seq.output_ids)) > len(set(plain.output_ids))                 # fewer repeats


def test_logit_bias_forces_a_token(tiny_llama):
    model, tok = tiny_llama
    seq, _ = recorded(model, tok, SamplingParams(max_tokens=5, ignore_eos=True, logit_bias={123: 100.0}))
    assert seq.output_ids == [123] * 5


def test_logprobs_are_the_log_softmax_of_the_engines_logits(tiny_llama):
    model, tok = tiny_llama
    seq, logits = recorded(model, tok, SamplingParams(max_tokens=8, ignore_eos=True, temperature=1.0, seed=4,
                                                      logprobs=3))
    assert len(seq.logprobs) == len(seq.output_ids) == len(logits) == 8
    total = 0.0
    for t, entry, lg in zip(seq.output_ids, seq.logprobs, logits):
        ref = lg.log_softmax(-1)
        top = ref.topk(3)
        assert [i for i, lp in entry.items() if lp.rank <= 3] == top.indices.tolist()
        for i, lp in entry.items():
            assert math.isclose(lp.logprob, float(ref[i]), abs_tol=1e-5)
            assert lp.rank == int((ref > ref[i]).sum()) + 1
        assert t in entry
        total += entry[t].logprob
    assert math.isclose(seq.cumulative_logprob, total, rel_tol=1e-6)


def test_stop_token_ids_finish_like_eos(tiny_llama):
    model, tok = tiny_llama
    free, _ = recorded(model, tok, SamplingParams(max_tokens=12, ignore_eos=True))
    stop = free.output_ids[5]
    first = free.output_ids.index(stop)
    seq, _ = recorded(model, tok, SamplingParams(max_tokens=12, ignore_eos=True, stop_token_ids=[stop]))
    assert seq.output_ids == free.output_ids[:first] and seq.finish_reason == "stop"


@pytest.mark.parametrize("params,field", [
    (SamplingParams(top_k=-2), "top_k"), (SamplingParams(min_p=1.5), "min_p"),
    (SamplingParams(repetition_penalty=0), "repetition_penalty"), (SamplingParams(presence_penalty=3), "presence"),
    (SamplingParams(frequency_penalty=-2.5), "frequency"), (SamplingParams(logprobs=21), "logprobs"),
    (SamplingParams(logit_bias={10**9: 1.0}), "logit_bias"), (SamplingParams(stop_token_ids=[-1]), "stop_token_ids"),
    (SamplingParams(n=0), "n"),
])
def test_bad_params_are_request_errors(tiny_llama, params, field):
    model, tok = tiny_llama
    eng = Engine(model, tok, SparseConfig(), max_batch=1)
    try:
        with pytest.raises(RequestError, match=field):
            eng.add([1, 2, 3], params)
        assert not eng.has_work()
    finally:
        eng.close()
