"""Where asyncspade keeps what it builds once per machine (converted models, quantized weights, compiled kernels)."""
from __future__ import annotations

import os
import pathlib

CACHE_ENV = "ASYNCSPADE_CACHE"


def cache_root() -> pathlib.Path:
    """``$ASYNCSPADE_CACHE``, default ``~/.cache/asyncspade``."""
    env = os.environ.get(CACHE_ENV)
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "asyncspade"
