"""Selection methods, one small file each, behind one interface and a registry of names."""
from __future__ import annotations

from ..config import SparseConfig
from .base import Selection, SelectionContext, SelectionMethod
from .full import Full
from .streaming import Streaming
from .oracle import Oracle
from .quest import Quest
from .asyncspade import AsyncSpade
from .lastq import LastQ
from .bound import Bound

REGISTRY: dict[str, type[SelectionMethod]] = {
    m.name: m for m in (Full, Streaming, Oracle, Quest, AsyncSpade, LastQ, Bound)
}


def method_class(cfg: SparseConfig) -> type[SelectionMethod]:
    """The method ``cfg`` names: what it needs (``ahead``, ``needs_pages(cfg)``) is known before one is made."""
    return REGISTRY[cfg.method]


def make_method(cfg: SparseConfig) -> SelectionMethod:
    return method_class(cfg)(cfg)


__all__ = ["REGISTRY", "Selection", "SelectionContext", "SelectionMethod", "make_method", "method_class"]
