"""One dataclass of sparse-attention settings, shared by the engine, the CLI, the server and the evals."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

METHODS = ("full", "oracle", "quest", "asyncspade", "lastq", "streaming")
BENCH_ONLY = ("bound",)      # the zero-cost selection bound: fixed indices, no selection (benchmarks)
PREDICTORS = ("ridge", "xlayer", "hybrid")
RIDGE_KINDS = ("ar", "mean", "linear", "last")
PREFILTERS = ("pages", "sketch", "none")
WEIGHT_FORMATS = ("fp32", "bf16", "int8", "int4")    # the lean forward's weight formats (quant.py)
DEFAULT_WEIGHTS = "int4"      # chosen by speed and fidelity vs fp32 (BENCHMARKS.md §5: faster and closer than int8)
DEFAULT_KV_DTYPE = "bf16"     # the lean forward's KV cache dtype


def sparse_at(length, budget: int, min_sparse: int | None = None):
    """Whether a sparse layer attends sparsely over a cache of ``length`` tokens: only a cache longer than the
    budget, and longer than ``min_sparse`` (the shortest cache at which the cost model finds sparse attention
    cheaper); one that fits attends to everything (exactly dense). Element-wise for a tensor or array of lengths,
    so ``sparse_at(batch.max_len, ...)`` says whether any row of the batch does. The one place this is decided."""
    return length > max(budget, min_sparse or 0)


class ConfigError(ValueError):
    """A bad combination of settings; the message is one line meant for the user."""


@dataclass(frozen=True)
class SparseConfig:
    method: str = "full"
    budget: int = 1024          # tokens attended per (sequence, sparse layer, KV head), sink + recent included
    page_size: int = 16         # Quest page size
    sink: int = 4               # first tokens always attended
    recent: int = 16            # newest tokens always attended (covers the tokens a step-ahead selection cannot see)
    dense_layers: int = 2       # the first layers stay dense
    predictor: str = "ridge"    # asyncspade's query forecaster: ridge (the paper's), xlayer, hybrid
    lead: int = 1               # xlayer/hybrid: forecast layer l from the residual entering layer l-lead
    window: int = 16            # ridge: sliding window of recent queries
    order: int = 4              # ridge: AR order p
    ridge: float = 1e-2         # ridge: regulariser, relative to the mean diagonal of X^T X
    ridge_kind: str = "ar"      # ar (scalar lags, the paper's reconstruction), mean, linear (2q_t - q_{t-1}), last
    superset: int = 4           # refine/hybrid: the ahead pass keeps superset * k candidates ...
    min_candidates: int = 2048  # ... and with refine at least this many (small budgets need more than 4k)
    prefilter: str = "pages"    # step-ahead pass: rank pages by the Quest bound of the forecast query and keep their
                                # tokens (pages: an eighth of the key bytes), score every token from the store's
                                # 4-bit key copy (sketch: a quarter, finer but 6x the time at 32K; BENCHMARKS.md
                                # section 0a), or score every key (none)
    aggregate: str = "sum"      # GQA: sum (or max) of per-head softmax probabilities -> one set per KV head
    refine: bool = True         # ridge/xlayer: the ahead pass proposes candidates and the layer's true query picks
                                # the exact top-k among them in-line (hybrid refines with its cross-layer forecast)
    refresh: int = 4            # with refine: the step-ahead pass runs every `refresh` steps (<= recent); tokens
                                # newer than the candidates are kept as candidates of their own
    check: int = 0              # with refine: tokens the layer's true query adds in-line to the candidates, its
                                # best of the whole cache scored from the key sketch (what no forecast saw coming;
                                # reads the sketch, a quarter of the key bytes, every step)
    min_sparse: int | None = None   # caches up to this length decode densely; None: measured by the cost model
                                    # (costmodel.py) when the runtime starts, 0: sparse from the budget on

    @property
    def sparse(self) -> bool:
        return self.method != "full"

    @property
    def k_mid(self) -> int:
        """Tokens chosen by the method, between the sinks and the recent window."""
        return self.budget - self.sink - self.recent

    def sparse_at(self, length):
        """:func:`sparse_at` with these settings."""
        return sparse_at(length, self.budget, self.min_sparse)

    def validate(self, num_layers: int | None = None) -> "SparseConfig":
        if self.method not in METHODS + BENCH_ONLY:
            raise ConfigError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if self.predictor not in PREDICTORS:
            raise ConfigError(f"unknown predictor {self.predictor!r}; choose one of: {', '.join(PREDICTORS)}")
        if self.ridge_kind not in RIDGE_KINDS:
            raise ConfigError(f"unknown ridge kind {self.ridge_kind!r}; choose one of: {', '.join(RIDGE_KINDS)}")
        if self.aggregate not in ("sum", "max"):
            raise ConfigError("aggregate must be 'sum' or 'max'")
        if self.page_size <= 0:
            raise ConfigError(f"page size must be a positive number of tokens, got {self.page_size}")
        if self.sink < 0 or self.recent < 1:
            raise ConfigError("sink must be >= 0 and recent >= 1 (the newest token is always attended)")
        sparse = self.method != "full"       # dense attention has no budget: the budget checks are for the others
        if sparse and self.budget <= 0:
            raise ConfigError(f"budget must be positive, got {self.budget}")
        if sparse and self.budget <= self.sink + self.recent:
            raise ConfigError(f"budget ({self.budget}) must exceed sink + recent ({self.sink} + {self.recent})")
        if self.method == "quest" and self.k_mid < self.page_size:
            raise ConfigError(f"quest needs budget - sink - recent ({self.k_mid}) >= page size ({self.page_size})")
        if self.method == "quest" and self.budget % self.page_size:
            raise ConfigError(f"quest needs the page size ({self.page_size}) to divide the budget ({self.budget})")
        if self.dense_layers < 0 or (num_layers is not None and self.dense_layers > num_layers):
            raise ConfigError(f"dense_layers must be within 0..{num_layers}")
        if self.lead < 1:
            raise ConfigError("lead must be >= 1 layer")
        if self.window < 2 or not (1 <= self.order < self.window):
            raise ConfigError("ridge needs window >= 2 and 1 <= order < window")
        if self.ridge < 0:
            raise ConfigError("ridge must be >= 0")
        if self.superset < 1 or self.min_candidates < 0:
            raise ConfigError("superset must be >= 1 and min_candidates >= 0")
        if self.prefilter not in PREFILTERS:
            raise ConfigError(f"prefilter must be one of: {', '.join(PREFILTERS)}")
        if self.check < 0:
            raise ConfigError(f"check must be >= 0 tokens, got {self.check}")
        if self.min_sparse is not None and self.min_sparse < 0:
            raise ConfigError(f"min_sparse must be >= 0 (or None: measured), got {self.min_sparse}")
        ahead = self.method in ("asyncspade", "lastq")     # the settings of the step-ahead pass concern them only
        if ahead and not 1 <= self.refresh <= self.recent:
            raise ConfigError(f"refresh must be within 1..recent ({self.recent})")
        # the pass keeps whole pages: only a final top-k taken from them (no refine, no hybrid) needs k >= a page
        final_from_pages = ahead and self.prefilter == "pages" and not self.refine and self.predictor != "hybrid"
        if final_from_pages and self.k_mid < self.page_size:
            raise ConfigError(f"the page prefilter needs budget - sink - recent >= page size ({self.page_size})")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes) -> "SparseConfig":
        return replace(self, **changes)
