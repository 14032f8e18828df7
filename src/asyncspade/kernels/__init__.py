"""Decode-step kernels: the compiled CPU versions (``decode.c``) and their torch references.

The C file is built once per machine at first use (``gcc -O3 -march=native -fopenmp``, a second or two), cached
under ``$ASYNCSPADE_CACHE/kernels`` by a hash of the source, the compiler and the CPU's flags, and called through
ctypes with raw pointers. It links the libgomp torch already loaded (same soname), so its threads are torch's.
Where it cannot be built (no compiler) or does not apply (tensors on a GPU), every function falls back to its torch
reference in :mod:`.reference` — the same results, at torch's speed; ``backend()`` says which one runs.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import threading

import torch

from . import reference
from ..paths import cache_root

SOURCE = pathlib.Path(__file__).with_name("decode.c")
_P, _I64, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
SIGNATURES = {
    "attend": [_P, _P, _P, _I, _I64, _I64, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _P, _P, _I, _I, _I, _I, _I,
               _F, _I64, _I],
    "score": [_P, _P, _P, _I, _I64, _I64, _I64, _P, _P, _P, _I64, _I64, _I64, _P, _I, _I, _I, _I, _F, _I, _I, _I],
    "topk": [_P, _I64, _I64, _P, _I64, _I64, _I64, _I64, _P, _I64, _I64, _P, _I, _I, _I],
    "ridge_forecast": [_P, _P, _I64, _I, _I, _I, _F, _P, _I],
    "linear_i8": [_P, _I, _P, _P, _P, _I, _I, _I, _I],
    "linear_i4": [_P, _I, _P, _P, _P, _I, _I, _I, _I],
    "dequant_i4": [_P, _P, _P, _I, _I, _I],
    "qkv_post": [_P, _I, _P, _P, _P, _F, _P, _P, _P, _P, _P, _P, _P, _I, _I64, _I64, _I, _I, _I, _I],
    "add_rmsnorm": [_P, _P, _I, _P, _F, _P, _I, _I, _I],
    "silu_mul": [_P, _I, _P, _I, _I, _I],
    "page_append": [_P, _P, _P, _I, _I64, _I64, _I64, _I64, _P, _I, _I, _I, _I],
    "sketch_write": [_P, _I, _I64, _I64, _P, _I64, _I64, _P, _I64, _I64, _I64, _P, _I64, _I, _I, _I, _I],
    "sketch_score": [_P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _P, _I64, _P, _I, _I, _I, _I, _F, _I, _I],
    "drop_seen": [_P, _I64, _P, _I64, _I64, _I, _I],
    "gather_candidates": [_P, _I64, _I64, _I, _P, _P, _P, _P, _I, _I, _I64, _I64, _I, _P, _I],
    "layer_pre": [_P, _P, _P, _I, _P, _P, _P, _F, _P, _P, _P, _P, _P, _P, _P, _I, _I64, _I64, _P, _P, _I64, _I64,
                  _I, _I, _I, _I, _I],
    "layer_post": [_P, _P, _P, _P, _P, _P, _P, _P, _F, _P, _I, _I],
}

RESTYPES = {"gather_candidates": ctypes.c_int64}        # the rest return nothing

# positions per attention work item: fixed, so results do not depend on the thread count (the reduction order
# is the same with 1 or 2 threads, and a server decoding beside its worker returns what a test process gets)
CHUNK = 256

_lib = None
_why_not: str | None = None


def _cpu_flags() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _build(cc: str, flags: list[str], out: pathlib.Path) -> None:
    """Compile and link in two steps: -ffast-math at link time would pull in crtfastmath.o, which switches the
    whole process to flush-denormals-to-zero when the library loads."""
    with tempfile.TemporaryDirectory() as tmp:
        obj = pathlib.Path(tmp) / "decode.o"
        lib = pathlib.Path(tmp) / "decode.so"
        subprocess.run([cc, *flags, "-fPIC", "-c", str(SOURCE), "-o", str(obj)], check=True, capture_output=True)
        subprocess.run([cc, "-shared", "-fopenmp", str(obj), "-o", str(lib), "-lm"], check=True, capture_output=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        part = out.with_suffix(f".{os.getpid()}.tmp")
        shutil.copyfile(lib, part)
        os.replace(part, out)            # atomic: a concurrent process loads a whole file or builds its own


def load():
    """The compiled library, built on first use; None (with the reason in ``why_not()``) when it cannot be."""
    global _lib, _why_not
    if _lib is not None or _why_not is not None:
        return _lib
    if os.environ.get("ASYNCSPADE_KERNELS", "c") == "torch":
        _why_not = "ASYNCSPADE_KERNELS=torch"
        return None
    cc = os.environ.get("CC", "gcc")
    if shutil.which(cc) is None:
        _why_not = f"no C compiler ({cc}) on PATH"
        return None
    cpu = _cpu_flags()
    flags = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-std=c11"]
    if "avx512f" in cpu.split():
        flags.append("-mprefer-vector-width=512")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        _why_not = f"{cc} --version failed ({e})"
        return None
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(flags), cpu, platform.machine()])
                         .encode()).hexdigest()[:16]
    path = cache_root() / "kernels" / f"decode-{key}.so"
    try:
        if not path.is_file():
            _build(cc, flags, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        _why_not = f"building the C kernels failed: {(detail.decode(errors='replace') or str(e)).strip()[:300]}"
        print(f"[asyncspade] warning: {_why_not}; using torch kernels", file=sys.stderr)
        return None
    for name, args in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, RESTYPES.get(name)
    _lib = lib
    return _lib


def why_not() -> str | None:
    return _why_not


def backend(device: torch.device | str = "cpu") -> str:
    """``c`` when the compiled kernels serve tensors on ``device``, else ``torch``."""
    return "c" if torch.device(device).type == "cpu" and not _forced_torch and load() is not None else "torch"


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _bf(t: torch.Tensor) -> int:
    return int(t.dtype == torch.bfloat16)


_C_DTYPES = (torch.float32, torch.bfloat16)


def _use_c(*tensors: torch.Tensor) -> bool:
    """The C kernels serve CPU tensors of fp32/bf16 (anything else, e.g. fp64 in tests, takes the reference).
    Called around every kernel of every layer: kept to attribute reads (microseconds add up over 300 calls a step)."""
    if _forced_torch or not tensors[0].is_cpu or (_lib is None and load() is None):
        return False
    for t in tensors:
        if t.dtype not in _C_DTYPES:
            return False
    return True


_forced_torch = False
_local = threading.local()


def thread_count(n: int | None) -> None:
    """Threads the C kernels called from this thread use (None: torch's intra-op thread count). A selection thread
    beside the decode loop runs its kernels on one."""
    _local.threads = n


def _threads() -> int:
    return getattr(_local, "threads", None) or torch.get_num_threads()


@contextlib.contextmanager
def torch_only():
    """Run the torch references inside the block, whatever is built (tests hold the C kernels to them)."""
    global _forced_torch
    prev, _forced_torch = _forced_torch, True
    try:
        yield
    finally:
        _forced_torch = prev


def _store_strides(k: torch.Tensor) -> tuple[int, int]:
    """(row stride, head stride) in elements of a ``[B, KVH, T, D]`` store view whose rows are contiguous."""
    sb, sh, st, sd = k.stride()
    assert sd == 1 and st == k.shape[-1], "the store's rows must be contiguous"
    return sb, sh


def _positions(idx: torch.Tensor, valid: torch.Tensor | None):
    """Position lists and their mask in the one layout the kernels index: contiguous ``[B, KVH, n]`` each."""
    idx = idx.contiguous()
    return idx, None if valid is None else valid.expand(idx.shape).contiguous()


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, out: torch.Tensor,
           begin: torch.Tensor, end: torch.Tensor, pre: torch.Tensor | None = None, idx: torch.Tensor | None = None,
           valid: torch.Tensor | None = None, use_idx: torch.Tensor | None = None, lim_lo: int = 0,
           lim_hi: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention of ``q [B, KVH, G, D]`` (fp32, contiguous) over the store views ``k, v [B, KVH, T, D]``.

    Row b attends the positions ``[0, pre[b])``, then ``idx[b, h]`` (int64 ``[B, KVH, n]``; entries masked by
    ``valid``, bool, or outside ``[lim_lo, lim_hi[b])``; only rows with ``use_idx[b]`` when given), then
    ``[begin[b], end[b])``. Dense attention is just ``begin, end``; sparse attention is sinks | selection | recent
    window, read in place from the store. Writes ``out [B, KVH, G, D]`` (fp32 or bf16)."""
    b, kvh, g, d = q.shape
    if pre is None:
        pre = torch.zeros_like(begin)
    if not _use_c(q, k, out):
        return out.copy_(reference.attend(q, k, v, scale, begin, end, pre, idx, valid, use_idx, lim_lo, lim_hi))
    sb, sh = _store_strides(k)
    n = ib = ih = 0
    if idx is not None:
        idx, valid = _positions(idx, valid)
        n = idx.shape[-1]
        ib, ih = idx.stride(0), idx.stride(1)
    _lib.attend(_ptr(q), _ptr(k), _ptr(v), _bf(k), sb, sh, _ptr(pre), _ptr(begin), _ptr(end), _ptr(use_idx),
                _ptr(idx), _ptr(valid), n, ib, ih, lim_lo, _ptr(lim_hi), _ptr(out), _bf(out), b, kvh, g, d, scale,
                CHUNK, _threads())
    return out


def score(q: torch.Tensor, k: torch.Tensor, scale: float, lo: int = 0, hi: torch.Tensor | None = None,
          n: int | None = None, idx: torch.Tensor | None = None, valid: torch.Tensor | None = None,
          aggregate: str = "sum", kmax: torch.Tensor | None = None, gathered: bool = False) -> torch.Tensor:
    """Aggregated attention probability ``[B, KVH, n]`` (fp32) of the candidates: positions ``[lo, lo + n)`` masked
    from ``hi[b]`` on, or ``idx [B, KVH, n]`` with ``valid`` (and, given ``hi``, only those in ``[lo, hi[b])``).
    Masked candidates score -1. ``q [B, KVH, G, D]``.
    With ``kmax``, ``k`` and ``kmax`` are page minima and maxima and a page scores Quest's upper bound.
    ``gathered``: ``k [B, KVH, >= n, D]`` holds the candidates' keys in order (row j is position ``idx[..., j]``,
    which only decides the mask): contiguous rows instead of scattered ones."""
    if not _use_c(*(t for t in (q, k, kmax) if t is not None)):
        return reference.score(q, k, scale, lo, hi, n, idx, valid, aggregate, kmax, gathered)
    b, kvh, g, d = q.shape
    sb, sh = _store_strides(k)
    if kmax is not None:
        assert kmax.stride() == k.stride()
    if idx is not None:
        idx, valid = _positions(idx, valid)
        n = idx.shape[-1]
        ib, ih = idx.stride(0), idx.stride(1)
    else:
        ib = ih = 0
    out = torch.empty(b, kvh, n)
    _lib.score(_ptr(q), _ptr(k), _ptr(kmax), _bf(k), sb, sh, lo, _ptr(hi), _ptr(idx), _ptr(valid), n, ib, ih,
               _ptr(out), b, kvh, g, d, scale, int(aggregate == "max"), int(gathered and idx is not None), _threads())
    return out


def topk(scores: torch.Tensor, k: int, idx: torch.Tensor | None = None, lo: int = 0, expand: int = 1,
         hi: torch.Tensor | None = None, gap: int = 0, limit: int = 0) -> torch.Tensor:
    """Positions of the ``k`` best candidates per (row, KV head), ascending: ``[B, KVH, k * expand]`` int64.

    Candidate j of ``scores [B, KVH, n]`` is at ``idx[b, h, j]`` or ``lo + j``; ties go to the lower j. With
    ``expand`` each pick p stands for ``[p * expand, (p + 1) * expand)`` (pages -> tokens). Fewer than k candidates:
    the last pick repeats (callers mask what they cannot use). With ``hi [B]``: positions at or past ``hi[b]`` are
    -1, and ``gap`` more columns follow holding ``hi[b] + j`` capped at ``limit - 1`` (the positions a refreshed
    candidate list reserves for tokens newer than its picks)."""
    if not _use_c(scores):
        return reference.topk(scores, k, idx, lo, expand, hi, gap, limit)
    b, kvh, n = scores.shape
    scores = scores.contiguous()
    if idx is not None:
        idx = idx.contiguous()
    if hi is not None:
        hi = hi.contiguous()
    else:
        assert gap == 0, "the reserved positions follow hi"
    out = torch.empty(b, kvh, k * expand + gap, dtype=torch.int64)
    _lib.topk(_ptr(scores), n, k, _ptr(idx), idx.stride(0) if idx is not None else 0,
              idx.stride(1) if idx is not None else 0, lo, expand, _ptr(hi), gap, limit, _ptr(out), b, kvh,
              _threads())
    return out


def ridge_forecast(w: torch.Tensor, count: torch.Tensor, order: int, ridge: float) -> torch.Tensor | None:
    """AR(``order``) ridge forecast of the next query from windows ``w [B, H, W, D]`` (fp32) with ``count [B]``
    valid newest entries: ``[B, H, D]``; None where the C kernels do not serve (the caller runs torch)."""
    b, h, win, d = w.shape
    if not _use_c(w) or win > 64 or order > 16:
        return None
    w = w.contiguous()
    cnt = count.view(b, 1).expand(b, h).contiguous()
    out = torch.empty(b, h, d)
    _lib.ridge_forecast(_ptr(w), _ptr(cnt), b * h, win, d, order, ridge, _ptr(out), _threads())
    return out


def _linear_q(kernel: str, x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, n: int, k: int, ref) -> torch.Tensor:
    if not _use_c(x) or not w.is_cpu:
        return ref(x, w, s)
    x = x.contiguous()
    out = torch.empty(x.shape[0], n)
    getattr(_lib, kernel)(_ptr(x), _bf(x), _ptr(w), _ptr(s), _ptr(out), x.shape[0], n, k, _threads())
    return out


def _bind(kernel: str, w: torch.Tensor, s: torch.Tensor, n: int, k: int, unbound):
    """``unbound`` with the weight fixed: ``f(x)`` for fp32 ``x [M, K]``, its pointers and checks resolved once (a
    decode step makes ~120 such calls). Falls back to ``unbound`` whenever that would not take C."""
    wp, sp = w.data_ptr(), s.data_ptr()

    def call(x: torch.Tensor) -> torch.Tensor:
        if _forced_torch or _lib is None or not w.is_cpu or not x.is_cpu or x.dtype != torch.float32:
            return unbound(x, w, s)
        x = x.contiguous()
        out = torch.empty(x.shape[0], n)
        getattr(_lib, kernel)(x.data_ptr(), 0, wp, sp, out.data_ptr(), x.shape[0], n, k, _threads())
        return out
    return call


def linear_i8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x [M, K] (fp32/bf16) . (w [N, K] int8 * scale [N] fp32)^T`` -> ``[M, N]`` fp32, in fp32 arithmetic."""
    return _linear_q("linear_i8", x, w, scale, w.shape[0], w.shape[1], reference.linear_i8)


def bind_linear_i8(w: torch.Tensor, scale: torch.Tensor):
    """:func:`linear_i8` with the weight fixed (see :func:`_bind`)."""
    return _bind("linear_i8", w, scale, w.shape[0], w.shape[1], linear_i8)


def linear_i4(x: torch.Tensor, w4: torch.Tensor, sm: torch.Tensor) -> torch.Tensor:
    """``x [M, K] (fp32/bf16) . W^T`` -> ``[M, N]`` fp32 for int4 weights ``w4 [N, K/2]`` uint8 (group g's byte j: column
    32g + j low nibble, 32g + 16 + j high) with ``sm [N, K/32, 2]`` fp16 (scale, min): ``w = q * scale + min``."""
    return _linear_q("linear_i4", x, w4, sm, w4.shape[0], w4.shape[1] * 2, reference.linear_i4)


def bind_linear_i4(w4: torch.Tensor, sm: torch.Tensor):
    """:func:`linear_i4` with the weight fixed (see :func:`_bind`)."""
    return _bind("linear_i4", w4, sm, w4.shape[0], w4.shape[1] * 2, linear_i4)


def dequant_i4(w4: torch.Tensor, sm: torch.Tensor) -> torch.Tensor:
    """The bf16 ``[N, K]`` weight :func:`linear_i4` reads."""
    n, k = w4.shape[0], w4.shape[1] * 2
    if not _use_c(sm) or not w4.is_cpu:
        return reference.dequant_i4(w4, sm)
    out = torch.empty(n, k, dtype=torch.bfloat16)
    _lib.dequant_i4(_ptr(w4.contiguous()), _ptr(sm.contiguous()), _ptr(out), n, k, _threads())
    return out


def qkv_post(qkv: torch.Tensor, bias: torch.Tensor | None, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None,
             eps: float, cos: torch.Tensor, sin: torch.Tensor, slot: torch.Tensor, pos: torch.Tensor,
             k_store: torch.Tensor, v_store: torch.Tensor, heads: int, kv_heads: int, q_out: torch.Tensor) -> None:
    """After the fused QKV projection of N tokens (``qkv [N, (H + 2 KVH) D]``): bias, q/k norm, RoPE (tables
    ``[P, D/2]``); K/V rows written to ``k_store/v_store [slots, KVH, T, D]`` at ``(slot[i], pos[i])``; rotated
    queries to ``q_out [N, H, D]`` (fp32). ``kv_heads=0`` with no stores: queries only (cross-layer forecasts)."""
    if not _use_c(*(t for t in (qkv, q_out, k_store) if t is not None)):
        return reference.qkv_post(qkv, bias, q_norm, k_norm, eps, cos, sin, slot, pos, k_store, v_store, heads,
                                  kv_heads, q_out)
    d = q_out.shape[-1]
    ss, sh = _store_strides(k_store) if k_store is not None else (0, 0)
    _lib.qkv_post(_ptr(qkv), _bf(qkv), _ptr(bias), _ptr(q_norm), _ptr(k_norm), eps, _ptr(cos), _ptr(sin), _ptr(slot),
                  _ptr(pos), _ptr(q_out), _ptr(k_store), _ptr(v_store), 0 if k_store is None else _bf(k_store), ss, sh,
                  qkv.shape[0], heads, kv_heads, d)


def add_rmsnorm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                out: torch.Tensor) -> torch.Tensor:
    """``h += delta`` (in place, fp32 ``[N, C]``), then ``out = rmsnorm(h) * weight`` (fp32 or bf16)."""
    if not _use_c(*(t for t in (h, delta, out) if t is not None)):
        return reference.add_rmsnorm(h, delta, weight, eps, out)
    _lib.add_rmsnorm(_ptr(h), _ptr(delta), 0 if delta is None else _bf(delta), _ptr(weight), eps, _ptr(out), _bf(out),
                     h.shape[0], h.shape[1])
    return out


def silu_mul(gu: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out [N, I] = silu(gate) * up`` of the fused projection ``gu [N, 2I]``."""
    if not _use_c(gu, out):
        return reference.silu_mul(gu, out)
    _lib.silu_mul(_ptr(gu), _bf(gu), _ptr(out), _bf(out), gu.shape[0], out.shape[1])
    return out


def page_append(k: torch.Tensor, pmin: torch.Tensor, pmax: torch.Tensor, start: torch.Tensor, page_size: int) -> None:
    """Quest page bounds after a decode write: row b of ``k [B, KVH, T, D]`` (a layer's slot range) wrote position
    ``start[b]``; its page in ``pmin/pmax [B, KVH, pages, D]`` starts from that key or folds it in (in place)."""
    if not _use_c(k, pmin, pmax):
        return reference.page_append(k, pmin, pmax, start, page_size)
    sb, sh = _store_strides(k)
    pb, ph = _store_strides(pmin)
    assert pmax.stride() == pmin.stride() and pmin.dtype == k.dtype == pmax.dtype
    b, kvh, _, d = k.shape
    start = start.contiguous()
    _lib.page_append(_ptr(k), _ptr(pmin), _ptr(pmax), _bf(k), sb, sh, pb, ph, _ptr(start), b, kvh, d, page_size)


def sketch_write(k: torch.Tensor, ks: torch.Tensor, kq: torch.Tensor, start: torch.Tensor, count: int) -> None:
    """Bring the 4-bit key sketch up to date with positions ``[start[b], start[b] + count)`` of ``k [B, KVH, T, D]``
    (a layer's slot range): ``ks [B, KVH, blocks, 8 D]`` uint8 and ``kq [B, KVH, 2, T]`` fp32 (per token: scale,
    min), in place. The layout is decode.c's (``sketch_token``)."""
    if not _use_c(k, kq):
        return reference.sketch_write(k, ks, kq, start, count)
    sb, sh = _store_strides(k)
    assert ks.stride(3) == 1 and kq.stride(3) == 1 and ks.dtype == torch.uint8
    b, kvh, t, d = k.shape
    start = start.contiguous()
    _lib.sketch_write(_ptr(k), _bf(k), sb, sh, _ptr(ks), ks.stride(0), ks.stride(1), _ptr(kq), kq.stride(0),
                      kq.stride(1), kq.shape[3], _ptr(start), count, b, kvh, d, _threads())


def sketch_score(q: torch.Tensor, ks: torch.Tensor, kq: torch.Tensor, scale: float, lo: int, hi: torch.Tensor,
                 n: int, aggregate: str = "sum") -> torch.Tensor:
    """:func:`score` of positions ``[0, n)`` (masked outside ``[lo, hi[b])``) from the key sketch (see
    :func:`sketch_write`) instead of the keys: ``[B, KVH, n]``. ``q [B, KVH, G, D]`` fp32. ``aggregate="logit"``:
    no softmax, each position's largest scaled score less its query head's maximum (masked: -FLT_MAX), a ranking
    for a few best positions that an exact re-rank follows."""
    if not _use_c(q, kq):
        return reference.sketch_score(q, ks, kq, scale, lo, hi, n, aggregate)
    b, kvh, g, d = q.shape
    q, hi = q.contiguous(), hi.contiguous()
    out = torch.empty(b, kvh, n)
    _lib.sketch_score(_ptr(q), _ptr(ks), _ptr(kq), ks.stride(0), ks.stride(1), kq.stride(0), kq.stride(1),
                      kq.shape[3], lo, _ptr(hi), n, _ptr(out), b, kvh, g, d, scale,
                      {"sum": 0, "max": 1, "logit": 2}[aggregate], _threads())
    return out


def drop_seen(cand: torch.Tensor, extra: torch.Tensor, limit: int) -> torch.Tensor:
    """``extra [B, KVH, m]`` (positions, < 0 for none) with the entries that are among ``cand [B, KVH, n]`` of the same
    row and head set to -1 (in place; positions below ``limit``)."""
    if _forced_torch or not (cand.is_cpu and extra.is_cpu) or (_lib is None and load() is None):
        return reference.drop_seen(cand, extra, limit)
    b, kvh, n = cand.shape
    cand = cand.contiguous()
    assert extra.is_contiguous() and extra.dtype == cand.dtype == torch.int64
    _lib.drop_seen(_ptr(cand), n, _ptr(extra), extra.shape[-1], limit, b, kvh)
    return extra


def gather_candidates(k: torch.Tensor, cand: torch.Tensor, held: torch.Tensor, lengths: torch.Tensor,
                      out: torch.Tensor) -> tuple[int, int]:
    """Keep ``out [B, KVH, W, D]`` holding the keys of the positions ``cand [B, KVH, W]`` (< 0: none) in ``k [B, KVH,
    T, D]``: entries whose ``held`` differs from ``cand`` are copied and ``held`` updated (in place) to the position,
    or to -3 where it is not written yet (>= ``lengths[b]``: copied again next time). Returns the rows copied and how
    many of them are not written yet (0: ``out`` now holds every candidate's key). ``held`` and ``out`` may be
    column slices of wider buffers (``[..., j:j + W]``: another list's columns beside them)."""
    if not _use_c(k, out):
        return reference.gather_candidates(k, cand, held, lengths, out)
    b, kvh, w = cand.shape
    r = held.stride(1)                        # entries per (row, head) of the buffers the slices are cut from
    assert held.stride(0) == kvh * r and held.stride(2) == 1 and out.stride()[:3] == (kvh * r * out.shape[3],
                                                                                      r * out.shape[3], out.shape[3])
    assert out.stride(3) == 1 and out.dtype == k.dtype and k.stride(3) == 1
    sb, sh = _store_strides(k)
    cand, lengths = cand.contiguous(), lengths.contiguous()
    pending = ctypes.c_int64(0)
    copied = _lib.gather_candidates(_ptr(k), sb, sh, k.element_size(), _ptr(cand), _ptr(held), _ptr(lengths),
                                    _ptr(out), b, kvh, w, r, k.shape[3], ctypes.byref(pending), _threads())
    return copied, pending.value


class _Lin(ctypes.Structure):
    """decode.c's ``lin_t``: one projection in a C-kernel format."""
    _fields_ = [("fmt", ctypes.c_int64), ("N", ctypes.c_int64), ("K", ctypes.c_int64), ("w", ctypes.c_void_p),
                ("s", ctypes.c_void_p)]


class LayerGlue:
    """One decode layer's projections and glue as two C calls around attention (:func:`qkv_post` after the QKV
    projection; o-proj, add + RMSNorm, gate/up, SiLU * up, down, add + RMSNorm after attention), for weights in the
    C kernels' formats. ``projections``: (qkv, o, gate_up, down), each ``(fmt, w, s)`` with fmt 4 (:func:`linear_i4`:
    w4, sm) or 8 (:func:`linear_i8`: w, fp32 scale). Each Python -> C call costs microseconds: nine a layer were
    ~0.6 ms of a 4K step on the bundled model."""

    def __init__(self, projections):
        self._keep = projections
        self._lins = [_Lin(fmt, w.shape[0], w.shape[1] * (2 if fmt == 4 else 1), w.data_ptr(), s.data_ptr())
                      for fmt, w, s in projections]
        self._refs = [ctypes.byref(lin) for lin in self._lins]
        self.qkv_width, self.hidden, self.inter = self._lins[0].N, self._lins[1].N, self._lins[3].K

    def scratch(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Work buffers for ``rows`` decode rows: the QKV output, and what :meth:`post` uses."""
        return torch.empty(rows, self.qkv_width), torch.empty(rows * (2 * self.hidden + 3 * self.inter))

    def pre(self, x, qkv_buf, bias, q_norm, k_norm, eps, cos, sin, slot, pos, k_store, v_store, heads, kv_heads,
            q_out, pages=None, page_size=0) -> None:
        """``qkv_post(x @ W_qkv^T, ...)`` (the arguments as :func:`qkv_post`'s); ``x [M, C]`` fp32. ``pages``: the
        layer's page (min, max) ``[slots, KVH, pages, D]`` of ``page_size`` tokens, which the new keys are folded into
        (:func:`page_append`), or None."""
        ss, sh = _store_strides(k_store)
        pmin, pmax = pages if pages is not None else (None, None)
        pss, psh = _store_strides(pmin) if pmin is not None else (0, 0)
        _lib.layer_pre(self._refs[0], x.data_ptr(), qkv_buf.data_ptr(), x.shape[0], _ptr(bias), _ptr(q_norm),
                       _ptr(k_norm), eps, cos.data_ptr(), sin.data_ptr(), slot.data_ptr(), pos.data_ptr(),
                       q_out.data_ptr(), k_store.data_ptr(), v_store.data_ptr(), _bf(k_store), ss, sh, _ptr(pmin),
                       _ptr(pmax), pss, psh, page_size, heads, kv_heads, q_out.shape[-1], _threads())

    def post(self, h, attn, x, w_mlp, w_next, eps, buf) -> None:
        """``h += attn W_o^T; x = rmsnorm(h) w_mlp; h += (silu(g) u)(x) W_down^T; x = rmsnorm(h) w_next`` in place
        (``h, attn, x`` fp32 ``[M, *]``)."""
        _lib.layer_post(self._refs[1], self._refs[2], self._refs[3], h.data_ptr(), attn.data_ptr(), x.data_ptr(),
                        w_mlp.data_ptr(), w_next.data_ptr(), eps, buf.data_ptr(), h.shape[0], _threads())
