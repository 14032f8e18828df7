"""``asyncspade serve``: an OpenAI-compatible HTTP server with continuous batching.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (``stream``, ``n``, ``seed``, ``stop``, ...),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text).

Extra body fields (the OpenAI client passes them through ``extra_body``):

* ``"ignore_eos": true`` keeps decoding past the end-of-sequence token (as in vLLM; for benchmarks);
* ``"asyncspade": {"method": "full", "budget": 512}`` overrides the server's sparse method and/or budget for this
  request. The engine holds one sparse configuration, so each distinct (method, budget) gets its own engine, created
  on first use on the same model weights (each with its own KV store; at most ``--max-engines`` at a time) and
  stepped round-robin by the one engine thread.

One background thread owns the engines and calls ``engine.step()`` in a loop, sleeping on an event when there is no
work. Request handlers only ``engine.add()`` / ``engine.abort()`` (both thread-safe) and receive the engine's events
through per-request asyncio queues, fed with ``loop.call_soon_threadsafe``.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import pathlib
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import METHODS, ConfigError, SparseConfig
from .engine import Engine, RequestError, Sequence
from .models import encode_prompt
from .sampling import SamplingParams

log = logging.getLogger("asyncspade.server")

DEFAULT_NAME = "asyncspade-smollm2"
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1)
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "tools")   # refused rather than silently ignored
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP = 16
POLL_S = 1.0                 # how often a waiting non-streaming handler checks that its client is still there


class APIError(Exception):
    """An error answered as an OpenAI-style body ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.type)


def error_response(status: int, message: str, param=None, code=None, type_="invalid_request_error") -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


# ------------------------------------------------------------------------------------------------------- metrics


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}",
                      f"{name}_count {self.count}"]


class Metrics:
    """Counters shared by the request handlers and the engine thread (hence the lock)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.tokens = 0
        self.ttft, self.tpot = Histogram(TTFT_BUCKETS), Histogram(TPOT_BUCKETS)

    def request(self, path: str, status: int) -> None:
        key = (path if path in ROUTES else "other", status)
        with self.lock:
            self.requests[key] = self.requests.get(key, 0) + 1

    def finished(self, seq: Sequence) -> None:
        with self.lock:
            self.ttft.observe(seq.ttft_s)
            if len(seq.output_ids) > 1:
                self.tpot.observe(seq.tpot_s)

    def render(self, engines: dict[SparseConfig, Engine]) -> str:
        engines = list(engines.items())
        active = sum(len(e.running) for _, e in engines)
        queued = sum(len(e.waiting) for _, e in engines)

        def head(name, kind, help_):
            return [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        with self.lock:
            out = head("asyncspade_requests_total", "counter", "HTTP requests by endpoint and status code.")
            out += [f'asyncspade_requests_total{{endpoint="{p}",status="{s}"}} {n}'
                    for (p, s), n in sorted(self.requests.items())]
            out += head("asyncspade_active_sequences", "gauge", "Sequences holding a decode slot.")
            out += [f"asyncspade_active_sequences {active}"]
            out += head("asyncspade_queued_sequences", "gauge", "Sequences waiting for a decode slot.")
            out += [f"asyncspade_queued_sequences {queued}"]
            out += head("asyncspade_generated_tokens_total", "counter", "Tokens generated.")
            out += [f"asyncspade_generated_tokens_total {self.tokens}"]
            out += head("asyncspade_time_to_first_token_seconds", "histogram", "Time to first token per sequence.")
            out += self.ttft.lines("asyncspade_time_to_first_token_seconds")
            out += head("asyncspade_time_per_output_token_seconds", "histogram", "Mean time per output token "
                        "after the first, per sequence.")
            out += self.tpot.lines("asyncspade_time_per_output_token_seconds")
        out += head("asyncspade_selector_late_rate", "gauge", "Share of selections not ready when the decode loop "
                    "needed them, per engine (0 without an asynchronous selector).")
        for cfg, e in engines:
            late = float(getattr(getattr(e.rt, "selector", None), "late_rate", 0.0) or 0.0)
            out.append(f'asyncspade_selector_late_rate{{method="{cfg.method}",budget="{cfg.budget}"}} {late}')
        return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------- engine thread


@dataclass
class Sink:
    """Where the events of one sequence go: an asyncio queue on the handler's event loop."""
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    index: int                     # the choice index of this sequence in its response
    seq: Sequence
    engine: Engine
    done: bool = False             # its last event was delivered

    def put(self, item) -> None:
        with contextlib.suppress(RuntimeError):        # the loop is gone (shutdown): nobody is listening
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, item))


