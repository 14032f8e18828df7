"""The OpenAI-compatible server, end to end: a real server process around a tiny random model, called with the
official ``openai`` client and raw HTTP. Every output is checked against the engine driven directly in-process."""
import json
import logging
import os
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from openai import RateLimitError

from asyncspade.config import SparseConfig
from asyncspade.engine import Engine
from asyncspade.models import encode_prompt, tiny_model
from asyncspade.sampling import SamplingParams
from asyncspade.server import create_app
from conftest import (BUDGET, KEY, NAME, Server, child_pids, decode_recording_logits, lively, proc_state,
                      shm_leftovers)

SPARSE = SparseConfig(method="asyncspade", budget=BUDGET)


@pytest.fixture(scope="module")
def servers():
    """Both servers start together (imports dominate their start-up): A batches 4, B has one slot, a one-sequence
    queue and an API key."""
    a, b = Server("--max-batch", "4"), Server("--max-batch", "1", "--max-queue", "1", "--api-key", KEY)
    try:
        a.wait_ready()
        b.wait_ready({"Authorization": f"Bearer {KEY}"})
        yield a, b
    finally:
        a.close()
        b.close()


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def small(servers):
    return servers[1]


@pytest.fixture(scope="module")
def ref_model():
    """The servers' model, built the same way in this process (see tiny_server.py)."""
    model, tok = tiny_model("llama", seed=0)
    return lively(model), tok


def reference(ref_model, jobs: list[tuple[list[int], SamplingParams]], sparse: SparseConfig = SPARSE) -> list:
    """The engine's own output for each (prompt ids, params), all decoded in one batch."""
    model, tok = ref_model
    eng = Engine(model, tok, sparse, max_batch=len(jobs))
    try:
        return eng.run([eng.add(ids, p) for ids, p in jobs])
    finally:
        eng.close()


def chat_ids(ref_model, text: str) -> list[int]:
    return encode_prompt(ref_model[1], [{"role": "user", "content": text}], chat=True)


def plain_ids(ref_model, text: str) -> list[int]:
    return encode_prompt(ref_model[1], text, chat=False)


# ------------------------------------------------------------------------------------------------ happy paths


def test_models_and_health(server):
    assert [m.id for m in server.client().models.list().data] == [NAME]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_chat_greedy_equals_engine(server, ref_model):
    msg = "Write a short poem about the sea, please."
    r = server.client().chat.completions.create(model=NAME, messages=[{"role": "user", "content": msg}],
                                                max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    [ref] = reference(ref_model, [(chat_ids(ref_model, msg), SamplingParams(max_tokens=40, ignore_eos=True))])
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ref.prompt_ids), 40)
    assert r.usage.total_tokens == len(ref.prompt_ids) + 40
    assert len(ref.prompt_ids) + 40 > BUDGET          # the sparse path was exercised


def test_completion_greedy_equals_engine(server, ref_model):
    prompt = "The quick brown fox jumps over the lazy dog and then"
    r = server.client().completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0,
                                           extra_body={"ignore_eos": True})
    [ref] = reference(ref_model, [(plain_ids(ref_model, prompt), SamplingParams(max_tokens=12, ignore_eos=True))])
    assert r.choices[0].text == ref.text
    assert r.usage.completion_tokens == 12
    # a prompt given as token ids is the same request
    r2 = server.client().completions.create(model=NAME, prompt=plain_ids(ref_model, prompt), max_tokens=12,
                                            temperature=0, extra_body={"ignore_eos": True})
    assert r2.choices[0].text == ref.text


