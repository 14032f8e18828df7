"""On-disk cache of the lean forward's quantized projections, next to the converted models under
``$ASYNCSPADE_CACHE/lean``: one safetensors file per (checkpoint, weight format), keyed by the checkpoint's files
(path, sizes, modification times), the format and torch's version (its int4 packing is version-specific)."""
from __future__ import annotations

import hashlib
import os
import pathlib
import sys

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .paths import cache_root

CACHED_FORMATS = ("int8", "int4")     # the float formats convert in well under a second: nothing to gain
VERSION = 5          # the cached tensors' layout and rounding (2: the LM head int8 in every quantized format;
                     # 3: int8 quantized with its bf16-rounded scale; 4: int4 in asyncspade's own layout; 5: int4
                     # scales in fp16)


def path_for(model, weights: str) -> pathlib.Path | None:
    """Where ``model``'s ``weights``-format projections are cached; None when it was not loaded from a directory
    of safetensors files (e.g. a model built in memory) or the format is not cached."""
    if weights not in CACHED_FORMATS:
        return None
    src = pathlib.Path(str(getattr(model.config, "_name_or_path", "") or ""))
    if not src.is_dir():
        return None
    files = sorted(src.glob("*.safetensors"))
    if not files:
        return None
    ident = [str(src.resolve()), weights, torch.__version__, str(VERSION)]
    ident += [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    key = hashlib.sha256("|".join(ident).encode()).hexdigest()[:16]
    return cache_root() / "lean" / f"{src.name}-{weights}-{key}.safetensors"


def load(path: pathlib.Path) -> dict[str, torch.Tensor] | None:
    if not path.is_file():
        return None
    try:
        # cloned: tensors read by safetensors need not be 64-byte aligned, and torch's int8 kernel crashes on such
        return {k: v.clone() for k, v in load_file(path).items()}
    except (OSError, SafetensorError):        # a damaged file: convert again (and overwrite it)
        return None


def save(path: pathlib.Path, state: dict[str, torch.Tensor]) -> None:
    part = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, part)
        os.replace(part, path)
    except OSError as e:
        print(f"[asyncspade] warning: could not write the quantized-weight cache {path} ({e}); it is rebuilt at "
              f"every load", file=sys.stderr)
        part.unlink(missing_ok=True)
