"""Drop-in sparse attention for existing Hugging Face code::

    import asyncspade
    with asyncspade.sparse_attention(model, method="asyncspade", budget=1024) as cache:
        out = model.generate(input_ids, max_new_tokens=256, cache=cache)   # past_key_values=cache before 5.24

    handle = asyncspade.enable(model, method="quest", budget=512)    # or keep it on
    out = handle.generate(input_ids, max_new_tokens=256)             # a fresh (reset) cache per call
    asyncspade.disable(model)                                        # back to the previous attention

The model is switched to the ``asyncspade`` attention implementation and a :class:`SparseRuntime` is attached to its
attention modules; the KV cache passed to ``generate`` is backed by a preallocated :class:`KVStore`
(``max_batch`` sequences of ``max_tokens`` tokens). The prefill is dense, decoding is sparse: the same algorithm, the
same code as :class:`asyncspade.engine.Engine`.

Limits:
- padded batches (an ``attention_mask`` with zeros) decode with dense attention: the attention function falls back to
  sdpa whenever the model passes a mask; batches of equal-length prompts are sparse;
- a cache keeps one conversation: ``generate`` continues from what it holds (as with ``DynamicCache``), so call
  ``cache.reset()`` between unrelated prompts, or use ``handle.generate``;
- a forward that does not use the handle's cache runs dense (with a warning), never on the wrong cache;
- greedy search and sampling work; beam search (refused) and assisted decoding (which reorder or crop the cache)
  do not.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import warnings
from collections.abc import Iterator

import torch

from .attention import register
from .config import ConfigError, SparseConfig
from transformers.cache_utils import Cache

from .kvcache import Batch, KVStore
from .methods import method_class
from .runtime import SparseRuntime

HANDLE_ATTR = "_asyncspade_handle"


class DropInCache(Cache):
    """A transformers ``Cache`` backed by a :class:`KVStore`, for ``model.generate``: every forward runs on slots
    ``[0, B)`` with one shared length.

    The batch of a forward is set by a pre-hook on the decoder before any layer runs (so the cross-layer forecast
    hook of layer 0 already sees the current step), a fresh cache starts new selector state, and a batched prefill
    is written one row at a time (the store takes multi-token writes per sequence).
    """

    def __init__(self, store: KVStore):
        super().__init__(layers=[])
        self.store = store
        self.batch: Batch | None = None
        self.rt: SparseRuntime | None = None
        self._len = 0                 # uniform length of every row

    def begin_forward(self, batch_size: int, q_len: int) -> None:
        st = self.store
        if batch_size > st.slots:
            raise ValueError(f"a batch of {batch_size} sequences exceeds max_batch={st.slots} of asyncspade.enable()")
        if self._len + q_len > st.max_tokens:
            raise ValueError(f"{self._len + q_len} tokens exceed max_tokens={st.max_tokens} of asyncspade.enable()")
        if self._len == 0 and self.rt is not None:
            self.rt.begin_sequence(0, batch_size)
        self.batch = Batch(0, batch_size, torch.full((batch_size,), self._len, dtype=torch.int64), q_len)
        if self.rt is not None:
            self.rt.batch = self.batch

    # -- the transformers Cache API used by the models and by generate() --
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        batch = self.batch
        if layer_idx == 0:                 # the step's tokens are in the cache from now on
            self._len = batch.max_len
            self.store.lengths[:batch.size] = self._len
        if batch.q_len > 1 and batch.size > 1:
            for r in range(batch.size):
                row = Batch(r, r + 1, batch.start[r:r + 1], batch.q_len)
                self.store.write(layer_idx, row, key_states[r:r + 1], value_states[r:r + 1])
        else:
            self.store.write(layer_idx, batch, key_states, value_states)
        return self.store.keys(layer_idx, batch), self.store.values(layer_idx, batch)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._len

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._len + query_length, 0

    def get_max_length(self) -> int:
        return self.store.max_tokens

    def __len__(self) -> int:
        return self.store.num_layers

    @property
    def is_initialized(self) -> bool:
        return self._len > 0

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self.store.num_layers

    @property
    def is_linear(self) -> list[bool]:
        return [False] * self.store.num_layers

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * self.store.num_layers

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:    # so generate never plans to roll a step back (its deferred stop check)
        return False

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("asyncspade's cache does not support beam search (num_beams > 1)")

    def reset(self) -> None:
        self._len = 0
        self.store.lengths.zero_()


def cache_keyword(model) -> str:
    """The keyword under which ``model.generate`` / ``model(...)`` take a cache: ``cache`` in current transformers,
    ``past_key_values`` in releases before the rename (read from the model's own signature, not its version)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class SparseHandle:
    """Sparse attention switched on for one model; see the module docstring. Also a context manager."""

    def __init__(self, model, cfg: SparseConfig, max_batch: int, max_tokens: int):
        config = model.config
        self.model = model
        self.previous = config._attn_implementation
        self.cfg = cfg
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dtype = next(model.parameters()).dtype
        self.store = KVStore(config.num_hidden_layers, max_batch, config.num_key_value_heads, max_tokens, head_dim,
                             dtype, self.cfg.page_size, **method_class(self.cfg).store_needs(self.cfg))
        self.cache = DropInCache(self.store)
        model.set_attn_implementation(register())
        # on the decoder, so each forward's batch is set before any layer (and any layer hook) runs
        self._hook = model.model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        self.rt = SparseRuntime(model, self.cfg, self.store, writes_kv=False)
        self.cache.rt = self.rt
        self.cache_keyword = cache_keyword(model)
        self._warned = False

    def _before_forward(self, module, args, kwargs):
        # found by identity, whatever keyword the decoder receives it under (transformers renamed it once already)
        if not any(v is self.cache for v in kwargs.values()):
            # detach the runtime: the attention function then runs plain sdpa on whatever cache this is
            for layer in self.rt.layers:
                layer.self_attn.asyncspade_rt = None
            if not self._warned:
                warnings.warn(f"asyncspade: this forward does not use the sparse cache; attention is dense (pass "
                              f"{self.cache_keyword}=cache to generate, or use handle.generate)", stacklevel=3)
                self._warned = True
            return
        ids = kwargs.get("input_ids")
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is None:
            ids = args[0]
        self.rt.activate()
        self.cache.begin_forward(ids.shape[0], ids.shape[1])

    def generate(self, *args, **kwargs):
        """``model.generate`` with sparse attention on a fresh cache (any cache given is replaced)."""
        self.cache.reset()
        for name in ("cache", "past_key_values"):
            kwargs.pop(name, None)
        kwargs[self.cache_keyword] = self.cache
        return self.model.generate(*args, **kwargs)

    def close(self) -> None:
        """Restore the previous attention implementation and detach everything; idempotent."""
        if self._hook is None:
            return
        self._hook.remove()
        self._hook = None
        self.rt.close()
        for layer in self.rt.layers:          # a forward with a foreign cache may have left a None behind
            if getattr(layer.self_attn, "asyncspade_rt", 0) is None:
                del layer.self_attn.asyncspade_rt
        self.model.set_attn_implementation(self.previous)
        if getattr(self.model, HANDLE_ATTR, None) is self:
            delattr(self.model, HANDLE_ATTR)

    def __enter__(self) -> "SparseHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def enable(model, method: str = "asyncspade", budget: int = 1024, max_batch: int = 1, max_tokens: int | None = None,
           **settings) -> SparseHandle:
    """Switch ``model`` (a Llama/Qwen-style HF causal LM) to sparse attention; returns the handle.

    ``settings`` are other :class:`SparseConfig` fields (sink, recent, predictor, ...; ``**cfg.to_dict()`` works).
    ``max_batch`` x ``max_tokens`` (default: the model's context) sizes the preallocated KV store. Enabling an
    enabled model replaces its previous handle. Raises ``ConfigError`` (a ``ValueError``) for bad settings.
    """
    unknown = set(settings) - {f.name for f in dataclasses.fields(SparseConfig)}
    if unknown:
        raise ConfigError(f"unknown sparse setting(s): {', '.join(sorted(unknown))}")
    if max_batch < 1:
        raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
    cfg = SparseConfig(method=method, budget=budget, **settings).validate(model.config.num_hidden_layers)
    disable(model)
    handle = SparseHandle(model, cfg, max_batch, max_tokens or model.config.max_position_embeddings)
    setattr(model, HANDLE_ATTR, handle)
    return handle


def disable(model) -> None:
    """Undo :func:`enable` (no-op if sparse attention is not on)."""
    handle = getattr(model, HANDLE_ATTR, None)
    if handle is not None:
        handle.close()


@contextlib.contextmanager
def sparse_attention(model, method: str = "asyncspade", budget: int = 1024, **kwargs) -> Iterator[DropInCache]:
    """Sparse attention on ``model`` inside the block; yields the cache to pass to ``generate``
    (under :func:`cache_keyword`: ``cache=``, or ``past_key_values=`` before transformers 5.24).
    Same arguments as :func:`enable`; on exit the model is as before."""
    handle = enable(model, method=method, budget=budget, **kwargs)
    try:
        yield handle.cache
    finally:
        handle.close()
