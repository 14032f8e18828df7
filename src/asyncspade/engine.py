"""The decode engine: slots, chunked dense prefill, batched decode over sequences of different lengths,
sampling, stop rules, streaming events and timing.

The Hugging Face model's modules do the math; the engine owns the loop (embedding -> decoder layers -> norm ->
LM head on the last position only), the preallocated KV store and the sparse-attention runtime. Sequences join
(prefill) and leave between decode steps; every forward runs over the contiguous slot range of the running
sequences, with free slots in that range carried as cheap dummy rows so every K/V read stays a view.
"""
from __future__ import annotations

import contextlib
import gc
import itertools
import os
import threading
import time
from dataclasses import dataclass, field

import torch

from . import kernels
from .arch import head_dim, lean_unsupported
from .attention import NAME, register
from .config import DEFAULT_KV_DTYPE, DEFAULT_WEIGHTS, SparseConfig
from .kvcache import Batch, KVStore
from .lean import lean_model
from .methods import method_class
from .models import parse_dtype, transpose_fp32_linears
from .runtime import SparseRuntime
from .sampling import Logprob, SamplingParams, make_generator, sample, token_logprobs


def kv_store_dtype(model, kv_dtype: str | torch.dtype | None = DEFAULT_KV_DTYPE) -> torch.dtype:
    """The KV store's dtype for ``model``: ``kv_dtype`` on the lean forward, the model's own on its HF modules."""
    own = next(model.parameters()).dtype
    return own if kv_dtype is None or lean_unsupported(model) is not None else parse_dtype(kv_dtype)


class RequestError(ValueError):
    """A request the engine cannot serve (bad prompt or limits); the message is meant for the user."""


@dataclass(eq=False)          # identity semantics: sequences are compared and hashed as objects
class Sequence:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    prefill_len: int = 0         # prompt tokens prefilled densely; the rest go through the decode path one by one
    fed: int = 0                 # tokens in the KV cache
    slot: int = -1
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[dict[int, Logprob]] | None = None     # per output token, when params.logprobs is set
    cumulative_logprob: float | None = None
    t_submit: float = 0.0
    t_first: float = 0.0
    t_last: float = 0.0
    _emitted: int = 0            # characters of text already streamed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def ttft_s(self) -> float:
        return self.t_first - self.t_submit if self.t_first else 0.0

    @property
    def tpot_s(self) -> float:
        n = len(self.output_ids)
        return (self.t_last - self.t_first) / (n - 1) if n > 1 else 0.0


@dataclass
class Event:
    seq: Sequence
    token_ids: list[int]
    text: str                 # newly final text (stop strings held back until resolved)
    finished: bool
    logprobs: list[dict[int, Logprob]] | None = None     # of ``token_ids``, when asked for


@contextlib.contextmanager
def intra_op_threads(n: int | None):
    """torch's intra-op thread count set to ``n`` inside the block (``None``: unchanged)."""
    prev = torch.get_num_threads()
    if n is None or n == prev:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


