"""Sampling settings (vLLM's names) and the per-sequence sampler.

Order, as in vLLM: logit bias, repetition penalty (prompt and output tokens), presence/frequency penalties (output
tokens), then greedy argmax at temperature 0, else temperature, min-p, top-k, top-p and a draw. Log-probabilities are
those of the model's own distribution (log-softmax of the raw logits, before any of the above), as vLLM returns by
default.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

MAX_LOGPROBS = 20             # top log-probabilities per token at most (OpenAI's top_logprobs bound)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class SamplingParams:
    n: int = 1                          # samples per prompt (the API and the server expand them; seeds seed + i)
    max_tokens: int = 256
    temperature: float = 0.0            # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                      # 0 or -1: off
    min_p: float = 0.0                  # drop tokens below min_p x the most likely token's probability
    repetition_penalty: float = 1.0     # > 1 discourages tokens of the prompt and the output (CTRL's rule)
    presence_penalty: float = 0.0       # subtracted once from every token already generated
    frequency_penalty: float = 0.0      # subtracted per occurrence of a token already generated
    logit_bias: dict[int, float] | None = None      # token id -> added to its logit
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)   # finish ("stop") on these, like the EOS token
    ignore_eos: bool = False
    logprobs: int | None = None         # None: none; k: the sampled token's log-probability and the top k

    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        """Check every field (``ValueError`` naming it); token ids against ``vocab_size`` when given."""
        def need(ok, name, what):
            if not ok:
                raise ValueError(f"{name} must be {what}, got {getattr(self, name)!r}")
        need(_is_int(self.n) and self.n >= 1, "n", "a positive integer")
        need(_is_int(self.max_tokens) and self.max_tokens > 0, "max_tokens", "a positive integer")
        need(_is_num(self.temperature) and 0 <= self.temperature <= 100, "temperature", "in [0, 100]")
        need(_is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1]")
        need(_is_int(self.top_k) and self.top_k >= -1, "top_k", "an integer >= -1 (0 or -1: off)")
        need(_is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", "in [0, 1]")
        need(_is_num(self.repetition_penalty) and 0 < self.repetition_penalty <= 100, "repetition_penalty",
             "in (0, 100]")
        need(_is_num(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty", "in [-2, 2]")
        need(_is_num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty",
             "in [-2, 2]")
        need(self.seed is None or _is_int(self.seed), "seed", "an integer")
        need(isinstance(self.ignore_eos, bool), "ignore_eos", "a boolean")
        need(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS), "logprobs",
             f"None or an integer in [0, {MAX_LOGPROBS}]")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        need(isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) and s for s in self.stop), "stop",
             "a list of non-empty strings")
        ids_ok = lambda ids: all(_is_int(i) and 0 <= i < (vocab_size or 2**63) for i in ids)   # noqa: E731
        vocab = f" in [0, {vocab_size})" if vocab_size else ""
        need(isinstance(self.stop_token_ids, (list, tuple)) and ids_ok(self.stop_token_ids), "stop_token_ids",
             f"a list of token ids{vocab}")
        if self.logit_bias is not None:
            need(isinstance(self.logit_bias, dict) and ids_ok(self.logit_bias)
                 and all(_is_num(b) and -100 <= b <= 100 for b in self.logit_bias.values()), "logit_bias",
                 f"a map of token ids{vocab} to numbers in [-100, 100]")
        return self

    @property
    def penalized(self) -> bool:
        """Whether the logits are changed before sampling (the common greedy path skips all of it)."""
        return bool(self.logit_bias) or self.repetition_penalty != 1 or bool(self.presence_penalty) \
            or bool(self.frequency_penalty)


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed) % 2**64 if seed is not None else torch.seed() % (2**63))
    return g


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids=(), output_ids=()) -> torch.Tensor:
    """``logits [V]`` after logit bias and the repetition/presence/frequency penalties (a new tensor when changed).

    repetition: a logit ``x`` of a token seen in the prompt or the output becomes ``x / p`` if positive, else ``x * p``;
    presence/frequency (OpenAI): ``x - presence * [count > 0] - frequency * count`` over the output's tokens."""
    if not params.penalized:
        return logits
    x = logits.clone()
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), dtype=torch.int64)
        x[ids] += torch.tensor(list(params.logit_bias.values()), dtype=x.dtype)
    if params.repetition_penalty != 1 and (len(prompt_ids) or len(output_ids)):
        seen = torch.tensor(list(prompt_ids) + list(output_ids), dtype=torch.int64).unique()
        v = x[seen]
        x[seen] = torch.where(v > 0, v / params.repetition_penalty, v * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and len(output_ids):
        counts = torch.bincount(torch.tensor(list(output_ids), dtype=torch.int64), minlength=x.shape[-1]).to(x.dtype)
        x -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(x.dtype)
    return x


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator, prompt_ids=(),
           output_ids=()) -> int:
    """One token from fp32 ``logits [V]`` of a sequence whose prompt and output so far are given (for penalties)."""
    x = apply_penalties(logits, params, prompt_ids, output_ids)
    if params.temperature == 0:
        return int(x.argmax())
    probs = (x / params.temperature).softmax(-1)
    if params.min_p > 0 or 0 < params.top_k < probs.shape[-1]:
        if params.min_p > 0:
            probs = torch.where(probs < params.min_p * probs.max(), 0.0, probs)
        if 0 < params.top_k < probs.shape[-1]:
            probs = torch.where(probs < probs.topk(params.top_k).values[-1], 0.0, probs)
        probs = probs / probs.sum()
    if params.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < params.top_p       # always keeps the most likely token
        sorted_p = sorted_p * keep
        return int(order[torch.multinomial(sorted_p, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class Logprob:
    """vLLM's shape: the log-probability of a token, its rank in the distribution (1 = most likely), its text."""
    logprob: float
    rank: int
    decoded_token: str | None = None


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> dict[int, Logprob]:
    """``{token id: Logprob}`` for the sampled ``token`` and the ``top`` most likely tokens of the model's own
    distribution (log-softmax of the raw ``logits [V]``), most likely first, the sampled token among them."""
    lp = logits.float().log_softmax(-1)
    own = float(lp[token])
    out = {}
    if top:
        vals, ids = lp.topk(top)
        out = {int(i): Logprob(float(v), r + 1) for r, (v, i) in enumerate(zip(vals, ids))}
    if token not in out:
        out[token] = Logprob(own, int((lp > own).sum()) + 1)
    return out
