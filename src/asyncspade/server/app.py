"""The HTTP side of ``asyncspade serve``: routes, the request guard, streaming, and a graceful drain on SIGTERM.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``, ``GET /v1/models/{id}``,
``GET /health`` and ``GET /metrics`` (Prometheus text). As in vLLM, ``--api-key`` guards the ``/v1`` routes only:
probes and scrapers reach ``/health`` and ``/metrics`` without it.

Every error is an OpenAI-style JSON body; nothing a handler raises escapes to uvicorn, so a 500 never closes the
client's keep-alive connection and never carries internals (the log has them, under the reference the body gives).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import SparseConfig
from ..engine import RequestError
from .defaults import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_NAME, DEFAULT_SHUTDOWN_TIMEOUT
from .engines import Engines
from .protocol import APIError, Job, Spec, choice_json, chunk_json, logprobs_json, parse_request, sse, usage_json

log = logging.getLogger("asyncspade.server")

POLL_S = 1.0                 # how often a waiting non-streaming handler checks that its client is still there


class ServerState:
    def __init__(self, engines: Engines, name: str, api_key: str | None, max_request_bytes: int,
                 shutdown_timeout: float):
        self.engines, self.name, self.api_key = engines, name, api_key
        self.max_request_bytes, self.shutdown_timeout = max_request_bytes, shutdown_timeout
        self.created = int(time.time())
        self.loop: asyncio.AbstractEventLoop | None = None     # the event loop, once serving
        m = engines.model
        self.spec = Spec(name, engines.tokenizer, m.config.vocab_size, engines.max_batch, engines.context,
                         engines.default, m.config.num_hidden_layers, engines.store.track_pages,
                         engines.store.track_sketch)

    def drain(self) -> None:
        """Called from a signal handler: hand the drain to the event loop (no locks taken here)."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.engines.drain, self.shutdown_timeout)


def error_body(status: int, message: str, code: str | None = None, type_: str = "invalid_request_error") -> dict:
    return APIError(status, message, None, code, type_).body()


# Lingering close (as web servers do): before answering 413 on a connection the server then closes, read and drop
# what the client is still sending, up to these bounds. Closing with unread bytes resets the connection, and a client
# that gets the reset before it reads the 413 loses it ("peer closed connection" in place of the error).
DRAIN_BYTES = 64 << 20
DRAIN_SECONDS = 5.0


async def _drain(receive) -> None:
    """Read and drop the rest of a request body, within DRAIN_BYTES and DRAIN_SECONDS."""
    loop = asyncio.get_running_loop()
    deadline, got = loop.time() + DRAIN_SECONDS, 0
    while got < DRAIN_BYTES:
        left = deadline - loop.time()
        if left <= 0:
            return
        try:
            message = await asyncio.wait_for(receive(), left)
        except asyncio.TimeoutError:
            return
        if message["type"] != "http.request":
            return
        got += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


class _TooLarge(Exception):
    pass


def _authorized(headers: list[tuple[bytes, bytes]], key: str) -> bool:
    """``Authorization: Bearer KEY``, the scheme in any case (RFC 7235)."""
    auth = dict(headers).get(b"authorization", b"").decode("latin-1")
    scheme, _, token = auth.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("latin-1"), key.encode())


