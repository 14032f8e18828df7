"""The sparse-attention state of one model: settings, KV store, selection method and selector.

It is attached to every attention module (``module.asyncspade_rt``) so the registered attention function finds
it both under our engine and under ``model.generate``.
"""
from __future__ import annotations

import threading

import torch

from .attention import decode_attention
from .config import SparseConfig
from .kvcache import Batch, KVStore
from .methods import make_method
from .selector import make_selector


# Held around a forward by whoever may build another runtime on the same model from another thread (the server builds
# engines off its engine thread): switching the model's attention modules waits for the forward in flight to end.
MODEL_LOCK = threading.RLock()


class SparseRuntime:
    def __init__(self, model, cfg: SparseConfig, store: KVStore, selector: str = "sync", on_late: str = "wait",
                 writes_kv: bool = True):
        self.layers = list(model.model.layers)
        self.method = make_method(cfg.validate(len(self.layers)))
        self.cfg = self.method.cfg
        self.store = store
        # the forward in progress: set by its driver (the engine, or the drop-in cache) before any layer runs
        self.batch: Batch | None = None
        # True: the attention function writes each layer's new K/V into the store itself (the engine passes no
        # cache through the model's modules); False: a transformers Cache has already written them (drop-in)
        self.writes_kv = writes_kv
        self.sparse_calls = 0    # decode attention calls that ran on a sparse selection (tests, diagnostics)
        attn = self.layers[0].self_attn
        self.heads = model.config.num_attention_heads
        self.kv_heads = store.kv_heads
        self.scale = attn.scaling
        self.sparse_layers = list(range(self.cfg.dense_layers, len(self.layers)))
        self.selector = None
        if self.method.ahead:
            self.selector = make_selector(selector, self.cfg, store, self.heads, self.sparse_layers, self.scale,
                                          on_late)
        # cross-layer forecasts: the residual entering layer `src` forecasts the queries of these target layers
        self.xlayer_targets: dict[int, list[int]] = {}
        self._hooks = []
        if getattr(self.method, "xlayer", False):
            for t in self.sparse_layers:
                self.xlayer_targets.setdefault(max(t - self.cfg.lead, 0), []).append(t)
            for src in self.xlayer_targets:
                self._hooks.append(self.layers[src].register_forward_pre_hook(self._make_hook(src), with_kwargs=True))
        self.probe = None        # optional callable(layer, q, batch, selection) on sparse decode steps (evals)
        self.activate()

    def activate(self) -> None:
        """Make this runtime the one the model's attention modules use (several engines may share one model)."""
        if getattr(self.layers[0].self_attn, "asyncspade_rt", None) is not self:
            with MODEL_LOCK:
                for layer in self.layers:
                    layer.self_attn.asyncspade_rt = self

    def _make_hook(self, src: int):
        def hook(module, args, kwargs):
            if getattr(module.self_attn, "asyncspade_rt", None) is not self:
                return
            batch = self.batch
            if batch is not None and batch.q_len == 1 and batch.max_len > self.cfg.budget:
                hidden = args[0] if args else kwargs["hidden_states"]
                self.method.before_layer(self, src, hidden, kwargs["position_embeddings"], batch)
        return hook

    def begin_sequence(self, lo: int, hi: int) -> None:
        if self.selector is not None:
            self.selector.reset(lo, hi)

    def observe_prefill(self, layer: int, query: torch.Tensor) -> None:
        batch = self.batch
        if layer >= self.cfg.dense_layers and getattr(batch, "final", True):
            self.method.observe(self, layer, query, batch)

    def decode(self, layer: int, query: torch.Tensor) -> torch.Tensor:
        """Decode attention of ``layer`` for queries ``[B, H, 1, D]``; returns ``[B, 1, H, D]``."""
        batch = self.batch
        q = query[:, :, 0]
        sparse_layer = layer >= self.cfg.dense_layers
        sel = None
        if sparse_layer and batch.max_len > self.cfg.budget:
            sel = self.method.select(self, layer, q, batch)
            self.sparse_calls += sel is not None
            if self.probe is not None:
                self.probe(layer, q, batch, sel)
        out = decode_attention(q, self.store, layer, batch, sel, self.cfg, self.scale)
        if sparse_layer:
            self.method.observe(self, layer, query, batch)
        return out.unsqueeze(1)

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for layer in self.layers:
            if getattr(layer.self_attn, "asyncspade_rt", None) is self:
                del layer.self_attn.asyncspade_rt
        if self.selector is not None:
            self.selector.close()
