"""The engines behind the server: one KV store and one set of decode slots for the whole server, shared by one engine
per sparse configuration in use, all stepped by one thread.

* Memory is bounded by the server's flags, whatever requests ask. One KV store of ``--max-batch`` slots x
  ``--max-model-len`` tokens is allocated at start; the engine of a per-request override (method, budget) reuses it
  and costs only its selector (a cache-rank worker process for lastq/asyncspade), ``--max-engines`` at most.
* A slot belongs to one engine at a time (:class:`SlotGate`). An engine decodes over the contiguous range of its
  slots and writes throwaway rows into the free slots inside that range, so a slot inside another engine's range is
  never handed out.
* Engines are built on a request's worker thread, never on the event loop nor the engine thread; the model's
  attention modules switch to a new engine's runtime under ``runtime.MODEL_LOCK``, which the engine thread holds
  around each step, so a build waits for at most one step and never changes a forward in flight.
* Request handlers only submit and cancel; the engine thread posts each sequence's events to its handler's asyncio
  queue (``loop.call_soon_threadsafe``).
* Drain (SIGTERM): no new requests; running ones finish until the deadline, then each remaining one gets an error.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from dataclasses import dataclass

from ..engine import Engine, Sequence
from ..config import DEFAULT_KV_DTYPE
from ..kvcache import KVStore
from ..runtime import MODEL_LOCK
from ..sampling import SamplingParams
from ..arch import head_dim
from ..engine import kv_store_dtype
from ..methods import method_class
from ..placement import SharedMemoryError, ahead, build_engine, choose_selector, has_room, \
    is_allocation_failure, no_leftovers, store_bytes, warn
from .metrics import Metrics
from .protocol import APIError, busy, shutting_down

log = logging.getLogger("asyncspade.server")

SHUTDOWN = "the server is shutting down: this request was stopped before it finished"


@dataclass
class Delta:
    text: str
    finished: bool
    error: str | None = None
    status: int = 500              # of the error
    token_ids: list[int] | None = None
    logprobs: list | None = None   # entries of ``token_ids``, when asked for


@dataclass
class Sink:
    """Where the events of one sequence go: an asyncio queue on the handler's event loop."""
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    index: int                     # the choice index of this sequence in its response
    seq: Sequence
    engine: Engine
    done: bool = False             # its last event was delivered

    def put(self, item: Delta) -> None:
        with contextlib.suppress(RuntimeError):        # the loop is gone (shutdown): nobody is listening
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, item))


class SlotGate:
    """Hands each engine a free slot of the shared store that no other engine's decode range covers, and that does
    not stretch the engine's own range over another engine's slot (``Engine.slot_gate``)."""

    def __init__(self, slots: int, engines):
        self.slots, self._engines = slots, engines

    def held(self, eng: Engine) -> list[int]:
        return [i for i, s in enumerate(eng.slots) if s is not None]

    def __call__(self, eng: Engine) -> int | None:
        taken, spans = set(), []
        for other in self._engines():
            held = self.held(other) if other is not eng else []
            if held:
                taken.update(held)
                spans.append((held[0], held[-1]))
        mine = self.held(eng)
        for i in range(self.slots):
            if eng.slots[i] is not None or i in taken or any(lo < i < hi for lo, hi in spans):
                continue
            lo, hi = min(mine + [i]), max(mine + [i])
            if not any(lo <= t <= hi for t in taken):
                return i
        return None

    def free(self) -> int:
        busy_slots = set()
        for e in self._engines():
            busy_slots.update(self.held(e))
        return self.slots - len(busy_slots)


def selector_degraded(eng: Engine) -> bool:
    """Whether the engine's cache-rank worker is gone (its selections now run in-process, slower)."""
    sel = eng.rt.selector
    proc = getattr(sel, "proc", None)
    return getattr(sel, "fallback", None) is not None or (proc is not None and not proc.is_alive())


