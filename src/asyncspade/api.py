"""The Python API, in the shape users know from vLLM::

    from asyncspade import LLM, SamplingParams
    with LLM(method="asyncspade", budget=1024) as llm:            # bundled SmolLM2-135M-Instruct, fp32
        out = llm.chat([{"role": "user", "content": "Why is the sky blue?"}], SamplingParams(max_tokens=64))
        print(out[0].outputs[0].text, out[0].metrics.tpot_s)
        for delta in llm.stream("Once upon a time", SamplingParams(max_tokens=32)):
            print(delta, end="", flush=True)

``generate`` continues raw text (or token ids), ``chat`` applies the model's chat template, as in vLLM. A batch is
checked whole before anything is queued; a call that fails, and a stream closed early, leave nothing running.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from .config import DEFAULT_KV_DTYPE, DEFAULT_WEIGHTS, SparseConfig
from .engine import Engine, Event, Sequence
from .models import encode_prompt, load_model, parse_dtype
from .sampling import Logprob, SamplingParams

Prompt = str | list[int] | dict


@dataclass
class CompletionOutput:
    """One sample of a request (vLLM's shape)."""
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None


@dataclass
class RequestMetrics:
    ttft_s: float               # submission -> first token
    tpot_s: float               # mean time per output token after the first


@dataclass
class RequestOutput:
    """A request's result: its prompt and ``outputs`` (``SamplingParams.n`` samples). ``.text``, ``.token_ids`` and
    ``.finish_reason`` are those of the first sample, for convenience."""
    request_id: str
    prompt: str | list[dict] | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    metrics: RequestMetrics
    method: str
    finished: bool = True

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def ttft_s(self) -> float:
        return self.metrics.ttft_s

    @property
    def tpot_s(self) -> float:
        return self.metrics.tpot_s


class LLM:
    """A model with the sparse-attention engine around it.

    ``model``: None (the bundled SmolLM2-135M-Instruct), an HF checkpoint directory, an HF model id in the local
    cache, or a ``.gguf`` file. ``max_batch``: sequences decoded together (continuous batching beyond it).
    ``max_model_len``: context per sequence (default: the model's). ``selector``: where lastq/asyncspade select:
    ``"auto"`` (the default: what the CLI and the server choose on this machine, see ``placement.auto_selector``),
    ``"sync"`` (in-process), ``"async"`` (the cache-rank worker process; a script that runs it needs the usual
    ``if __name__ == "__main__":`` guard of multiprocessing) or ``"dist"``. ``weights``, ``kv_dtype``, ``device``:
    the lean forward's formats (as the CLI's flags). ``sparse`` and the keyword ``sparse_settings`` are
    :class:`SparseConfig` fields (method, budget, predictor, ...).
    """

    def __init__(self, model: str | None = None, dtype: str | torch.dtype = "fp32", max_batch: int = 8,
                 max_model_len: int | None = None, sparse: SparseConfig | None = None, selector: str = "auto",
                 on_late: str = "wait", progress=None, weights: str = DEFAULT_WEIGHTS,
                 kv_dtype: str = DEFAULT_KV_DTYPE, device: str = "cpu", **sparse_settings):
        from .placement import SELECTORS, new_engine
        if selector not in SELECTORS:
            raise ValueError(f"selector must be one of {', '.join(SELECTORS)}, got {selector!r}")
        dt = parse_dtype(dtype) if isinstance(dtype, str) else dtype
        self.model, self.tokenizer = load_model(model, dt, progress=progress)
        base = sparse or SparseConfig()
        self.sparse = base.replace(**sparse_settings) if sparse_settings else base
        self.engine: Engine = new_engine(self.model, self.tokenizer, self.sparse, max_batch, max_model_len, selector,
                                         on_late, {"weights": weights, "kv_dtype": kv_dtype, "device": device})
        self._streams: dict[int, list[Event]] = {}     # id(seq) -> events of an open stream not yet yielded
        self._ids = itertools.count()

    # ------------------------------------------------------------------ prompts
    def _encode(self, prompt: Prompt, chat: bool) -> list[int]:
        if chat:
            return encode_prompt(self.tokenizer, prompt, chat=True)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        if not isinstance(prompt, str):
            raise TypeError("a prompt is a string, a list of token ids, {'prompt': str} or {'prompt_token_ids': "
                            "[...]}; for a conversation (a list of messages) use llm.chat(messages)")
        return encode_prompt(self.tokenizer, prompt, chat=False)

    @staticmethod
    def _params_list(params, count: int) -> list[SamplingParams]:
        if params is None or isinstance(params, SamplingParams):
            return [params or SamplingParams()] * count
        params = list(params)
        if len(params) != count:
            raise ValueError(f"got {count} prompts but {len(params)} SamplingParams: give one for all, or one per "
                             "prompt")
        return params

    # ------------------------------------------------------------------ running
    def _step(self) -> list[Event]:
        """One engine step; events of open streams are kept for them (another call may be stepping the engine)."""
        events = self.engine.step()
        for ev in events:
            box = self._streams.get(id(ev.seq))
            if box is not None:
                box.append(ev)
        return events

    def _run(self, requests: list[tuple[Prompt | None, list[int], SamplingParams]]) -> list[RequestOutput]:
        """Queue every sample of every request (all checked first), decode them, and never leave one behind."""
        jobs = [(ids, replace(p, n=1, seed=None if p.seed is None else p.seed + i))
                for _, ids, p in requests for i in range(p.n)]
        seqs = self.engine.add_all(jobs)          # RequestError (a ValueError) before anything is queued
        try:
            while any(not s.finished for s in seqs):
                self._step()
        finally:
            for s in seqs:
                if not s.finished:
                    self.engine.abort(s)
        outs, it = [], iter(seqs)
        for prompt, ids, p in requests:
            samples = [next(it) for _ in range(p.n)]
            outs.append(self._output(prompt, ids, samples))
        return outs

    def _output(self, prompt, ids: list[int], seqs: list[Sequence]) -> RequestOutput:
        outs = [CompletionOutput(i, s.text, list(s.output_ids), s.cumulative_logprob, s.logprobs, s.finish_reason)
                for i, s in enumerate(seqs)]
        return RequestOutput(str(next(self._ids)), prompt if isinstance(prompt, (str, list)) else None, list(ids),
                             outs, RequestMetrics(seqs[0].ttft_s, seqs[0].tpot_s), self.sparse.method)

    def generate(self, prompts: Prompt | list[Prompt], sampling_params: SamplingParams | list[SamplingParams] |
                 None = None) -> list[RequestOutput]:
        """Continue each prompt (raw text, token ids, ``{"prompt": ...}`` or ``{"prompt_token_ids": ...}``); one
        ``SamplingParams`` applies to all, a list gives one per prompt. Decoded as one batch."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                 and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]
        prompts = list(prompts)
        params = self._params_list(sampling_params, len(prompts))
        return self._run([(p, self._encode(p, chat=False), sp) for p, sp in zip(prompts, params)])

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | list[SamplingParams] |
             None = None) -> list[RequestOutput]:
        """Answer a conversation (a list of ``{"role", "content"}`` messages), or several, through the model's chat
        template."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        params = self._params_list(sampling_params, len(convs))
        return self._run([(c, self._encode(c, chat=True), sp) for c, sp in zip(convs, params)])

    def stream(self, prompt: Prompt | list[dict], sampling_params: SamplingParams | None = None,
               chat: bool | None = None) -> Iterator[str]:
        """Yield text deltas as tokens are produced (a message list goes through the chat template unless ``chat``
        says otherwise). Closing the iterator early (``break``, ``close()``, or dropping it) aborts the sequence and
        frees its slot. The finished sequence is ``self.last``."""
        is_chat = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict) if chat is None else chat
        params = sampling_params or SamplingParams()
        if params.n != 1:
            raise ValueError("stream() decodes one sample: n must be 1")
        [seq] = self.engine.add_all([(self._encode(prompt, chat=is_chat), params)])
        self.last = seq
        box = self._streams[id(seq)] = []
        try:
            while True:
                while box:
                    ev = box.pop(0)
                    if ev.text:
                        yield ev.text
                if seq.finished:
                    return
                self._step()
        finally:
            del self._streams[id(seq)]
            if not seq.finished:
                self.engine.abort(seq)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["LLM", "CompletionOutput", "RequestMetrics", "RequestOutput", "SamplingParams"]