def test_stop_string_cuts_output(server, ref_model):
    prompt = "Once upon a time"
    [ref] = reference(ref_model, [(plain_ids(ref_model, prompt), SamplingParams(max_tokens=10, temperature=1.0, seed=3,
                                                                        ignore_eos=True))])
    stop = ref.text[len(ref.text) // 2:][:3]
    assert stop.strip()
    r = server.client().completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=1.0, seed=3,
                                           stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].text == ref.text[:ref.text.find(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_stream_equals_non_stream(server, ref_model):
    msg = [{"role": "user", "content": "Tell me a story."}]
    kw = dict(model=NAME, messages=msg, max_tokens=30, temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    client = server.client()
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    [ref] = reference(ref_model, [(chat_ids(ref_model, msg[0]["content"]),
                              SamplingParams(max_tokens=30, temperature=1.0, seed=7, ignore_eos=True))])
    assert text == whole.choices[0].message.content == ref.text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30


def test_n3_parallel_samples(server, ref_model):
    prompt = "Roses are red,"
    kw = dict(model=NAME, prompt=prompt, max_tokens=15, temperature=1.0, seed=11, n=3,
              extra_body={"ignore_eos": True})
    r = server.client().completions.create(**kw)
    ids = plain_ids(ref_model, prompt)
    refs = reference(ref_model, [(ids, SamplingParams(max_tokens=15, temperature=1.0, seed=11 + i, ignore_eos=True))
                            for i in range(3)])
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [s.text for s in refs]
    assert len({c.text for c in r.choices}) == 3                 # each sample has its own seed
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 45)
    streamed = ["", "", ""]
    for c in server.client().completions.create(**kw, stream=True):
        for ch in c.choices:
            streamed[ch.index] += ch.text
    assert streamed == [s.text for s in refs]


def test_sparse_override_per_request(server, ref_model):
    prompt = "In the beginning there was"
    ids = plain_ids(ref_model, prompt)
    for method in ("full", "oracle"):
        r = httpx.post(server.url + "/v1/completions", timeout=30, json={
            "prompt": prompt, "max_tokens": 50, "temperature": 0, "ignore_eos": True,
            "asyncspade": {"method": method, "budget": 32}})
        assert r.status_code == 200, r.text
        [ref] = reference(ref_model, [(ids, SamplingParams(max_tokens=50, ignore_eos=True))],
                          SPARSE.replace(method=method, budget=32))
        assert r.json()["choices"][0]["text"] == ref.text
    assert 'method="oracle",budget="32"' in httpx.get(server.url + "/metrics").text


# ------------------------------------------------------------------------------------------------ item 6: fields


def recorded(ref_model, ids, params, sparse=SPARSE):
    """The engine's own output for one request, and the raw logits behind each sampled token."""
    return decode_recording_logits(*ref_model, ids, params, sparse)


def test_sampling_controls_are_applied(server, ref_model):
    """presence/frequency/repetition penalties, logit_bias, top_k, min_p and stop_token_ids change the output as
    the engine defines them (they used to be accepted and ignored)."""
    prompt = "The sea, the sea, the sea and"
    ids = plain_ids(ref_model, prompt)
    body = dict(prompt=prompt, max_tokens=20, temperature=0, ignore_eos=True)
    plain = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    first = recorded(ref_model, ids, SamplingParams(max_tokens=1, ignore_eos=True))[0].output_ids[0]
    # the bias bans the plain continuation's first token, so the output differs whatever the weights' format
    extra = {"presence_penalty": 1.5, "frequency_penalty": 1.0, "repetition_penalty": 1.3, "top_k": 5, "min_p": 0.05,
             "logit_bias": {str(first): -100}}
    r = httpx.post(server.url + "/v1/completions", json={**body, **extra}, timeout=60)
    assert r.status_code == 200, r.text
    ref, _ = recorded(ref_model, ids, SamplingParams(max_tokens=20, ignore_eos=True, presence_penalty=1.5,
                                                     frequency_penalty=1.0, repetition_penalty=1.3, top_k=5,
                                                     min_p=0.05, logit_bias={first: -100.0}))
    assert r.json()["choices"][0]["text"] == ref.text != plain
    stop = ref.output_ids[3]
    r = httpx.post(server.url + "/v1/completions", timeout=60, json={**body, **extra, "stop_token_ids": [stop]})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and r.json()["usage"]["completion_tokens"] == ref.output_ids.index(stop)


def test_logprobs_match_the_engine(server, ref_model):
    """Chat ``logprobs``/``top_logprobs`` and completions ``logprobs``: the log-softmax of the engine's logits,
    streamed or not."""
    msg = "Name three colours."
    ids = chat_ids(ref_model, msg)
    ref, logits = recorded(ref_model, ids, SamplingParams(max_tokens=8, ignore_eos=True, logprobs=3))
    kw = dict(model=NAME, messages=[{"role": "user", "content": msg}], max_tokens=8, temperature=0, logprobs=True,
              top_logprobs=3, extra_body={"ignore_eos": True})
    r = server.client().chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == 8
    tok = ref_model[1]
    for item, t, lg in zip(content, ref.output_ids, logits):
        lp = lg.log_softmax(-1)
        assert item.token == tok.decode([t]) and item.logprob == pytest.approx(float(lp[t]), abs=1e-4)
        top = lp.topk(3)
        assert [x.logprob for x in item.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
    streamed = [c.choices[0].logprobs.content for c in server.client().chat.completions.create(**kw, stream=True)
                if c.choices and c.choices[0].logprobs]
    assert [x.logprob for part in streamed for x in part] == [x.logprob for x in content]
    prompt = "Once upon a time"
    ref, logits = recorded(ref_model, plain_ids(ref_model, prompt), SamplingParams(max_tokens=5, ignore_eos=True,
                                                                                   logprobs=2))
    r = server.client().completions.create(model=NAME, prompt=prompt, max_tokens=5, temperature=0, logprobs=2,
                                           extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([float(g.log_softmax(-1)[t]) for t, g in zip(ref.output_ids, logits)],
                                              abs=1e-4)
    assert all(len(d) >= 2 for d in lp.top_logprobs) and lp.text_offset[0] == 0


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
])
def test_unimplemented_fields_are_refused_by_name(server, body, param):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert param in r.json()["error"]["message"]


def test_best_of_and_meaningless_fields(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "best_of": 3}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "user": "u1", "metadata": {"a": "b"},
        "store": False, "response_format": {"type": "text"}, "tool_choice": "none", "best_of": None})
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------------------------------------ concurrency


