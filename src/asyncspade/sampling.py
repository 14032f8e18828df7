"""Sampling settings (vLLM's names) and the per-sequence sampler."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0        # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self) -> "SamplingParams":
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not (self.temperature >= 0) or self.temperature > 100:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be a list of non-empty strings")
        return self


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed) if seed is not None else torch.seed() % (2**63))
    return g


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from fp32 ``logits [V]``: greedy at temperature 0, else temperature + nucleus (top-p)."""
    if params.temperature == 0:
        return int(logits.argmax())
    probs = (logits / params.temperature).softmax(-1)
    if params.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < params.top_p       # always keeps the most likely token
        sorted_p = sorted_p * keep
        return int(order[torch.multinomial(sorted_p, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))
