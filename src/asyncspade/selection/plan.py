"""What the ahead-of-time selection of ``lastq`` / ``asyncspade`` does, derived once from the settings."""
from __future__ import annotations

import functools
from dataclasses import dataclass

from ..config import SparseConfig


@dataclass(frozen=True)
class SelectionPlan:
    """The passes an ahead-of-time selection runs and the widths they keep. Everything that follows from the
    forecaster (``cfg.predictor``), the page prefilter and the store size is decided here and nowhere else; the
    selectors (in-process, worker, cache rank) and the method read it."""
    cfg: SparseConfig
    temporal: bool          # a step-ahead pass after each sparse layer's attention: ridge forecast of the next query
    xlayer: bool            # a cross-layer pass when the residual enters layer l - lead; it makes the final selection
    prefilter: str          # how the step-ahead pass proposes tokens without reading every key: "sketch" (every
                            # token scored from the store's 4-bit key copy), "pages" (whole pages by their Quest
                            # bound), or "none" (every key scored exactly)
    ahead_width: int        # entries the step-ahead pass keeps per (slot, layer, KV head)
    prefilter_tokens: int   # tokens the prefilter keeps (0 without one)
    refine: bool            # the final ahead pass proposes candidates; the layer's true query picks k in-line
    refresh: int            # steps between step-ahead passes (refine only)

    @property
    def hybrid(self) -> bool:
        """The step-ahead pass proposes a superset; the cross-layer query picks the top-k inside it."""
        return self.temporal and self.xlayer

    @property
    def result_width(self) -> int:
        """Entries per (row, KV head) of the selection the decode loop takes (the final pass's output)."""
        if self.refine:
            return self.ahead_width
        return self.cfg.k_mid if self.xlayer else self.ahead_width

    @property
    def gap(self) -> int:
        """Positions after the candidates' newest that a refreshed-every-``refresh``-steps candidate list reserves:
        tokens that arrive between two passes and have left the recent window before the next."""
        return self.refresh - 1

    def ahead_is_final(self, max_len: int) -> bool:
        """Whether the step-ahead pass run when the longest row's cache holds ``max_len`` tokens makes the selection
        the decode loop takes at the next step: no cross-layer pass follows, and that step is sparse for some row
        (otherwise the pass only keeps the query window)."""
        return not self.xlayer and self.cfg.sparse_at(max_len + 1)

    @classmethod
    @functools.cache
    def of(cls, cfg: SparseConfig, max_tokens: int) -> "SelectionPlan":
        """The plan for settings ``cfg`` over a store of ``max_tokens`` positions per slot (one object per
        process for equal arguments: every selector of one runtime shares it)."""
        temporal = cfg.predictor in ("ridge", "hybrid")
        xlayer = cfg.predictor in ("xlayer", "hybrid")
        hybrid = temporal and xlayer
        pages = cfg.prefilter == "pages"
        prefilter = cfg.prefilter != "none"
        refine = cfg.refine and not hybrid      # hybrid refines with the cross-layer forecast instead
        superset = hybrid or refine             # the ahead pass keeps superset * k candidates, not the final k
        width = cfg.superset * cfg.k_mid if superset else cfg.k_mid
        if refine:
            width = max(width, cfg.min_candidates)
        width = min(width, max_tokens - cfg.sink)
        if pages and superset:
            width = max(cfg.page_size, width - width % cfg.page_size)          # whole pages
        # the prefilter's tokens are the candidates (a superset), or superset * k tokens to rank exactly (ridge)
        tokens = (width if superset else max(width, cfg.superset * cfg.k_mid)) if prefilter else 0
        refresh = cfg.refresh if refine else 1          # without refine the step-ahead pass is the selection
        return cls(cfg, temporal, xlayer, cfg.prefilter, width + refresh - 1, tokens, refine, refresh)
