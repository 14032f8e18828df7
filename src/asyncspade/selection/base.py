"""The interface every selector offers to the method that feeds it and to the runtime that owns it."""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from ..kvcache import Batch
from .plan import SelectionPlan


class Selector(Protocol):
    """Where the ahead-of-time selections of ``lastq`` / ``asyncspade`` are computed: in-process
    (:class:`~asyncspade.selection.local.SyncSelector`) or by a worker (:mod:`~asyncspade.selection.shm`,
    :mod:`~asyncspade.selection.dist`)."""
    plan: SelectionPlan
    steps: int               # selections handed to the decode loop (remote selectors)
    late: int                # of which were not ready in time
    wait_s: float            # total time the decode loop blocked on a worker
    late_rate: float

    def reset(self, lo: int, hi: int) -> None:
        """A new sequence takes slots ``[lo, hi)``: forget the previous occupant."""

    def on_query(self, layer: int, q: torch.Tensor, batch: Batch) -> None:
        """A sparse layer produced its real queries ``[B, H, L, D]``: the step-ahead pass for the next step."""

    def on_xlayer(self, layer: int, q_x: torch.Tensor, batch: Batch) -> None:
        """The cross-layer forecast ``[B, H, D]`` of ``layer``'s query for this step: the cross-layer pass."""

    def get(self, layer: int, batch: Batch, q_now: torch.Tensor | None = None) -> torch.Tensor:
        """The selection ``[B, KVH, k]`` for ``layer`` at the current step (``q_now``: the true query, for steps no
        ahead-of-time selection exists for)."""

    def generation(self, layer: int, batch: Batch) -> np.ndarray | None:
        """Per row of the batch, a number (>= 0) that changes whenever ``get`` starts returning a new candidate list
        for ``layer`` (the in-line refinement's gathered keys then need no comparison with the list); None where
        unknown."""

    def close(self) -> None:
        """Stop any worker; idempotent."""
