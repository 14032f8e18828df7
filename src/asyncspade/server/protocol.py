"""The OpenAI protocol: request bodies -> validated jobs (token ids, sampling params, sparse settings), and finished
or streaming sequences -> response bodies and SSE chunks.

No engine and no I/O here. The app runs :func:`parse_request` on a worker thread: decoding a large body and
tokenizing its prompt must not hold the event loop (and with it ``/health`` and every running stream).

Every field a request may carry is either implemented, rejected with a 400 that names it, or, for the few that
carry no meaning for generation (``user``, ``metadata``, ``store``), ignored. Unknown fields are rejected.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse

from ..config import METHODS, ConfigError, SparseConfig
from ..methods import method_class
from ..models import encode_prompt
from ..sampling import MAX_LOGPROBS, SamplingParams

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP = 16
IGNORED = frozenset({"user", "metadata", "store"})          # no meaning for generation: accepted and ignored
COMMON = frozenset({"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
                    "presence_penalty", "frequency_penalty", "logit_bias", "top_k", "min_p", "repetition_penalty",
                    "stop_token_ids", "ignore_eos", "asyncspade"})
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format", "tools",
                        "tool_choice", "functions", "function_call", "parallel_tool_calls"}
COMPLETION_FIELDS = COMMON | {"prompt", "logprobs", "echo", "suffix", "best_of"}


class APIError(Exception):
    """An error answered as an OpenAI-style body ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def busy(message: str, code: str, retry_after_s: int = 1) -> APIError:
    """A 429 with ``Retry-After``: the client should come back, the request itself was fine."""
    return APIError(429, message, None, code, "rate_limit_error", {"Retry-After": str(retry_after_s)})


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down; retry on another replica or later", None,
                    "server_shutting_down", "server_error", {"Retry-After": "5"})


@dataclass(frozen=True)
class Spec:
    """What parsing needs to know about the server."""
    name: str
    tokenizer: object
    vocab: int
    max_batch: int
    context: int
    default: SparseConfig
    num_layers: int
    pages: bool                     # the KV store keeps page min/max (needed by quest and the page prefilter)
    sketch: bool                    # the KV store keeps the 4-bit key sketch (needed by the sketch prefilter)


@dataclass
class Job:
    """A validated request: the prompts (token ids), per-sequence sampling params and response options."""
    prompts: list[list[int]]
    params: list[SamplingParams]     # len(prompts) * n, in choice-index order
    sparse: SparseConfig
    n: int
    stream: bool
    include_usage: bool
    chat: bool
    logprobs: bool = False           # render log-probabilities in the response
    ids: list[list[int]] = field(init=False)

    def __post_init__(self):
        self.ids = [ids for ids in self.prompts for _ in range(self.n)]

    def jobs(self) -> list[tuple[list[int], SamplingParams]]:
        return list(zip(self.ids, self.params))


# ------------------------------------------------------------------------------------------------------ parsing


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _show(v) -> str:
    try:
        return json.dumps(v)[:80]
    except (ValueError, RecursionError):
        return type(v).__name__


def _get(body: dict, key: str, check, what: str, default=None):
    v = body.get(key)
    if v is None:
        return default
    if not check(v):
        raise APIError(400, f"'{key}' must be {what}, got {_show(v)}", key)
    return v


