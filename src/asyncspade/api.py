"""The Python API, in the shape users know from vLLM::

    from asyncspade import LLM, SamplingParams
    llm = LLM(method="asyncspade", budget=1024)           # bundled SmolLM2-135M-Instruct, fp32
    out = llm.generate(["Why is the sky blue?"], SamplingParams(max_tokens=64))
    print(out[0].text, out[0].tpot_s)
    for delta in llm.stream("Count to ten.", SamplingParams(max_tokens=32)):
        print(delta, end="", flush=True)
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .config import SparseConfig
from .engine import Engine, Sequence
from .models import encode_prompt, load_model, parse_dtype
from .sampling import SamplingParams


@dataclass
class RequestOutput:
    prompt: str | list[dict]
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    ttft_s: float
    tpot_s: float
    method: str


class LLM:
    def __init__(self, model: str | None = None, dtype: str | torch.dtype = "fp32", max_batch: int = 8,
                 max_tokens: int | None = None, chat: bool = True, sparse: SparseConfig | None = None,
                 progress=None, **sparse_settings):
        """``sparse_settings`` are :class:`SparseConfig` fields (method, budget, predictor, ...)."""
        dt = parse_dtype(dtype) if isinstance(dtype, str) else dtype
        self.model, self.tokenizer = load_model(model, dt, progress=progress)
        self.sparse = (sparse or SparseConfig()).replace(**sparse_settings) if sparse_settings else (sparse or SparseConfig())
        self.chat = chat
        self.engine = Engine(self.model, self.tokenizer, self.sparse, max_batch=max_batch, max_tokens=max_tokens)

    def encode(self, prompt: str | list[dict]) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, chat=self.chat)

    def _output(self, prompt, seq: Sequence) -> RequestOutput:
        return RequestOutput(prompt, seq.text, list(seq.output_ids), len(seq.prompt_ids), seq.finish_reason,
                             seq.ttft_s, seq.tpot_s, self.sparse.method)

    def generate(self, prompts: str | list, params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Decode all prompts as one batch (continuous batching beyond ``max_batch``)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict)):
            prompts = [prompts]
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        seqs = [self.engine.add(self.encode(p), sp) for p, sp in zip(prompts, plist)]
        self.engine.run(seqs)
        return [self._output(p, s) for p, s in zip(prompts, seqs)]

    def stream(self, prompt: str | list[dict], params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text deltas as tokens are produced; the finished :class:`Sequence` is ``self.last``."""
        seq = self.engine.add(self.encode(prompt), params)
        self.last = seq
        while not seq.finished:
            for ev in self.engine.step():
                if ev.seq is seq and ev.text:
                    yield ev.text

    def close(self) -> None:
        self.engine.close()