class Engine:
    def __init__(self, model, tokenizer, sparse: SparseConfig | None = None, max_batch: int = 8,
                 max_tokens: int | None = None, prefill_chunk: int = 512, selector: str = "sync",
                 on_late: str = "wait", store: KVStore | None = None, transpose_weights: bool = True,
                 prefill_budget: int = 2048, decode_threads: int | None = None, weights: str | None = DEFAULT_WEIGHTS,
                 kv_dtype: str | torch.dtype | None = DEFAULT_KV_DTYPE, device: str | torch.device | None = None):
        """``weights``: the lean forward's weight format (fp32, bf16, int8, int4; None: the model's own dtype);
        ``kv_dtype``: the KV store's dtype (fp32, bf16; None: the model's). Models outside the lean forward's
        family run on their Hugging Face modules in their own dtype (``path`` and ``path_note`` say which).
        ``device``: where the lean forward's weights and the KV store live (default: the model's device); the
        engine's bookkeeping and sampling stay on the CPU, and the C kernels serve CPU tensors (elsewhere their
        torch references run)."""
        self.model, self.tokenizer = model, tokenizer
        self.config = model.config
        self.sparse = (sparse or SparseConfig()).validate(self.config.num_hidden_layers)
        self.max_batch = max_batch
        self.max_tokens = max_tokens or self.config.max_position_embeddings
        self.prefill_chunk = prefill_chunk
        self.prefill_budget = prefill_budget
        model_dtype = next(model.parameters()).dtype
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        why_not = lean_unsupported(model)
        self.lean = None
        if why_not is None:
            fmt = weights or {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(model_dtype, "fp32")
            self.lean = lean_model(model, fmt, self.device)
            self.path = "lean"
            self.path_note = (f"lean forward ({self.config.model_type}, {fmt} weights, "
                              f"{kernels.backend(self.device)} kernels)")
        else:
            self.path = "hf"
            self.path_note = f"Hugging Face modules ({why_not})"
            if transpose_weights:
                transpose_fp32_linears(model)          # fp32 only; a no-op for bf16 and when already done
        self._prev_attn = model.config._attn_implementation
        model.set_attn_implementation(register())
        dtype = kv_store_dtype(model, kv_dtype)
        # benchmarks pass one filled store to the engines of several methods
        method = method_class(self.sparse)
        needs = method.store_needs(self.sparse)
        self.store = store or KVStore(self.config.num_hidden_layers, max_batch, self.config.num_key_value_heads,
                                      self.max_tokens, head_dim(self.config), dtype, self.sparse.page_size,
                                      shared=selector == "async" and method.ahead, device=self.device, **needs)
        missing = [name for name, need in needs.items() if need and not getattr(self.store, name)]
        if missing:
            raise ValueError(f"{self.sparse.method} needs a KV store with {', '.join(missing)}")
        # with a cache-rank worker beside the decode loop, decode steps leave it a core (default cores - 1: three
        # busy threads on two cores slow both sides); prefill (compute-bound, no selection) keeps every thread
        worker = selector in ("async", "thread", "dist") and method.ahead
        self.decode_threads = (decode_threads or max(1, len(os.sched_getaffinity(0)) - 1)) if worker else None
        self.rt = SparseRuntime(model, self.sparse, self.store, selector, on_late, lean=self.lean)
        self.sparse = self.rt.cfg                    # with the cost model's min_sparse filled in
        self.eos_ids = self._eos_ids()
        self.slots: list[Sequence | None] = [None] * max_batch
        self.waiting: list[Sequence] = []
        self._lock = threading.Lock()
        self._aborts: list[Sequence] = []
        self._ids = itertools.count()
        self.logits_hook = None      # optional callable(seqs, logits [B, V]) after every decode step (evals)
        # optional callable(engine) -> the slot its next sequence may take, or None: lets engines that share one
        # KV store (the server: one per sparse configuration) share its slots without touching each other's rows
        self.slot_gate = None
        # Everything alive now (the libraries, the model, the tokenizer: ~370K objects for the bundled model) leaves
        # the cyclic collector's sight. Otherwise a full collection walks it every few hundred decode steps and
        # stalls that step by ~150-190 ms (AMD EPYC, 2026-12-01). Collected first, so only live objects are frozen.
        gc.collect()
        gc.freeze()

    def _eos_ids(self) -> set[int]:
        ids = set()
        for src in (getattr(self.model, "generation_config", None), self.config, self.tokenizer):
            e = getattr(src, "eos_token_id", None)
            ids.update(e if isinstance(e, (list, tuple)) else [e] if e is not None else [])
        return ids

    # ---------------------------------------------------------------- requests
    def check(self, prompt_ids: list[int], params: SamplingParams | None = None, decode_tail: int = 0
              ) -> SamplingParams:
        """Raise :class:`RequestError` (a message for the user) if the request cannot be served; the params."""
        params = params or SamplingParams()
        try:
            params.validate(self.config.vocab_size)
        except ValueError as e:
            raise RequestError(str(e)) from None
        if not prompt_ids:
            raise RequestError("empty prompt")
        vocab = self.config.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt_ids):
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})")
        if not 0 <= decode_tail < len(prompt_ids):
            raise RequestError(f"decode_tail must be in [0, {len(prompt_ids) - 1}], got {decode_tail}")
        need = len(prompt_ids) + params.max_tokens
        if need > self.max_tokens:
            raise RequestError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {need} "
                               f"exceeds the context of {self.max_tokens} tokens")
        return params

    def add(self, prompt_ids: list[int], params: SamplingParams | None = None, decode_tail: int = 0) -> Sequence:
        """Queue a request. The last ``decode_tail`` prompt tokens are fed through the decode path one at a time
        (teacher-forced, so sparse selection acts on them as in decoding) instead of being prefilled."""
        return self.add_all([(prompt_ids, params)], decode_tail)[0]

    def add_all(self, jobs: list[tuple[list[int], SamplingParams | None]], decode_tail: int = 0) -> list[Sequence]:
        """Queue several requests, all or none: every one is checked before any is queued."""
        checked = [(list(ids), self.check(ids, p, decode_tail)) for ids, p in jobs]
        seqs = []
        for ids, params in checked:
            seq = Sequence(next(self._ids), ids, params, prefill_len=len(ids) - decode_tail,
                           t_submit=time.perf_counter())
            seq.generator = make_generator(params.seed)
            if params.logprobs is not None:
                seq.logprobs, seq.cumulative_logprob = [], 0.0
            seqs.append(seq)
        with self._lock:
            self.waiting.extend(seqs)
        return seqs

    def adopt(self, slot: int, token_ids: list[int], params: SamplingParams) -> Sequence:
        """Run a sequence whose tokens the KV store already holds in ``slot`` (benchmarks fill one cache and
        share it between methods). It decodes from the next step on, fed its last token again."""
        seq = Sequence(next(self._ids), list(token_ids), params.validate(), prefill_len=len(token_ids),
                       t_submit=time.perf_counter())
        seq.generator = make_generator(params.seed)
        seq.output_ids = [token_ids[-1]]
        seq.prompt_ids = seq.prompt_ids[:-1]
        seq.fed = len(token_ids) - 1
        seq.t_first = seq.t_submit
        self.slots[slot], seq.slot = seq, slot
        self.rt.begin_sequence(slot, slot + 1)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Finish ``seq`` (e.g. its client went away). Safe from any thread: the slot is freed at the next step."""
        with self._lock:
            self._aborts.append(seq)

    def _apply_aborts(self) -> None:
        with self._lock:
            aborts, self._aborts = self._aborts, []
            for seq in aborts:
                if seq in self.waiting:
                    self.waiting.remove(seq)
        for seq in aborts:
            if not seq.finished:
                seq.finish_reason = "abort"
            self._release(seq)

    @property
    def running(self) -> list[Sequence]:
        return [s for s in self.slots if s is not None]

    def has_work(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.slots)

    # ---------------------------------------------------------------- the loop
    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Admit waiting sequences (prefill + first token), then one decode step for all running ones.

        Admission stops once this step has prefilled ``prefill_budget`` tokens (at least one sequence is always
        admitted): a queue of long prompts is spread over several steps, so running sequences keep decoding
        between them and a step (hence an abort, or a shutdown) never waits for the whole queue's prefill."""
        self._apply_aborts()
        events, prefilled = [], 0
        while True:
            with self._lock:
                if not self.waiting or self._free_slot() is None:
                    break
                if prefilled and prefilled + self.waiting[0].prefill_len > self.prefill_budget:
                    break
                seq = self.waiting.pop(0)
            prefilled += seq.prefill_len
            events.append(self._prefill(seq))
        running = [s for s in self.slots if s is not None and not s.finished]
        if running:
            with intra_op_threads(self.decode_threads):
                events += self._decode(running)
        return [e for e in events if e is not None]

    def _free_slot(self) -> int | None:
        if self.slot_gate is not None:
            return self.slot_gate(self)
        return self.slots.index(None) if None in self.slots else None

    def _prefill(self, seq: Sequence) -> Event | None:
        slot = self._free_slot()
        self.slots[slot], seq.slot = seq, slot
        self.rt.begin_sequence(slot, slot + 1)
        ids = torch.tensor(seq.prompt_ids[:seq.prefill_len]).view(1, -1)
        n = ids.shape[1]
        for o in range(0, n, self.prefill_chunk):
            chunk = ids[:, o:o + self.prefill_chunk]
            L = chunk.shape[1]
            batch = Batch(slot, slot + 1, torch.tensor([o]), L)
            batch.final = o + L == n
            mask = None
            if o > 0 and L > 1:          # chunk after the first: causal with an offset
                mask = (torch.arange(o + L)[None, :] <= torch.arange(o, o + L)[:, None]).view(1, 1, L, o + L)
            logits = self._forward(chunk, torch.arange(o, o + L).view(1, -1), batch, mask)
        self.store.lengths[slot] = seq.fed = n
        return self._append(seq, logits[0])

    def _decode(self, running: list[Sequence]) -> list[Event]:
        lo = min(s.slot for s in running)
        hi = max(s.slot for s in running) + 1
        ids = torch.zeros(hi - lo, 1, dtype=torch.int64)
        start = torch.zeros(hi - lo, dtype=torch.int64)      # free slots in the range: dummy rows at position 0
        for s in running:
            fed = s.fed
            ids[s.slot - lo, 0] = s.prompt_ids[fed] if fed < len(s.prompt_ids) else s.output_ids[fed - len(s.prompt_ids)]
            start[s.slot - lo] = fed
        batch = Batch(lo, hi, start, 1)
        logits = self._forward(ids, start.view(-1, 1), batch)
        rows = torch.tensor([s.slot - lo for s in running])
        if self.logits_hook is not None:
            self.logits_hook(running, logits[rows])
        for s in running:
            s.fed += 1
            self.store.lengths[s.slot] = s.fed
        return [self._append(s, logits[s.slot - lo]) for s in running]

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, batch: Batch, mask=None) -> torch.Tensor:
        """Run the decoder over ``ids [B, L]``; returns fp32 logits of the last position ``[B, V]``."""
        self.rt.batch = batch
        if self.lean is not None:
            return self.lean.forward(ids, batch, self.store, self.rt).cpu()
        if self.model.config._attn_implementation != NAME:     # another engine on this model was closed
            self.model.set_attn_implementation(NAME)
        self.rt.activate()
        m = self.model.model
        h = m.embed_tokens(ids)
        pe = m.rotary_emb(h, positions)
        for layer in m.layers:          # no cache object: the attention function writes K/V into the store
            h = layer(h, attention_mask=mask, position_ids=positions, position_embeddings=pe)
        h = m.norm(h[:, -1:])
        return self.model.lm_head(h)[:, 0].float()

    # ---------------------------------------------------------------- tokens -> text, stop rules
    def _append(self, seq: Sequence, logits: torch.Tensor) -> Event | None:
        if seq.fed < len(seq.prompt_ids):          # still feeding the prompt's decode tail: nothing to sample
            return None
        p = seq.params
        tok = sample(logits, p, seq.generator, seq.prompt_ids, seq.output_ids)
        now = time.perf_counter()
        if not seq.output_ids:
            seq.t_first = now
        seq.t_last = now
        new_lps = None
        if (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            seq.finish_reason = "stop"
            new_ids = []
        else:
            seq.output_ids.append(tok)
            new_ids = [tok]
            if seq.logprobs is not None:
                new_lps = [token_logprobs(logits, tok, p.logprobs)]
                seq.logprobs += new_lps
                seq.cumulative_logprob += new_lps[0][tok].logprob
            seq.text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
            for s in p.stop:
                cut = seq.text.find(s)
                if cut >= 0:
                    seq.text, seq.finish_reason = seq.text[:cut], "stop"
            if seq.finish_reason is None and len(seq.output_ids) >= p.max_tokens:
                seq.finish_reason = "length"
        if seq.finished:
            self._release(seq)
        return Event(seq, new_ids, self._emit(seq), seq.finished, new_lps)

    def _emit(self, seq: Sequence) -> str:
        """Text that can be streamed now: hold back an incomplete UTF-8 tail and a possible stop-string prefix."""
        end = len(seq.text)
        if not seq.finished:
            if seq.text.endswith("\ufffd"):
                end -= 1
            hold = max((len(s) - 1 for s in seq.params.stop), default=0)
            end = max(seq._emitted, end - hold)
        out = seq.text[seq._emitted:end]
        seq._emitted = max(seq._emitted, end)
        return out

    def _release(self, seq: Sequence) -> None:
        if 0 <= seq.slot < len(self.slots) and self.slots[seq.slot] is seq:
            self.slots[seq.slot] = None

    def run(self, seqs: list[Sequence], on_event=None) -> list[Sequence]:
        """Step until ``seqs`` are finished."""
        while any(not s.finished for s in seqs):
            for ev in self.step():
                if on_event is not None:
                    on_event(ev)
        return seqs

    def close(self) -> None:
        self.rt.close()
        if self._prev_attn and self._prev_attn != self.model.config._attn_implementation:
            self.model.set_attn_implementation(self._prev_attn)