def decode_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except RecursionError:
        raise APIError(400, "the request body nests JSON too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _refuse_unsupported(body: dict, chat: bool) -> None:
    known = CHAT_FIELDS if chat else COMPLETION_FIELDS
    for k, v in body.items():
        if v is not None and k not in known and k not in IGNORED:
            raise APIError(400, f"unknown field '{k}': this server does not implement it (fields with no effect on "
                           f"generation that are ignored: {', '.join(sorted(IGNORED))})", k, "unsupported_field")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        kind = fmt.get("type") if isinstance(fmt, dict) else fmt
        raise APIError(400, f"'response_format' {_show(kind)} is not supported: this server has no constrained "
                       "decoding (only {\"type\": \"text\"})", "response_format", "unsupported_field")
    for k in ("tools", "functions"):
        if body.get(k):
            raise APIError(400, f"'{k}' are not supported by this server (no tool calling)", k, "unsupported_field")
    for k in ("tool_choice", "function_call"):
        if body.get(k) not in (None, "none"):
            raise APIError(400, f"'{k}' is not supported by this server (no tool calling)", k, "unsupported_field")
    if body.get("echo"):
        raise APIError(400, "'echo' is not supported by this server", "echo", "unsupported_field")
    if body.get("suffix"):
        raise APIError(400, "'suffix' is not supported by this server (no fill-in-the-middle)", "suffix",
                       "unsupported_field")


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


def _sparse(body: dict, spec: Spec) -> SparseConfig:
    """The ``asyncspade`` override, bounded: a known method, a budget within the context."""
    o = body.get("asyncspade")
    if o is None:
        return spec.default
    if not isinstance(o, dict) or set(o) - {"method", "budget"}:
        raise APIError(400, "'asyncspade' must be an object with optional 'method' and 'budget'", "asyncspade")
    method = o.get("method", spec.default.method)
    if method not in METHODS:
        raise APIError(400, f"unknown method {_show(method)}; choose from: {', '.join(METHODS)}", "asyncspade.method")
    budget = o.get("budget", spec.default.budget)
    if not _is_int(budget) or not 0 < budget <= spec.context:
        raise APIError(400, f"'asyncspade.budget' must be an integer in [1, {spec.context}] (the context), got "
                       f"{_show(budget)}", "asyncspade.budget")
    try:
        cfg = spec.default.replace(method=method, budget=budget).validate(spec.num_layers)
    except ConfigError as e:
        raise APIError(400, str(e), "asyncspade") from None
    if method_class(cfg).needs_pages(cfg) and not spec.pages:
        raise APIError(400, f"{method} with these settings needs page summaries in the KV store, which this server "
                       "keeps only when its own --method needs them (quest, or --prefilter pages)", "asyncspade")
    if method_class(cfg).needs_sketch(cfg) and not spec.sketch:
        raise APIError(400, f"{method} with these settings needs the key sketch in the KV store, which this server "
                       "keeps only when its own --method needs it (asyncspade or lastq with --prefilter sketch)",
                       "asyncspade")
    return cfg


def _logit_bias(body: dict, vocab: int) -> dict[int, float] | None:
    lb = body.get("logit_bias")
    if lb is None:
        return None
    bad = APIError(400, f"'logit_bias' must map token ids in [0, {vocab}) to numbers in [-100, 100]", "logit_bias")
    if not isinstance(lb, dict):
        raise bad
    out = {}
    for k, v in lb.items():
        try:
            tok = int(k)
        except ValueError:
            raise bad from None
        if not 0 <= tok < vocab or not _is_num(v) or not -100 <= v <= 100:
            raise bad
        out[tok] = float(v)
    return out


def parse_request(raw: bytes, chat: bool, spec: Spec) -> Job:
    """The request body ``raw`` of ``/v1/chat/completions`` (``chat``) or ``/v1/completions`` as a :class:`Job`;
    :class:`APIError` (400, or 404 for another model) for anything wrong with it."""
    body = decode_body(raw)
    _refuse_unsupported(body, chat)
    model = body.get("model")
    if model is not None and model != spec.name:
        raise APIError(404, f"the model {_show(model)} does not exist; this server serves {spec.name!r}", "model",
                       "model_not_found")
    where = "messages" if chat else "prompt"
    raw_prompts = [_messages(body)] if chat else _prompts(body, spec.vocab)
    n = _get(body, "n", _is_int, "an integer", 1)
    if not 1 <= n * len(raw_prompts) <= spec.max_batch:
        raise APIError(400, f"n x prompts must be within 1..{spec.max_batch} (the server's --max-batch), got "
                       f"{n * len(raw_prompts)}", "n")
    best_of = _get(body, "best_of", _is_int, "an integer", n)
    if best_of != n:
        raise APIError(400, f"'best_of' other than n is not supported (got best_of={best_of}, n={n})", "best_of",
                       "unsupported_field")
    try:
        prompts = [encode_prompt(spec.tokenizer, p, chat=chat) if chat or isinstance(p, str) else p
                   for p in raw_prompts]
    except Exception as e:                           # the chat template refused the conversation
        raise APIError(400, f"cannot encode the prompt: {' '.join(str(e).split())[:200]}", where) from None
    if not all(prompts):
        raise APIError(400, "the prompt is empty", where)
    sparse = _sparse(body, spec)
    longest = max(len(p) for p in prompts)
    key = "max_completion_tokens" if chat and body.get("max_tokens") is None else "max_tokens"
    # OpenAI's defaults: chat decodes up to the context, completions 16 tokens
    max_tokens = _get(body, key, lambda v: _is_int(v) and v > 0, "a positive integer",
                      max(spec.context - longest, 1) if chat else 16)
    if longest + max_tokens > spec.context:
        raise APIError(400, f"this model's context is {spec.context} tokens; the prompt has {longest} and "
                       f"{key} asks for {max_tokens} more", where, "context_length_exceeded")
    num = lambda lo, hi: (lambda v: _is_num(v) and lo <= v <= hi)        # noqa: E731
    temperature = _get(body, "temperature", num(0, 2), "a number in [0, 2]", 1.0)
    top_p = _get(body, "top_p", lambda v: _is_num(v) and 0 < v <= 1, "a number in (0, 1]", 1.0)
    top_k = _get(body, "top_k", lambda v: _is_int(v) and v >= -1, "an integer >= -1 (0 or -1: off)", 0)
    min_p = _get(body, "min_p", num(0, 1), "a number in [0, 1]", 0.0)
    rep = _get(body, "repetition_penalty", lambda v: _is_num(v) and 0 < v <= 100, "a number in (0, 100]", 1.0)
    presence = _get(body, "presence_penalty", num(-2, 2), "a number in [-2, 2]", 0.0)
    frequency = _get(body, "frequency_penalty", num(-2, 2), "a number in [-2, 2]", 0.0)
    seed = _get(body, "seed", _is_int, "an integer")
    stop = _get(body, "stop", lambda v: isinstance(v, str) and v or isinstance(v, list) and len(v) <= MAX_STOP
                and all(isinstance(s, str) and s for s in v), f"a non-empty string or a list of at most {MAX_STOP} "
                "non-empty strings", [])
    stop_ids = _get(body, "stop_token_ids", lambda v: isinstance(v, list) and all(_is_int(t) and 0 <= t < spec.vocab
                                                                                  for t in v),
                    f"a list of token ids in [0, {spec.vocab})", [])
    ignore_eos = _get(body, "ignore_eos", lambda v: isinstance(v, bool), "a boolean", False)
    stream = _get(body, "stream", lambda v: isinstance(v, bool), "a boolean", False)
    opts = _get(body, "stream_options", lambda v: isinstance(v, dict), "an object", {})
    logprobs = _logprobs(body, chat)
    bias = _logit_bias(body, spec.vocab)
    params = [SamplingParams(max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p), top_k=top_k,
                             min_p=float(min_p), repetition_penalty=float(rep), presence_penalty=float(presence),
                             frequency_penalty=float(frequency), logit_bias=bias,
                             seed=None if seed is None else (seed + j) % 2**64,
                             stop=[stop] if isinstance(stop, str) else list(stop), stop_token_ids=list(stop_ids),
                             ignore_eos=ignore_eos, logprobs=logprobs)
              for _ in prompts for j in range(n)]
    return Job(prompts, params, sparse, n, stream, bool(opts.get("include_usage")), chat, logprobs is not None)


