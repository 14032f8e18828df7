"""asyncspade: query-aware sparse attention whose top-k token selection runs ahead of the decode loop."""
from .config import SparseConfig

__all__ = ["LLM", "RequestOutput", "SamplingParams", "SparseConfig", "disable", "enable", "sparse_attention"]


def __getattr__(name):   # keep `import asyncspade` light: torch/transformers load on first use
    if name in ("LLM", "RequestOutput"):
        from . import api
        return getattr(api, name)
    if name == "SamplingParams":
        from .sampling import SamplingParams
        return SamplingParams
    if name in ("enable", "disable", "sparse_attention"):
        from . import hf
        return getattr(hf, name)
    raise AttributeError(name)
