"""asyncspade: query-aware sparse attention whose top-k token selection runs ahead of the decode loop."""
from importlib.metadata import PackageNotFoundError, version as _version

from .config import SparseConfig

try:
    __version__ = _version("asyncspade")
except PackageNotFoundError:      # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "SparseConfig", "__version__", "cache_keyword",
           "disable", "enable", "sparse_attention"]


def __getattr__(name):   # keep `import asyncspade` light: torch/transformers load on first use
    if name in ("LLM", "RequestOutput", "CompletionOutput"):
        from . import api
        return getattr(api, name)
    if name == "SamplingParams":
        from .sampling import SamplingParams
        return SamplingParams
    if name in ("enable", "disable", "sparse_attention", "cache_keyword"):
        from . import hf
        return getattr(hf, name)
    raise AttributeError(name)