def _logprobs(body: dict, chat: bool) -> int | None:
    """How many top log-probabilities per token to return (None: no log-probabilities)."""
    if chat:
        want = _get(body, "logprobs", lambda v: isinstance(v, bool), "a boolean", False)
        top = _get(body, "top_logprobs", lambda v: _is_int(v) and 0 <= v <= MAX_LOGPROBS,
                   f"an integer in [0, {MAX_LOGPROBS}]")
        if top is not None and not want:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return (top or 0) if want else None
    return _get(body, "logprobs", lambda v: _is_int(v) and 0 <= v <= MAX_LOGPROBS,
                f"an integer in [0, {MAX_LOGPROBS}]")


# ----------------------------------------------------------------------------------------------------- responses


def _token_text(tokenizer, tok: int) -> str:
    return tokenizer.decode([tok])


def logprobs_json(entries: list[dict], tokens: list[int], tokenizer, chat: bool, top: int) -> dict:
    """OpenAI's ``logprobs`` object of a choice (or chunk) for ``tokens`` and their engine entries (``{id: Logprob}``:
    the ``top`` most likely and the sampled token): chat ``{"content": [...]}``, completions ``{"tokens",
    "token_logprobs", "top_logprobs", "text_offset"}``."""
    text = lambda t: _token_text(tokenizer, t)          # noqa: E731
    if chat:
        def item(t, lp):
            s = text(t)
            return {"token": s, "logprob": lp.logprob, "bytes": list(s.encode("utf-8"))}
        return {"content": [{**item(t, e[t]), "top_logprobs": [item(i, lp) for i, lp in e.items() if lp.rank <= top]}
                            for t, e in zip(tokens, entries)]}
    strings, offsets, pos = [], [], 0
    for t in tokens:
        s = text(t)
        strings.append(s)
        offsets.append(pos)
        pos += len(s)
    return {"tokens": strings, "token_logprobs": [e[t].logprob for t, e in zip(tokens, entries)],
            "top_logprobs": [{text(i): lp.logprob for i, lp in e.items()} for e in entries], "text_offset": offsets}


def choice_json(index: int, seq, tokenizer, job: Job) -> dict:
    out = {"message": {"role": "assistant", "content": seq.text}} if job.chat else {"text": seq.text}
    lps = logprobs_json(seq.logprobs, seq.output_ids, tokenizer, job.chat, seq.params.logprobs) if job.logprobs \
        else None
    return {"index": index, **out, "logprobs": lps, "finish_reason": seq.finish_reason}


def chunk_json(head: dict, index: int, chat: bool, text: str | None = None, finish: str | None = None,
               role: bool = False, logprobs: dict | None = None) -> dict:
    if chat:
        delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
    return {**head, "choices": [choice]}


def usage_json(job: Job, seqs) -> dict:
    prompt = sum(len(p) for p in job.prompts)
    done = sum(len(s.output_ids) for s in seqs)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
