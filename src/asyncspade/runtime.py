"""The sparse-attention state of one model: settings, KV store, selection method and selector.

Two forwards drive it. The lean forward (``lean.py``) calls :meth:`before_layer`, :meth:`attend` and
:meth:`observe_prefill` directly. The Hugging Face modules (other architectures, and ``model.generate`` through the
drop-in) reach it through the registered attention function, which finds it on every attention module
(``module.asyncspade_rt``), and through forward pre-hooks on the decoder layers for the cross-layer forecast.
"""
from __future__ import annotations

import os
import threading

import torch

from .arch import layer_windows
from .attention import decode_attention
from .config import SparseConfig
from .kvcache import Batch, KVStore
from .methods import Selection, make_method
from .predictor import xlayer_query
from .selection import Selector, make_selector
from .selection.candidate_keys import CandidateKeys
from .selection.passes import check_tokens, refine


MIN_SPARSE_ENV = "ASYNCSPADE_MIN_SPARSE"


# Held around a forward by whoever may build another runtime on the same model from another thread (the server builds
# engines off its engine thread): switching the model's attention modules waits for the forward in flight to end.
MODEL_LOCK = threading.RLock()


class SparseRuntime:
    """The sparse state of one model, and the context every method hook receives: it offers what
    :class:`~asyncspade.methods.base.SelectionContext` lists (store, selector, scale, kv_heads, xlayer_targets)."""

    def __init__(self, model, cfg: SparseConfig, store: KVStore, selector: str = "sync", on_late: str = "wait",
                 writes_kv: bool = True, lean=None):
        self.layers = list(model.model.layers)
        cfg = cfg.validate(len(self.layers))
        if cfg.sparse and cfg.method != "bound" and cfg.min_sparse is None:
            fixed = os.environ.get(MIN_SPARSE_ENV)      # a fixed length instead of the measurement (experiments)
            cfg = cfg.replace(min_sparse=int(fixed) if fixed else self._dense_up_to(model, cfg, store, selector))
        self.method = make_method(cfg)
        self.cfg = self.method.cfg
        self.store = store
        self.lean = lean         # the LeanModel driving this runtime, or None (HF modules)
        # the forward in progress: set by its driver (the engine, or the drop-in cache) before any layer runs
        self.batch: Batch | None = None
        # True: the attention function writes each layer's new K/V into the store itself (the engine passes no
        # cache through the model's modules); False: a transformers Cache has already written them (drop-in)
        self.writes_kv = writes_kv
        self.sparse_calls = 0    # decode attention calls of sparse layers that ran on a sparse selection ...
        self.dense_calls = 0     # ... and that ran dense (caches within min_sparse; tests, diagnostics, bench)
        self.heads = model.config.num_attention_heads
        self.kv_heads = store.kv_heads
        self.scale = self.layers[0].self_attn.scaling
        # windowed layers attend their window (already cheap); the global ones past dense_layers are sparse
        self.windows = layer_windows(model.config, store.max_tokens)
        self.sparse_layers = [i for i in range(self.cfg.dense_layers, len(self.layers)) if self.windows[i] is None]
        self._sparse = set(self.sparse_layers)
        self.selector: Selector | None = None
        if self.method.ahead:
            self.selector = make_selector(selector, self.cfg, store, self.heads, self.sparse_layers, self.scale,
                                          on_late)
        self.candidate_keys = None     # the refinement's candidates' keys, gathered once per candidate list
        if self.selector is not None and self.selector.plan.refine:
            # with the in-line check, its tokens follow the list's in the buffer (gathered again every step)
            self.candidate_keys = CandidateKeys(store, self.sparse_layers,
                                                self.selector.plan.result_width + self.cfg.check)
        # cross-layer forecasts: the residual entering layer `src` forecasts the queries of these target layers
        self.xlayer_targets: dict[int, list[int]] = {}
        self._hooks = []
        if self.selector is not None and self.selector.plan.xlayer:
            for t in self.sparse_layers:
                self.xlayer_targets.setdefault(max(t - self.cfg.lead, 0), []).append(t)
            if lean is None:
                for src in self.xlayer_targets:
                    self._hooks.append(self.layers[src].register_forward_pre_hook(self._make_hook(src),
                                                                                  with_kwargs=True))
        self.probe = None        # optional callable(layer, q, batch, selection) on sparse decode steps (evals)
        self.activate()

    @staticmethod
    def _dense_up_to(model, cfg: SparseConfig, store: KVStore, selector: str) -> int:
        """The cost model's verdict: the longest cache for which dense attention is cheaper than this method's
        sparse path, on this machine (measured once per shape per process)."""
        from .costmodel import measure
        from .methods import method_class
        from .selection.plan import SelectionPlan
        plan = SelectionPlan.of(cfg, store.max_tokens) if method_class(cfg).ahead else None
        rows = method_class(cfg)(cfg).inline_rows(plan, synchronous=selector == "sync")
        group = model.config.num_attention_heads // store.kv_heads
        row = store.kv_heads * store.head_dim * store.k.element_size()
        return measure(store.kv_heads, group, store.head_dim, store.dtype).threshold(rows, row, cfg.budget)

    def activate(self) -> None:
        """Make this runtime the one the model's attention modules use (several engines may share one model)."""
        if getattr(self.layers[0].self_attn, "asyncspade_rt", None) is not self:
            with MODEL_LOCK:
                for layer in self.layers:
                    layer.self_attn.asyncspade_rt = self

    def _forecasting(self, layer: int) -> bool:
        batch = self.batch
        return (layer in self.xlayer_targets and batch is not None and batch.q_len == 1
                and self.cfg.sparse_at(batch.max_len))

    def _make_hook(self, src: int):
        def hook(module, args, kwargs):
            if getattr(module.self_attn, "asyncspade_rt", None) is not self or not self._forecasting(src):
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            pe = kwargs["position_embeddings"]
            self.method.before_layer(self, src, lambda t: xlayer_query(self.layers[t], hidden, pe), self.batch)
        return hook

    def before_layer(self, layer: int, hidden: torch.Tensor) -> None:
        """Lean forward, decode: the residual stream ``hidden [B, C]`` enters ``layer``."""
        if self._forecasting(layer):
            start = self.batch.start
            self.method.before_layer(self, layer, lambda t: self.lean.query(t, hidden, start), self.batch)

    def begin_sequence(self, lo: int, hi: int) -> None:
        if self.selector is not None:
            self.selector.reset(lo, hi)
        if self.candidate_keys is not None:       # the slots' keys are another sequence's from now on
            self.candidate_keys.reset(lo, hi)

    def observe_prefill(self, layer: int, query: torch.Tensor) -> None:
        """The prefill queries ``[B, H, L, D]`` of ``layer``: the final chunk's feed the ahead selections."""
        batch = self.batch
        if layer in self._sparse and getattr(batch, "final", True):
            self.method.observe(self, layer, query, batch)

    def attend(self, layer: int, q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Decode attention of ``layer``: queries ``q [B, H, D]`` (fp32) -> ``out [B, KVH, G, D]``."""
        batch = self.batch
        sparse_layer = layer in self._sparse
        sel = None
        if sparse_layer and self.cfg.sparse_at(batch.max_len):
            sel = self.method.select(self, layer, q, batch)
            if sel is not None and sel.candidates:       # the true query picks the exact top-k in-line
                cand, extra = sel.idx, None
                if self.cfg.check:      # the true query's own best tokens join them (the buffer's last rows)
                    extra = check_tokens(self.selector.plan, q, self.store.sketch(layer, batch.lo, batch.hi),
                                         batch.lengths, cand, self.scale)
                keys = self.candidate_keys.get(layer, batch, cand, self.selector.generation(layer, batch), extra)
                if extra is not None:
                    cand = torch.cat([cand, extra], -1)
                gathered = keys is not None
                if not gathered:
                    keys = self.store.k[layer, batch.lo:batch.hi]
                sel = Selection(refine(self.selector.plan, q, keys, batch.lengths, cand, self.scale, gathered))
            self.sparse_calls += sel is not None
            if self.probe is not None:
                self.probe(layer, q, batch, sel)
        elif sparse_layer:
            self.dense_calls += 1
        decode_attention(q, self.store, layer, batch, sel, self.cfg, self.scale, out, self.windows[layer])
        if sparse_layer:
            self.method.observe(self, layer, q.unsqueeze(2), batch)
        return out

    def decode(self, layer: int, query: torch.Tensor) -> torch.Tensor:
        """HF modules: decode attention for queries ``[B, H, 1, D]``; returns ``[B, 1, H, D]``."""
        b, h, _, d = query.shape
        out = torch.empty(b, self.kv_heads, h // self.kv_heads, d, dtype=query.dtype, device=query.device)
        self.attend(layer, query[:, :, 0].float().contiguous(), out)
        return out.view(b, 1, h, d)

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for layer in self.layers:
            if getattr(layer.self_attn, "asyncspade_rt", None) is self:
                del layer.self_attn.asyncspade_rt
        if self.selector is not None:
            self.selector.close()