class Engines:
    """The engines (one per sparse configuration, all on one model and one KV store) and the thread that steps them."""

    def __init__(self, model, tokenizer, sparse, *, max_batch: int = 8, max_queue: int = 64,
                 max_model_len: int | None = None, max_engines: int = 4, selector: str | None = None,
                 on_late: str = "wait", decode_threads: int | None = None, options: dict | None = None):
        """``options``: the engines' formats (weights, kv_dtype, device: ``Engine``'s keywords)."""
        self.model, self.tokenizer = model, tokenizer
        config = model.config
        self.max_batch, self.max_queue, self.max_engines = max_batch, max_queue, max_engines
        self.context = max_model_len or config.max_position_embeddings
        self.on_late, self.decode_threads, self.options = on_late, decode_threads, options or {}
        self.default = sparse.validate(config.num_hidden_layers)
        self.metrics = Metrics()
        self._lock = threading.Lock()        # engines dict, sinks, admission
        self._build_lock = threading.Lock()  # one engine build at a time
        self._wake = threading.Event()
        self._stop = False
        self.draining, self._deadline = False, float("inf")
        self._sinks: dict[int, Sink] = {}    # id(seq) -> sink; the sink holds the seq, so the id stays unique
        self.engines: dict = {}
        self.gate = SlotGate(max_batch, lambda: list(self.engines.values()))
        self.store, self.selector = self._new_store(selector)
        self.engines[self.default] = self._build(self.default, selector)
        self.thread = threading.Thread(target=self._run, name="asyncspade-engine", daemon=True)

    # ------------------------------------------------------------ building
    def _new_store(self, requested: str | None) -> tuple[KVStore, str]:
        """The one KV store, in shared memory when the asynchronous selector may run (and there is room for it)."""
        cfg = self.model.config
        dtype = kv_store_dtype(self.model, self.options.get("kv_dtype", DEFAULT_KV_DTYPE))
        needs = method_class(self.default).store_needs(self.default)
        need = store_bytes(cfg, self.max_batch, self.context, dtype.itemsize, self.default.page_size, **needs)
        hint = ", or lower --max-batch / --max-model-len"
        if requested not in (None, "auto", "async"):
            selector = requested
        elif ahead(self.default):
            selector = choose_selector(requested, need, hint)
        else:                                 # quiet: only per-request overrides would run a worker
            selector = "async" if has_room(need) else "sync"

        def allocate(shared: bool) -> KVStore:
            return KVStore(cfg.num_hidden_layers, self.max_batch, cfg.num_key_value_heads, self.context,
                           head_dim(cfg), dtype, self.default.page_size, shared=shared, **needs,
                           device=self.options.get("device", "cpu"))
        if selector != "async":
            return allocate(False), selector
        try:
            with no_leftovers():
                return allocate(True), selector
        except Exception as e:
            if not is_allocation_failure(e):
                raise
            why = f"could not allocate {need / 2**30:.2f} GiB of shared memory for the KV store ({type(e).__name__})"
            if requested == "async" and ahead(self.default):
                raise SharedMemoryError(f"{why}; give the container more shared memory (docker run --shm-size=...)"
                                        f"{hint}, or run with --selector sync") from None
            if ahead(self.default):
                warn(f"{why}; selecting in-process instead (--selector sync)")
            return allocate(False), "sync"

    def _build(self, cfg, requested: str | None = None) -> Engine:
        """An engine on the shared store. ``requested``: the --selector the user named (the server's own engine)."""
        def factory(sel: str) -> Engine:
            return Engine(self.model, self.tokenizer, cfg, max_batch=self.max_batch, max_tokens=self.context,
                          selector=sel, on_late=self.on_late, store=self.store, decode_threads=self.decode_threads,
                          **self.options)
        # the store is in shared memory already; the worker's own buffers may still not fit: then in-process (an
        # error only for the server's own engine when --selector async was asked for by name)
        eng = build_engine(factory, requested if self.selector == "async" else self.selector, cfg, 0)
        eng.slot_gate = self.gate
        return eng

    def ensure(self, cfg) -> None:
        """Make sure an engine for ``cfg`` exists. Blocks up to one engine build: call it on a worker thread."""
        with self._lock:
            if cfg in self.engines:
                return
        with self._build_lock:
            with self._lock:
                if cfg in self.engines:
                    return
                if self.draining:
                    raise shutting_down()
                victim = None
                if len(self.engines) >= self.max_engines:
                    idle = [c for c, e in self.engines.items() if c != self.default and not e.has_work()
                            and not any(s.engine is e for s in self._sinks.values())]
                    if not idle:
                        raise busy(f"all {self.max_engines} engines (--max-engines) are busy with other sparse "
                                   "settings; retry later", "too_many_engines", 5)
                    victim = self.engines.pop(idle[0])
            if victim is not None:
                with MODEL_LOCK:              # its runtime may be the model's current one
                    victim.close()
            try:
                eng = self._build(cfg)
            except APIError:
                raise
            except Exception:
                ref = uuid.uuid4().hex[:8]
                log.exception("building the engine for %s failed (ref %s)", cfg, ref)
                raise APIError(503, f"could not start an engine for these sparse settings (ref {ref}); the server "
                               "log has the details", "asyncspade", "engine_unavailable", "server_error") from None
            with self._lock:
                self.engines[cfg] = eng

    # ------------------------------------------------------------ called from request handlers
    def submit(self, cfg, jobs: list[tuple[list[int], SamplingParams]]):
        """Queue ``jobs`` (prompt ids, params) on the engine of ``cfg``; their events arrive on the returned queue as
        ``(choice index, Delta)``. None when that engine was retired meanwhile (``ensure`` it again). Raises a 429
        when more than ``max_queue`` sequences would wait, ``RequestError`` for a request the engine refuses."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        with self._lock:
            if self.draining:
                raise shutting_down()
            eng = self.engines.get(cfg)
            if eng is None:
                return None
            waiting = sum(len(e.waiting) for e in self.engines.values()) + len(jobs) - self.gate.free()
            if waiting > self.max_queue:
                raise busy(f"server busy: the queue is full ({self.max_queue} waiting sequences); retry later",
                           "rate_limit_exceeded")
            seqs = eng.add_all(jobs)
            for i, seq in enumerate(seqs):
                self._sinks[id(seq)] = Sink(loop, queue, i, seq, eng)
        self._wake.set()
        return seqs, queue

    def cancel(self, seqs: list[Sequence]) -> None:
        """The request is over (done, failed or its client left): free the slots of unfinished sequences."""
        with self._lock:
            for seq in seqs:
                sink = self._sinks.pop(id(seq), None)
                if sink is not None and not seq.finished:
                    sink.engine.abort(seq)
        self._wake.set()

    def drain(self, timeout_s: float) -> None:
        """Stop admitting requests; those running may finish within ``timeout_s``, then each gets an error."""
        self.draining, self._deadline = True, time.monotonic() + timeout_s
        self._wake.set()

    # ------------------------------------------------------------ state
    def counts(self) -> tuple[int, int]:
        """(sequences holding a slot, sequences waiting for one)."""
        with self._lock:
            engines = list(self.engines.values())
        return sum(len(e.running) for e in engines), sum(len(e.waiting) for e in engines)

    def engine_info(self) -> list[dict]:
        with self._lock:
            engines = list(self.engines.items())
        return [{"method": c.method, "budget": c.budget, "degraded": selector_degraded(e),
                 "late_rate": float(getattr(e.rt.selector, "late_rate", 0.0) or 0.0)} for c, e in engines]

    def health(self) -> tuple[int, dict]:
        if not self.thread.is_alive():
            return 503, {"status": "engine loop stopped"}
        if self.draining:
            return 503, {"status": "shutting down"}
        degraded = [e for e in self.engine_info() if e["degraded"]]
        if degraded:
            which = ", ".join(f"{e['method']}@{e['budget']}" for e in degraded)
            return 200, {"status": "degraded", "detail": f"the cache-rank worker of {which} is gone: selection runs "
                         "in-process (slower); restart the server to get it back"}
        return 200, {"status": "ok"}

    def render_metrics(self) -> str:
        active, queued = self.counts()
        return self.metrics.render(active, queued, self.max_batch, self.engine_info())

    # ------------------------------------------------------------ the engine thread
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.draining = True
        self._fail_all(SHUTDOWN)
        self._stop = True
        self._wake.set()
        if self.thread.is_alive():
            self.thread.join(timeout=30)
        with MODEL_LOCK, self._lock:
            engines, self.engines = list(self.engines.values()), {}
        with MODEL_LOCK:
            for eng in engines:
                eng.close()

    def _run(self) -> None:
        while not self._stop:
            self._wake.clear()
            if self.draining and time.monotonic() >= self._deadline:
                self._fail_all(SHUTDOWN)
            with self._lock:
                busy_engines = [e for e in self.engines.values() if e.has_work()]
            if not busy_engines:
                self._wake.wait(0.5 if self.draining else None)
                continue
            for eng in busy_engines:             # round-robin: one step of each engine with work
                self._step(eng)

    def _step(self, eng: Engine) -> None:
        try:
            with MODEL_LOCK:
                events = eng.step()
        except Exception:                         # fail this batch's requests, keep serving the others
            ref = uuid.uuid4().hex[:8]
            log.exception("engine step failed (ref %s)", ref)
            self._fail(eng, f"internal error while decoding (ref {ref}); the server log has the details")
            return
        with self._lock:
            targets = [(self._sinks.get(id(ev.seq)), ev) for ev in events]
        self.metrics.generated(sum(len(ev.token_ids) for ev in events))
        for sink, ev in targets:
            seq = ev.seq
            if ev.finished and seq.finish_reason != "abort":
                self.metrics.finished(seq.ttft_s, seq.tpot_s if len(seq.output_ids) > 1 else None)
            if sink is not None:
                sink.done = ev.finished
                sink.put(Delta(ev.text, ev.finished, token_ids=ev.token_ids, logprobs=ev.logprobs))

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

    def _fail_all(self, message: str) -> None:
        """Every unfinished sequence ends now with ``message`` (a 503: the server is going away)."""
        with self._lock:
            victims = [s for s in self._sinks.values() if not s.done]
            for sink in victims:
                del self._sinks[id(sink.seq)]
        for sink in victims:
            sink.engine.abort(sink.seq)
            sink.put(Delta("", True, message, 503))
        if victims:
            self._wake.set()
