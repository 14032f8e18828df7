"""The Python API in vLLM's shape: RequestOutput/CompletionOutput, n samples, chat, a context manager, the selector;
and no lost or stale work: length checks, whole-batch validation, abandoned streams."""
import pytest

from asyncspade import LLM, SamplingParams
from asyncspade.engine import RequestError
from asyncspade.models import encode_prompt

SPARSE = dict(method="oracle", budget=32, sink=4, recent=8, dense_layers=1)
TEXT = "The lighthouse keeper climbed the stairs every evening to light the lamp, and the sea"


@pytest.fixture(scope="module")
def llm(tiny_dir):
    with LLM(tiny_dir, max_batch=4, **SPARSE) as llm:
        yield llm


def test_one_params_for_all_and_length_mismatch(llm):
    """Item 8: one SamplingParams applies to every prompt; a list of another length is an error, not a zip."""
    with pytest.raises(ValueError, match="3 prompts but 1 SamplingParams"):
        llm.generate(["a", "b", "c"], [SamplingParams(max_tokens=2)])
    assert not llm.engine.has_work()
    outs = llm.generate(["a", "b", "c"], SamplingParams(max_tokens=2, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [2, 2, 2]


def test_a_bad_prompt_queues_nothing(llm):
    """Item 9: the batch is checked whole before anything is queued, so nothing stale runs in the next call."""
    with pytest.raises(RequestError, match="exceeds the context"):
        llm.generate(["fine", "x " * 5000], SamplingParams(max_tokens=4))
    assert not llm.engine.has_work()
    with pytest.raises(RequestError):
        llm.generate(["fine", "also fine", [10**9]], SamplingParams(max_tokens=4))
    assert not llm.engine.has_work()


def test_abandoned_stream_frees_its_slot(llm):
    """Item 9: a stream closed early aborts its sequence; it is not decoded by later calls."""
    it = llm.stream(TEXT, SamplingParams(max_tokens=500, ignore_eos=True))
    next(it)
    next(it)
    it.close()
    seq = llm.last
    decoded = len(seq.output_ids)
    out = llm.generate(TEXT, SamplingParams(max_tokens=8, ignore_eos=True))
    assert len(seq.output_ids) == decoded and seq.finish_reason == "abort"
    assert len(out[0].token_ids) == 8
    assert not llm.engine.has_work()


def test_streams_and_generate_interleaved_lose_nothing(llm):
    a = llm.stream(TEXT, SamplingParams(max_tokens=12, ignore_eos=True))
    first = next(a)
    whole = llm.generate(TEXT, SamplingParams(max_tokens=12, ignore_eos=True))[0].text   # steps the stream's seq too
    assert first + "".join(a) == whole


def test_vllm_shapes(llm):
    """Item 10: RequestOutput.outputs[i].text/.token_ids/.finish_reason/.logprobs, n samples with seeds seed + i,
    chat() through the chat template."""
    [out] = llm.generate(TEXT, SamplingParams(n=3, max_tokens=6, temperature=1.0, seed=7, logprobs=2,
                                              ignore_eos=True))
    assert [o.index for o in out.outputs] == [0, 1, 2]
    for i, o in enumerate(out.outputs):
        [alone] = llm.generate(TEXT, SamplingParams(max_tokens=6, temperature=1.0, seed=7 + i, ignore_eos=True))
        assert (o.text, o.token_ids, o.finish_reason) == (alone.text, alone.token_ids, "length")
        assert len(o.logprobs) == 6 and all(t in e for t, e in zip(o.token_ids, o.logprobs))
        assert o.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(o.token_ids, o.logprobs)))
    assert out.text == out.outputs[0].text and out.prompt == TEXT and out.metrics.ttft_s > 0
    msgs = [{"role": "user", "content": TEXT}]
    [chat] = llm.chat(msgs, SamplingParams(max_tokens=5, ignore_eos=True))
    ids = encode_prompt(llm.tokenizer, msgs, chat=True)
    assert chat.prompt_token_ids == ids
    assert chat.outputs[0].token_ids == llm.generate({"prompt_token_ids": ids},
                                                     SamplingParams(max_tokens=5, ignore_eos=True))[0].token_ids
    with pytest.raises(TypeError, match="llm.chat"):
        llm.generate(msgs)


def test_selector_and_context_manager(tiny_dir):
    """Item 10: LLM(selector="async") runs the cache-rank worker (same tokens as in-process with on_late=wait), and
    leaving the with-block closes it."""
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    with LLM(tiny_dir, max_batch=1, method="asyncspade", budget=32, sink=4, recent=8, dense_layers=1) as sync:
        ref = sync.generate(TEXT, params)[0].token_ids
    with LLM(tiny_dir, max_batch=1, method="asyncspade", budget=32, sink=4, recent=8, dense_layers=1,
             selector="async") as llm:
        sel = llm.engine.rt.selector
        assert type(sel).__name__ == "AsyncSelector" and sel.proc.is_alive()
        assert llm.generate(TEXT, params)[0].token_ids == ref
        assert sel.steps > 0 and sel.fallback is None
    assert not sel.proc.is_alive()
    with pytest.raises(ValueError, match="selector"):
        LLM(tiny_dir, selector="remote")
