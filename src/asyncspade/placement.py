"""Where selection runs: the selector a run gets, and the shared memory the asynchronous one needs.

``--selector auto`` (the default): the cache-rank worker process when the machine has a core to give it beyond the
decode loop's two (three or more usable cores), else in-process selection. On two cores the worker takes one of the
decode loop's cores: the forward's matrix products on one thread cost more than the selection it hides (measured:
BENCHMARKS.md).

The cache-rank worker reads the KV store from shared memory (``/dev/shm``), allocated up front: 46 KB per token and
sequence for the bundled model in fp32, so ~1.5 GB at 4 sequences of 8K tokens, where Docker gives containers 64 MB.
Before allocating, the space is checked; when it is short (or the allocation fails anyway), selection falls back to
the in-process selector with one warning line if the user did not ask for the worker, or fails with one line saying
what to do if they did. Files a failed allocation leaves in ``/dev/shm`` are removed.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import sys

from .arch import head_dim
from .config import DEFAULT_KV_DTYPE, ConfigError

SHM_DIR = "/dev/shm"
SELECTORS = ("auto", "async", "sync", "thread", "dist")
WORKER_CORES = 3                      # usable cores from which auto gives selection a worker process
_HEADROOM = 1.05, 16 * 2**20          # the worker's own buffers (query windows, results) on top of the store


def ahead(cfg) -> bool:
    """Whether ``cfg``'s method selects ahead (a worker can run its selection)."""
    from .methods import method_class
    return method_class(cfg).ahead


def auto_selector(cores: int | None = None) -> str:
    """What ``--selector auto`` means on this machine: ``async`` with a spare core for the worker, else ``sync``."""
    cores = len(os.sched_getaffinity(0)) if cores is None else cores
    return "async" if cores >= WORKER_CORES else "sync"


class SharedMemoryError(ConfigError):
    """Not enough shared memory for the asynchronous selector, which the user asked for by name."""


def free_bytes() -> int | None:
    """Free bytes in ``/dev/shm``, or None where there is no such mount (then allocation decides)."""
    try:
        return shutil.disk_usage(SHM_DIR).free
    except OSError:
        return None


def store_bytes(config, slots: int, max_tokens: int, element_size: int, page_size: int = 16,
                track_pages: bool = False, track_sketch: bool = False) -> int:
    """Bytes of a :class:`~asyncspade.kvcache.KVStore` for ``config`` (K and V, page min/max and the key sketch when
    tracked)."""
    rows = config.num_hidden_layers * slots * config.num_key_value_heads
    per_token = rows * head_dim(config) * element_size
    pages = -(-max_tokens // page_size) if track_pages else 0
    sketch = rows * -(-max_tokens // 16) * 16 * (head_dim(config) // 2 + 8) if track_sketch else 0
    return 2 * per_token * (max_tokens + pages) + sketch + 8 * slots


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def has_room(need: int) -> bool:
    """Whether ``/dev/shm`` can take ``need`` bytes of KV store and the worker's buffers."""
    free = free_bytes()
    return free is None or free >= need * _HEADROOM[0] + _HEADROOM[1]


def choose_selector(requested: str | None, need: int, hint: str = "") -> str:
    """The selector to run: ``requested`` unless it is (or ``auto`` resolves to) the asynchronous worker and
    ``/dev/shm`` lacks ``need`` bytes: then ``sync`` with one warning line (``None``: the worker if it fits; or
    ``auto``), or a :class:`SharedMemoryError` (``requested == "async"``, asked for by name). ``hint`` says what else
    would shrink the need."""
    if requested == "auto":
        requested = None if auto_selector() == "async" else "sync"
    if requested not in (None, "async"):
        return requested
    if has_room(need):
        return "async"
    why = (f"{SHM_DIR} has {_gib(free_bytes())} free but the asynchronous selector needs {_gib(need)} of shared memory "
           "for the KV store")
    more = f"give the container more shared memory (docker run --shm-size=...){hint}"
    if requested == "async":
        raise SharedMemoryError(f"{why}; {more}, or run with --selector sync (in-process selection)")
    warn(f"{why}; selecting in-process instead (--selector sync). For the cache-rank worker, {more}")
    return "sync"


def warn(message: str) -> None:
    print(f"[asyncspade] warning: {message}", file=sys.stderr, flush=True)


def is_allocation_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is torch failing to allocate shared memory (e.g. ``/dev/shm`` full)."""
    text = str(exc)
    return isinstance(exc, (RuntimeError, OSError)) and any(s in text for s in ("shared memory", "No space left",
                                                                              "/torch_"))


@contextlib.contextmanager
def no_leftovers():
    """Remove the ``/dev/shm`` files of this process that appear inside the block if it fails (torch leaves the file
    of an allocation that ran out of space; a file of a successful allocation is unlinked at once)."""
    pattern = os.path.join(SHM_DIR, f"torch_{os.getpid()}_*")
    before = set(glob.glob(pattern))
    try:
        yield
    except BaseException:
        for path in set(glob.glob(pattern)) - before:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise


def build_engine(factory, selector: str | None, cfg, need: int, hint: str = ""):
    """``factory(selector)`` -> an engine, with the selector :func:`choose_selector` allows for a store of ``need``
    (``selector``: a name, ``auto``, or None: the worker if it fits)
    bytes (0: the store exists already, just try); an allocation that fails anyway is retried with ``sync`` (or
    raises :class:`SharedMemoryError` when the asynchronous selector was asked for by name), leaving nothing behind
    in ``/dev/shm``."""
    if selector == "auto":
        selector = None if auto_selector() == "async" else "sync"
    if not ahead(cfg) or selector not in (None, "async"):
        return factory(selector or "sync")
    chosen = choose_selector(selector, need, hint) if need else "async"
    try:
        with no_leftovers():
            return factory(chosen)
    except Exception as e:
        if chosen != "async" or not is_allocation_failure(e):
            raise
        why = f"could not allocate shared memory for the asynchronous selector ({type(e).__name__})"
        if selector == "async":
            raise SharedMemoryError(f"{why}; give the container more shared memory (docker run --shm-size=...)"
                                    f"{hint}, or run with --selector sync") from None
        warn(f"{why}; selecting in-process instead (--selector sync)")
        return factory("sync")


def new_engine(model, tokenizer, cfg, max_batch: int, max_model_len: int | None, selector: str | None,
               on_late: str = "wait", options: dict | None = None):
    """An :class:`~asyncspade.engine.Engine` for ``cfg`` with its own KV store; the asynchronous selector only when
    /dev/shm can hold that store (else in-process with a warning, or an error when ``selector="async"`` was asked
    for by name). ``options``: the engine's formats (weights, kv_dtype, device)."""
    from .engine import Engine, kv_store_dtype
    from .methods import method_class
    options = options or {}
    length = max_model_len or model.config.max_position_embeddings
    element = kv_store_dtype(model, options.get("kv_dtype", DEFAULT_KV_DTYPE)).itemsize
    need = store_bytes(model.config, max_batch, length, element, cfg.page_size, **method_class(cfg).store_needs(cfg))
    return build_engine(lambda sel: Engine(model, tokenizer, cfg, max_batch=max_batch, max_tokens=max_model_len,
                                           selector=sel, on_late=on_late, **options),
                        selector, cfg, need, ", or lower --max-model-len / max_model_len")