@dataclass
class Delta:
    text: str
    finished: bool
    error: str | None = None


class EngineLoop:
    """Owns the engines (one per sparse configuration, all on one model) and the thread that steps them."""

    def __init__(self, model, tokenizer, sparse: SparseConfig, max_batch: int = 8, max_queue: int = 64,
                 max_tokens: int | None = None, max_engines: int = 4, selector: str = "sync", on_late: str = "wait",
                 decode_threads: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.max_tokens = max_batch, max_queue, max_tokens
        self.max_engines = max_engines
        self.selector, self.on_late, self.decode_threads = selector, on_late, decode_threads
        self.metrics = Metrics()
        self._lock = threading.Lock()        # engines dict, sinks, admission
        self._model_lock = threading.Lock()  # held while a forward runs or an engine is created/closed on the model
        self._wake = threading.Event()
        self._stop = False
        self._sinks: dict[int, Sink] = {}    # id(seq) -> sink; the sink holds the seq, so the id stays unique
        self.default = sparse
        self.engines: dict[SparseConfig, Engine] = {sparse: self._new_engine(sparse)}
        self.thread = threading.Thread(target=self._run, name="asyncspade-engine", daemon=True)

    def _new_engine(self, cfg: SparseConfig) -> Engine:
        return Engine(self.model, self.tokenizer, cfg, max_batch=self.max_batch, max_tokens=self.max_tokens,
                      selector=self.selector, on_late=self.on_late, decode_threads=self.decode_threads)

    @property
    def context(self) -> int:
        return self.engines[self.default].max_tokens

    # ------------------------------------------------------------ called from request handlers
    def engine_for(self, cfg: SparseConfig) -> Engine:
        """The engine of ``cfg``, created on first use (blocks for at most one step: run it in a worker thread)."""
        with self._lock:
            if cfg in self.engines:
                return self.engines[cfg]
        with self._model_lock:
            with self._lock:
                if cfg in self.engines:
                    return self.engines[cfg]
                if len(self.engines) >= self.max_engines:
                    idle = [c for c, e in self.engines.items() if c != self.default and not e.has_work()
                            and not any(s.engine is e for s in self._sinks.values())]
                    if not idle:
                        raise APIError(429, f"all {self.max_engines} engines are busy with other sparse settings; "
                                       "retry later", "asyncspade", "too_many_engines", "rate_limit_error")
                    self.engines.pop(idle[0]).close()
            eng = self._new_engine(cfg)
            with self._lock:
                self.engines[cfg] = eng
            return eng

    def submit(self, eng: Engine, jobs: list[tuple[list[int], SamplingParams]]) -> tuple[list[Sequence], asyncio.Queue]:
        """Queue ``jobs`` (prompt ids, params) as sequences of ``eng``; their events arrive on the returned queue as
        ``(choice index, Delta)``. Raises a 429 APIError when more than ``max_queue`` sequences would wait."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        with self._lock:
            waiting = sum(max(0, len(e.waiting) + (len(jobs) if e is eng else 0) - e.slots.count(None))
                          for e in self.engines.values())
            if waiting > self.max_queue:
                raise APIError(429, f"server busy: the queue is full ({self.max_queue} waiting sequences); retry "
                               "later", None, "rate_limit_exceeded", "rate_limit_error")
            seqs = []
            try:
                for i, (ids, params) in enumerate(jobs):
                    seq = eng.add(ids, params)
                    seqs.append(seq)
                    self._sinks[id(seq)] = Sink(loop, queue, i, seq, eng)
            except RequestError:
                self._forget(seqs)
                raise
        self._wake.set()
        return seqs, queue

    def cancel(self, seqs: list[Sequence]) -> None:
        """The request is over (done, failed or its client left): free the slots of unfinished sequences."""
        with self._lock:
            self._forget(seqs)
        self._wake.set()

    def _forget(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            sink = self._sinks.pop(id(seq), None)
            if sink is not None and not seq.finished:
                sink.engine.abort(seq)

    # ------------------------------------------------------------ the engine thread
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self.thread.is_alive():
            self.thread.join(timeout=30)
        with self._model_lock:
            for eng in self.engines.values():
                eng.close()

    def _run(self) -> None:
        while not self._stop:
            self._wake.clear()
            with self._lock:
                busy = [e for e in self.engines.values() if e.has_work()]
            if not busy:
                self._wake.wait()
                continue
            for eng in busy:                      # round-robin: one step of each engine with work
                self._step(eng)

    def _step(self, eng: Engine) -> None:
        try:
            with self._model_lock:
                events = eng.step()
        except Exception as e:                    # fail this batch's requests, keep serving the others
            log.exception("engine step failed")
            self._fail(eng, f"internal error while decoding: {type(e).__name__}: {e}")
            return
        with self._lock:
            targets = [(self._sinks.get(id(ev.seq)), ev) for ev in events]
        with self.metrics.lock:
            self.metrics.tokens += sum(len(ev.token_ids) for ev in events)
        for sink, ev in targets:
            if ev.finished and ev.seq.finish_reason != "abort":
                self.metrics.finished(ev.seq)
            if sink is not None:
                sink.done = ev.finished
                sink.put(Delta(ev.text, ev.finished))

    def _fail(self, eng: Engine, message: str) -> None:
        """Every unfinished sequence of ``eng`` that took part in the failed step (all but the waiting ones) fails."""
        with self._lock:
            waiting = {id(s) for s in eng.waiting}
            victims = [s for k, s in self._sinks.items() if s.engine is eng and not s.done and k not in waiting]
            for sink in victims:
                del self._sinks[id(sink.seq)]
        for sink in victims:
            eng.abort(sink.seq)
            sink.put(Delta("", True, message))


# ------------------------------------------------------------------------------------------- request validation


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _get(body: dict, key: str, check, what: str, default=None):
    v = body.get(key)
    if v is None:
        return default
    if not check(v):
        raise APIError(400, f"'{key}' must be {what}, got {json.dumps(v)[:80]}", key)
    return v


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise APIError(400, f"messages[{i}] must be an object with a role in {', '.join(ROLES)}", "messages")
        content = m.get("content")
        if isinstance(content, list):            # content parts: only text is supported
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")
        out.append({"role": ROLES[m["role"]], "content": content})
    return out


def _prompts(body: dict, vocab: int) -> list[str | list[int]]:
    """``prompt``: a string, a list of strings, a list of token ids, or a list of token-id lists."""
    p = body.get("prompt")
    if isinstance(p, str):
        return [p]
    bad = APIError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of lists "
                   "of token ids", "prompt")
    if not isinstance(p, list) or not p:
        raise bad
    if all(isinstance(x, str) for x in p):
        return list(p)
    lists = [p] if all(_is_int(x) for x in p) else p
    for ids in lists:
        if not isinstance(ids, list) or not ids or not all(_is_int(x) for x in ids):
            raise bad
        if not all(0 <= x < vocab for x in ids):
            raise APIError(400, f"token ids must be in [0, {vocab})", "prompt")
    return lists


def _sparse(body: dict, default: SparseConfig, num_layers: int) -> SparseConfig:
    o = body.get("asyncspade")
    if o is None:
        return default
    if not isinstance(o, dict) or set(o) - {"method", "budget"}:
        raise APIError(400, "'asyncspade' must be an object with optional 'method' and 'budget'", "asyncspade")
    method = o.get("method", default.method)
    if method not in METHODS:
        raise APIError(400, f"unknown method {method!r}; choose from: {', '.join(METHODS)}", "asyncspade.method")
    budget = o.get("budget", default.budget)
    if not _is_int(budget):
        raise APIError(400, f"'asyncspade.budget' must be an integer, got {json.dumps(budget)[:40]}",
                       "asyncspade.budget")
    try:
        return default.replace(method=method, budget=budget).validate(num_layers)
    except ConfigError as e:
        raise APIError(400, str(e), "asyncspade") from None


@dataclass
class Job:
    """A validated request: the prompts (token ids), per-sequence sampling params and response options."""
    prompts: list[list[int]]
    params: list[SamplingParams]     # len(prompts) * n, in choice-index order
    sparse: SparseConfig
    n: int
    stream: bool
    include_usage: bool


def parse_job(body: dict, chat: bool, state: "ServerState") -> Job:
    for k in UNSUPPORTED:
        if body.get(k):
            raise APIError(400, f"'{k}' is not supported by this server", k)
    model = body.get("model")
    if model is not None and model != state.name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {state.name!r}", "model",
                       "model_not_found")
    tok = state.loop.tokenizer
    raw = [_messages(body)] if chat else _prompts(body, state.loop.model.config.vocab_size)
    n = _get(body, "n", _is_int, "an integer", 1)
    if not 1 <= n * len(raw) <= state.loop.max_batch:
        raise APIError(400, f"n x prompts must be within 1..{state.loop.max_batch} (the server's --max-batch), got "
                       f"{n * len(raw)}", "n")
    try:
        prompts = [encode_prompt(tok, p, chat=chat) if chat or isinstance(p, str) else p for p in raw]
    except Exception as e:                           # the chat template refused the conversation
        raise APIError(400, f"cannot encode the prompt: {e}", "messages" if chat else "prompt") from None
    if not all(prompts):
        raise APIError(400, "the prompt is empty", "messages" if chat else "prompt")
    sparse = _sparse(body, state.loop.default, state.loop.model.config.num_hidden_layers)
    context = state.loop.context
    longest = max(len(p) for p in prompts)
    key = "max_completion_tokens" if chat and body.get("max_tokens") is None else "max_tokens"
    # OpenAI's defaults: chat decodes up to the context, completions 16 tokens
    max_tokens = _get(body, key, lambda v: _is_int(v) and v > 0, "a positive integer",
                      max(context - longest, 1) if chat else 16)
    if longest + max_tokens > context:
        raise APIError(400, f"this model's context is {context} tokens; the prompt has {longest} and max_tokens asks "
                       f"for {max_tokens} more", "messages" if chat else "prompt", "context_length_exceeded")
    temperature = _get(body, "temperature", lambda v: _is_num(v) and 0 <= v <= 2, "a number in [0, 2]", 1.0)
    top_p = _get(body, "top_p", lambda v: _is_num(v) and 0 < v <= 1, "a number in (0, 1]", 1.0)
    seed = _get(body, "seed", _is_int, "an integer")
    stop = _get(body, "stop", lambda v: isinstance(v, str) and v or isinstance(v, list) and len(v) <= MAX_STOP
                and all(isinstance(s, str) and s for s in v), f"a non-empty string or a list of at most {MAX_STOP} "
                "non-empty strings", [])
    ignore_eos = _get(body, "ignore_eos", lambda v: isinstance(v, bool), "a boolean", False)
    stream = _get(body, "stream", lambda v: isinstance(v, bool), "a boolean", False)
    opts = _get(body, "stream_options", lambda v: isinstance(v, dict), "an object", {})
    params = [SamplingParams(max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
                             seed=None if seed is None else (seed + j) % 2**64,
                             stop=[stop] if isinstance(stop, str) else list(stop), ignore_eos=ignore_eos)
              for _ in prompts for j in range(n)]
    return Job(prompts, params, sparse, n, stream, bool(opts.get("include_usage")))


# ---------------------------------------------------------------------------------------------------- the app


class ServerState:
    def __init__(self, loop: EngineLoop, name: str, api_key: str | None):
        self.loop, self.name, self.api_key = loop, name, api_key
        self.created = int(time.time())


class Guard:
    """ASGI middleware: bearer-token check on every request, and request counts by endpoint/status for /metrics."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        try:
            key = self.state.api_key
            auth = dict(scope["headers"]).get(b"authorization", b"")
            if key and not hmac.compare_digest(auth, b"Bearer " + key.encode()):
                resp = error_response(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                                      None, "invalid_api_key")
                await resp(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            self.state.loop.metrics.request(scope["path"], status)


def create_app(model, tokenizer, sparse: SparseConfig | None = None, *, max_batch: int = 8, max_queue: int = 64,
               max_tokens: int | None = None, max_engines: int = 4, selector: str = "sync", on_late: str = "wait",
               api_key: str | None = None, served_model_name: str = DEFAULT_NAME,
               decode_threads: int | None = None) -> FastAPI:
    """The FastAPI app around ``model``/``tokenizer``. The engine thread runs while the app's lifespan does
    (``uvicorn``, or ``with TestClient(app)``); ``app.state.server.loop`` is the :class:`EngineLoop`."""
    state = ServerState(EngineLoop(model, tokenizer, sparse or SparseConfig(), max_batch, max_queue, max_tokens,
                                   max_engines, selector, on_late, decode_threads), served_model_name, api_key)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.loop.start()
        try:
            yield
        finally:
            state.loop.stop()

    app = FastAPI(title="asyncspade", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.add_middleware(Guard, state=state)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def server_error(request, exc: Exception):      # uvicorn logs the traceback
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error")

    @app.get("/health")
    async def health():
        if not state.loop.thread.is_alive():
            return JSONResponse({"status": "engine loop stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.loop.metrics.render(dict(state.loop.engines)),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.name, "object": "model", "created": state.created,
                                            "owned_by": "asyncspade", "max_model_len": state.loop.context}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, state, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, state, chat=False)

    return app


async def complete(request: Request, state: ServerState, chat: bool):
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    job = parse_job(body, chat, state)
    eng = await asyncio.to_thread(state.loop.engine_for, job.sparse)
    try:
        seqs, queue = state.loop.submit(eng, [(ids, p) for ids, p in zip(
            (ids for ids in job.prompts for _ in range(job.n)), job.params)])
    except RequestError as e:
        raise APIError(400, str(e), "messages" if chat else "prompt") from None
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": state.name}
    if job.stream:
        return StreamingResponse(_stream(state, job, seqs, queue, head, chat), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    try:
        async for _, delta in _events(queue, len(seqs), state.loop, request):
            if delta.error:
                raise APIError(500, delta.error, type_="server_error")
    except ClientGone:
        return Response(status_code=499)          # nobody reads it; nginx's "client closed request"
    finally:
        state.loop.cancel(seqs)
    choices = []
    for i, s in enumerate(seqs):
        out = {"message": {"role": "assistant", "content": s.text}} if chat else {"text": s.text}
        choices.append({"index": i, **out, "logprobs": None, "finish_reason": s.finish_reason})
    return {**head, "choices": choices, "usage": _usage(job, seqs)}


class ClientGone(Exception):
    pass


async def _events(queue: asyncio.Queue, count: int, loop: EngineLoop, request: Request | None = None):
    """``(index, Delta)`` until ``count`` sequences finished; with ``request``, stop if its client disconnects."""
    left, check = count, time.monotonic() + POLL_S
    while left:
        try:
            index, delta = await asyncio.wait_for(queue.get(), POLL_S)
        except TimeoutError:
            if not loop.thread.is_alive():
                raise APIError(503, "the engine loop has stopped", type_="server_error") from None
            index = delta = None
        if request is not None and time.monotonic() >= check:
            if await request.is_disconnected():
                raise ClientGone()
            check = time.monotonic() + POLL_S
        if delta is not None:
            left -= delta.finished
            yield index, delta


def _usage(job: Job, seqs: list[Sequence]) -> dict:
    prompt = sum(len(p) for p in job.prompts)
    done = sum(len(s.output_ids) for s in seqs)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


async def _stream(state: ServerState, job: Job, seqs: list[Sequence], queue: asyncio.Queue, head: dict, chat: bool):
    """SSE in OpenAI's chunk format. If the client goes away, Starlette cancels this generator: the finally block
    aborts the unfinished sequences so their slots free at the next engine step."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

    def chunk(index, text=None, finish=None, role=False):
        if chat:
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        return _sse({**head, "choices": [choice]})
    try:
        if chat:
            for i in range(len(seqs)):
                yield chunk(i, role=True)
        async for i, delta in _events(queue, len(seqs), state.loop):
            if delta.error:
                raise APIError(500, delta.error, type_="server_error")
            if delta.text:
                yield chunk(i, delta.text)
            if delta.finished:
                yield chunk(i, finish=seqs[i].finish_reason)
        if job.include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(job, seqs)})
        yield "data: [DONE]\n\n"
    except APIError as e:                    # the status line is sent already: report it as an error event
        yield _sse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
    finally:
        state.loop.cancel(seqs)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ------------------------------------------------------------------------------------------------------ the CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import add_model_args, add_sparse_args
    add_model_args(p)
    add_sparse_args(p, "asyncspade", selector=True)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    g.add_argument("--max-batch", type=int, default=8, help="decode slots: sequences decoded together (default 8)")
    g.add_argument("--max-queue", type=int, default=64,
                   help="sequences allowed to wait for a slot; beyond, requests get 429 (default 64)")
    g.add_argument("--max-tokens-context", type=int, default=None,
                   help="context per sequence, prompt + output (default: the model's maximum)")
    g.add_argument("--max-engines", type=int, default=4, help="distinct (method, budget) engines alive at once for "
                   "per-request overrides, each with its own KV store (default 4)")
    g.add_argument("--decode-threads", type=int, default=None,
                   help="intra-op threads of decode steps while a cache-rank worker (--selector async|dist) runs "
                   "beside them; prefill always uses every thread (default: cores - 1, leaving the worker a core)")
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every request")
    g.add_argument("--served-model-name", default=None,
                   help=f"model id in the API (default {DEFAULT_NAME!r}, or the --model path's name)")


def model_name(args) -> str:
    if args.served_model_name:
        return args.served_model_name
    return pathlib.Path(args.model).stem if args.model else DEFAULT_NAME


def bind(args) -> socket.socket:
    """Validate the server flags and bind the port (before the model loads, so mistakes fail fast)."""
    from .cli import UserError
    for flag, v, lo in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                        ("--max-engines", args.max_engines, 1), ("--port", args.port, 1),
                        ("--decode-threads", 1 if args.decode_threads is None else args.decode_threads, 1),
                        ("--max-tokens-context", args.max_tokens_context or 1, 1)):
        if v < lo:
            raise UserError(f"{flag} must be >= {lo}, got {v}")
    if args.port > 65535:
        raise UserError(f"--port must be <= 65535, got {args.port}")
    try:
        info = socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    return sock


def app_from_args(args, model, tokenizer) -> FastAPI:
    from .cli import sparse_from_args
    return create_app(model, tokenizer, sparse_from_args(args), max_batch=args.max_batch, max_queue=args.max_queue,
                      max_tokens=args.max_tokens_context, max_engines=args.max_engines, selector=args.selector,
                      on_late=args.on_late, api_key=args.api_key, served_model_name=model_name(args),
                      decode_threads=args.decode_threads)


def serve(app: FastAPI, sock: socket.socket, log_level: str = "info") -> None:
    import uvicorn
    host, port = sock.getsockname()[:2]
    print(f"[asyncspade] serving {app.state.server.name!r} on http://{host}:{port}/v1", flush=True)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


def run(args) -> int:
    from .cli import load, sparse_from_args
    sparse_from_args(args)                     # bad sparse flags fail before the port and the model
    sock = bind(args)
    model, tokenizer = load(args)
    serve(app_from_args(args, model, tokenizer), sock)
    return 0