def test_16_concurrent_streams(server, ref_model):
    prompts = [f"Story number {i}: " + "once upon a time " * (i % 5) for i in range(16)]
    lengths = [3 + 2 * i for i in range(16)]
    results, errors = [None] * 16, []
    client = server.client()

    def one(i):
        try:
            text, usage = "", None
            for c in client.completions.create(model=NAME, prompt=prompts[i], max_tokens=lengths[i],
                                               temperature=1.0, seed=100 + i, stream=True,
                                               stream_options={"include_usage": True},
                                               extra_body={"ignore_eos": True}):
                text += "".join(ch.text for ch in c.choices)
                usage = c.usage or usage
            results[i] = (text, usage.completion_tokens)
        except Exception as e:          # reported below, with the index
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    health, active = [], []
    while any(t.is_alive() for t in threads):
        health.append(httpx.get(server.url + "/health", timeout=10).status_code)
        active.append(server.metric("asyncspade_active_sequences"))
        time.sleep(0.1)
    for t in threads:
        t.join()
    assert not errors
    refs = reference(ref_model, [(plain_ids(ref_model, p), SamplingParams(max_tokens=n, temperature=1.0, seed=100 + i,
                                                                 ignore_eos=True))
                            for i, (p, n) in enumerate(zip(prompts, lengths))])
    assert [r[1] for r in results] == lengths
    assert [r[0] for r in results] == [s.text for s in refs]
    assert set(health) == {200}
    assert max(active) > 1 and max(active) <= 4                    # batched, within --max-batch


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_requests_get_4xx_and_server_keeps_serving(server):
    chat, comp = server.url + "/v1/chat/completions", server.url + "/v1/completions"
    ok_msgs = [{"role": "user", "content": "hi"}]
    cases = [
        (comp, b"{not json", 400),
        (comp, b"[1, 2]", 400),
        (comp, b"\xff\xfe", 400),
        (chat, {"model": NAME}, 400),                                        # no messages
        (comp, {"model": NAME}, 400),                                        # no prompt
        (chat, {"messages": "hi"}, 400),
        (chat, {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
        (chat, {"messages": [{"role": "user", "content": 5}]}, 400),
        (chat, {"messages": ok_msgs, "max_tokens": 0}, 400),
        (chat, {"messages": ok_msgs, "max_tokens": "5"}, 400),
        (chat, {"messages": ok_msgs, "temperature": "hot"}, 400),
        (chat, {"messages": ok_msgs, "top_p": 0}, 400),
        (chat, {"messages": ok_msgs, "stream": "yes"}, 400),
        (chat, {"messages": ok_msgs, "stop": [1, 2]}, 400),
        (chat, {"messages": ok_msgs, "n": 5}, 400),                          # > --max-batch 4
        (chat, {"messages": ok_msgs, "n": 0}, 400),
        (chat, {"messages": ok_msgs, "model": "gpt-4"}, 404),
        (comp, {"prompt": [1] * 5000, "max_tokens": 4}, 400),               # longer than the 4096 context
        (comp, {"prompt": "hi", "max_tokens": 5000}, 400),
        (comp, {"prompt": [10 ** 9]}, 400),
        (comp, {"prompt": ""}, 400),
        (comp, {"prompt": "hi", "asyncspade": {"method": "magic"}}, 400),
        (comp, {"prompt": "hi", "asyncspade": {"budget": -3}}, 400),
        (comp, {"prompt": "hi", "asyncspade": {"page": 3}}, 400),
        (comp, {"prompt": "hi", "echo": True}, 400),
    ]
    for url, body, status in cases:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = httpx.post(url, timeout=30, **kw)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["message"] and set(err) == {"message", "type", "param", "code"}, body
    assert httpx.post(comp, json={"prompt": [1] * 5000}).json()["error"]["code"] == "context_length_exceeded"
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    r = server.client().chat.completions.create(model=NAME, messages=ok_msgs, max_tokens=3,
                                                extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3


def test_api_key_required(small):
    assert httpx.post(small.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 401
    r = httpx.get(small.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = small.client(KEY).completions.create(model=NAME, prompt="hi", max_tokens=2, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 2


def test_key_scheme_probes_and_model_lookup(small):
    """Item 7: the scheme is case-insensitive; /health and /metrics answer probes without the key (as in vLLM); a
    model is found by id (``client.models.retrieve``) and another id is a 404."""
    for scheme in ("bearer", "BEARER", "Bearer"):
        r = httpx.get(small.url + "/v1/models", headers={"Authorization": f"{scheme} {KEY}"})
        assert r.status_code == 200, scheme
    assert httpx.get(small.url + "/health").json() == {"status": "ok"}
    assert "asyncspade_generated_tokens_total" in httpx.get(small.url + "/metrics").text
    assert small.client(KEY).models.retrieve(NAME).id == NAME
    r = httpx.get(small.url + "/v1/models/gpt-4", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert httpx.get(small.url + f"/v1/models/{NAME}").status_code == 401          # /v1 stays keyed


def _wait_metric(srv, name, value, headers, timeout=15.0):
    end = time.monotonic() + timeout
    while srv.metric(name, headers) != value:
        assert time.monotonic() < end, f"{name} never reached {value}"
        time.sleep(0.05)


def test_queue_full_gets_429(small):
    """One slot, one queue place: a running stream, a queued request, then a third request is refused."""
    client, auth = small.client(KEY), {"Authorization": f"Bearer {KEY}"}
    before = small.metric("asyncspade_generated_tokens_total", auth)
    long = client.completions.create(model=NAME, prompt="a", max_tokens=3000, stream=True,
                                     extra_body={"ignore_eos": True})
    next(iter(long))                                              # it holds the slot now
    queued = {}
    t = threading.Thread(target=lambda: queued.update(r=client.completions.create(
        model=NAME, prompt="b", max_tokens=4, extra_body={"ignore_eos": True})))
    t.start()
    _wait_metric(small, "asyncspade_queued_sequences", 1, auth)
    with pytest.raises(RateLimitError) as e:
        client.completions.create(model=NAME, prompt="c", max_tokens=4)
    assert e.value.status_code == 429
    assert int(e.value.response.headers["Retry-After"]) >= 1               # item 7: when to come back
    long.close()                                                  # client leaves: its slot frees
    t.join(60)
    assert queued["r"].usage.completion_tokens == 4
    assert small.metric("asyncspade_generated_tokens_total", auth) - before < 1000   # the 3000 were not decoded


def test_disconnect_frees_the_slot(small):
    client, auth = small.client(KEY), {"Authorization": f"Bearer {KEY}"}
    before = small.metric("asyncspade_generated_tokens_total", auth)
    stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "go"}],
                                            max_tokens=3000, stream=True, extra_body={"ignore_eos": True})
    got = [c for _, c in zip(range(4), stream)]
    stream.close()
    assert len(got) == 4
    t0 = time.monotonic()
    r = client.completions.create(model=NAME, prompt="next", max_tokens=5, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5
    assert small.metric("asyncspade_generated_tokens_total", auth) - before < 1000   # the 3000 were not decoded
    # a non-streaming client that times out is noticed too (the handler polls for the disconnect)
    before = small.metric("asyncspade_generated_tokens_total", auth)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(small.url + "/v1/completions", headers=auth, timeout=1.0,
                   json={"prompt": "x", "max_tokens": 3000, "ignore_eos": True})
    _wait_metric(small, "asyncspade_active_sequences", 0, auth)
    assert small.metric("asyncspade_generated_tokens_total", auth) - before < 1500
    r = client.completions.create(model=NAME, prompt="after", max_tokens=3, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3
    assert time.monotonic() - t0 < 30


# ------------------------------------------------------------------------------------------------ failures inside


def test_engine_failure_fails_only_that_request(ref_model, caplog):
    """In-process app: a decode step that raises fails its requests (500, or an error event when streaming);
    the engine thread survives and the next request is served."""
    model, tok = ref_model
    app = create_app(model, tok, SPARSE, max_batch=2, selector="sync")
    eng = app.state.server.engines.engines[SPARSE]

    def hook(seqs, logits):
        if any(s.params.max_tokens == 7 for s in seqs):
            raise RuntimeError("injected /dev/shm/torch_123_secret")
    eng.logits_hook = hook
    with TestClient(app) as c, caplog.at_level(logging.ERROR, "asyncspade.server"):
        r = c.post("/v1/completions", json={"prompt": "boom", "max_tokens": 7})
        message = r.json()["error"]["message"]
        assert r.status_code == 500 and "internal error" in message
        assert "secret" not in message and "injected" not in message          # internals stay in the log
        ref = message.split("(ref ")[1][:8]
        assert any(ref in rec.getMessage() and "injected" in rec.exc_text for rec in caplog.records)
        with c.stream("POST", "/v1/completions", json={"prompt": "boom", "max_tokens": 7, "stream": True}) as s:
            lines = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert "internal error" in json.loads(lines[-2][6:])["error"]["message"] and lines[-1] == "data: [DONE]"
        r = c.post("/v1/completions", json={"prompt": "fine", "max_tokens": 5, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200
        assert eng.running == [] and eng.waiting == []
        [ref] = reference(ref_model, [(plain_ids(ref_model, "fine"), SamplingParams(max_tokens=5, ignore_eos=True))])
        assert r.json()["choices"][0]["text"] == ref.text
        assert c.get("/health").json() == {"status": "ok"}


# ------------------------------------------------------------------------------------------------ shutdown


@pytest.mark.parametrize("selector", ["async", "dist"])
def test_sigterm_leaves_nothing_behind(selector):
    """SIGTERM after an engine with a cache-rank worker has run: the server exits within its grace period, its
    cache-rank worker goes with it, and neither shared memory nor a semaphore is left for the resource tracker."""
    shm_before = set(os.listdir("/dev/shm"))
    srv = Server("--selector", selector)
    try:
        srv.wait_ready()
        r = srv.client().completions.create(model=NAME, prompt="tell me", max_tokens=BUDGET + 8,
                                            extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == BUDGET + 8              # decoded past the budget: the worker selected
        helpers = child_pids(srv.proc.pid, tracker=True)            # the cache-rank worker, the resource tracker
        assert helpers
        srv.proc.terminate()
        srv.proc.wait(20)
        end = time.monotonic() + 10                                 # the tracker reports after its parent is gone
        while time.monotonic() < end and any(proc_state(pid) for pid in helpers):
            time.sleep(0.1)
        assert not any(proc_state(pid) for pid in helpers)
        out = srv.output()
    finally:
        srv.close()
    assert "leaked" not in out and "Traceback" not in out, out
    assert shm_leftovers(shm_before) == set()