class Guard:
    """ASGI middleware around every route: the API key on ``/v1``, the body-size limit (413 before the body is
    read), a JSON 500 for anything a handler raises (the connection stays usable), request counts for /metrics."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status, started = 500, False
        limit = self.state.max_request_bytes

        async def send_(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        async def respond(code: int, body: dict, headers: dict | None = None):
            await JSONResponse(body, status_code=code, headers=headers)(scope, receive, send_)

        seen = 0

        async def receive_():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _TooLarge()
            return message
        async def refuse_too_large():
            await _drain(receive)                   # lingering close; the rest is dropped unread, never parsed
            await respond(413, error_body(413, f"the request body exceeds {limit} bytes (--max-request-bytes)",
                                          "request_too_large"), {"Connection": "close"})
        try:
            headers = scope["headers"]
            if scope["path"].startswith("/v1") and self.state.api_key and not _authorized(headers,
                                                                                         self.state.api_key):
                await respond(401, error_body(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                                              "invalid_api_key"), {"WWW-Authenticate": "Bearer"})
                return
            length = dict(headers).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                await refuse_too_large()
                return
            await self.app(scope, receive_, send_)
        except _TooLarge:
            if not started:
                await refuse_too_large()
        except Exception:
            ref = uuid.uuid4().hex[:8]
            log.exception("unhandled error on %s (ref %s)", scope["path"], ref)
            if not started:
                await respond(500, error_body(500, f"internal server error (ref {ref}); the server log has the "
                                                   "details", type_="server_error"))
        finally:
            self.state.engines.metrics.request(scope["path"], status)


def create_app(model, tokenizer, sparse: SparseConfig | None = None, *, max_batch: int = 8, max_queue: int = 64,
               max_model_len: int | None = None, max_engines: int = 4, selector: str | None = None,
               on_late: str = "wait", api_key: str | None = None, served_model_name: str = DEFAULT_NAME,
               decode_threads: int | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT, options: dict | None = None) -> FastAPI:
    """The FastAPI app around ``model``/``tokenizer``. The KV store and the server's own engine are built here; the
    engine thread runs while the app's lifespan does (``uvicorn``, or ``with TestClient(app)``).
    ``app.state.server.engines`` is the :class:`~asyncspade.server.engines.Engines`. ``selector``: None = the
    asynchronous worker when shared memory allows, else in-process with a warning. ``options``: the engines' formats
    (weights, kv_dtype, device)."""
    engines = Engines(model, tokenizer, sparse or SparseConfig(), max_batch=max_batch, max_queue=max_queue,
                      max_model_len=max_model_len, max_engines=max_engines, selector=selector, on_late=on_late,
                      decode_threads=decode_threads, options=options)
    state = ServerState(engines, served_model_name, api_key, max_request_bytes, shutdown_timeout)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.loop = asyncio.get_running_loop()
        engines.start()
        try:
            yield
        finally:
            engines.stop()

    app = FastAPI(title="asyncspade", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.add_middleware(Guard, state=state)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        return JSONResponse(error_body(exc.status_code, str(exc.detail),
                                       "not_found" if exc.status_code == 404 else None), status_code=exc.status_code)

    @app.get("/health")
    async def health():
        code, body = engines.health()
        return JSONResponse(body, status_code=code)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engines.render_metrics(), media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {"id": state.name, "object": "model", "created": state.created, "owned_by": "asyncspade",
                "max_model_len": engines.context}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != state.name:
            raise APIError(404, f"the model {model_id!r} does not exist; this server serves {state.name!r}", "model",
                           "model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, state, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, state, chat=False)

    return app


async def _submit(state: ServerState, job: Job):
    """Queue the job's sequences on the engine of its sparse settings (built first if needed, off the loop)."""
    for _ in range(3):                     # the engine may be retired between being ensured and used
        await asyncio.to_thread(state.engines.ensure, job.sparse)
        try:
            got = state.engines.submit(job.sparse, job.jobs())
        except RequestError as e:
            raise APIError(400, str(e), "messages" if job.chat else "prompt") from None
        if got is not None:
            return got
    raise APIError(503, "the engine for these sparse settings is being replaced; retry", "asyncspade",
                   "engine_unavailable", "server_error", {"Retry-After": "1"})


async def complete(request: Request, state: ServerState, chat: bool):
    raw = await request.body()
    job = await asyncio.to_thread(parse_request, raw, chat, state.spec)    # JSON + tokenization off the loop
    seqs, queue = await _submit(state, job)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": state.name}
    if job.stream:
        return StreamingResponse(_stream(state, job, seqs, queue, head), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        async for _, delta in _events(queue, len(seqs), state.engines, request):
            if delta.error:
                raise APIError(delta.status, delta.error, type_="server_error")
    except ClientGone:
        return Response(status_code=499)          # nobody reads it; nginx's "client closed request"
    finally:
        state.engines.cancel(seqs)
    tok = state.engines.tokenizer
    choices = await asyncio.to_thread(lambda: [choice_json(i, s, tok, job) for i, s in enumerate(seqs)])
    return {**head, "choices": choices, "usage": usage_json(job, seqs)}


class ClientGone(Exception):
    pass


async def _events(queue: asyncio.Queue, count: int, engines: Engines, request: Request | None = None):
    """``(index, Delta)`` until ``count`` sequences finished; with ``request``, stop if its client disconnects."""
    left, check = count, time.monotonic() + POLL_S
    while left:
        try:
            index, delta = await asyncio.wait_for(queue.get(), POLL_S)
        except TimeoutError:
            if not engines.thread.is_alive():
                raise APIError(503, "the engine loop has stopped", type_="server_error") from None
            index = delta = None
        if request is not None and time.monotonic() >= check:
            if await request.is_disconnected():
                raise ClientGone()
            check = time.monotonic() + POLL_S
        if delta is not None:
            left -= delta.finished
            yield index, delta


async def _stream(state: ServerState, job: Job, seqs, queue: asyncio.Queue, head: dict):
    """SSE in OpenAI's chunk format, ending with ``[DONE]`` whatever happens (an error is sent as an error event
    first). If the client goes away, Starlette cancels this generator: the finally block aborts the unfinished
    sequences so their slots free at the next engine step."""
    chat = job.chat
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    tok = state.engines.tokenizer
    try:
        try:
            if chat:
                for i in range(len(seqs)):
                    yield sse(chunk_json(head, i, chat, role=True))
            async for i, delta in _events(queue, len(seqs), state.engines):
                if delta.error:
                    raise APIError(delta.status, delta.error, type_="server_error")
                lps = None
                if job.logprobs and delta.token_ids:
                    lps = logprobs_json(delta.logprobs, delta.token_ids, tok, chat, seqs[i].params.logprobs)
                if delta.text or lps:
                    yield sse(chunk_json(head, i, chat, delta.text, logprobs=lps))
                if delta.finished:
                    yield sse(chunk_json(head, i, chat, finish=seqs[i].finish_reason))
            if job.include_usage:
                yield sse({**head, "choices": [], "usage": usage_json(job, seqs)})
        except APIError as e:                # the status line is sent already: report it as an error event
            yield sse(e.body())
        yield "data: [DONE]\n\n"
    finally:
        state.engines.cancel(seqs)
