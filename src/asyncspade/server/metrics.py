"""Counters and histograms for ``GET /metrics`` (Prometheus text format), shared by the request handlers and the
engine thread (hence the lock)."""
from __future__ import annotations

import threading

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}",
                      f"{name}_count {self.count}"]


def _head(name: str, kind: str, help_: str) -> list[str]:
    return [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.tokens = 0
        self.ttft, self.tpot = Histogram(TTFT_BUCKETS), Histogram(TPOT_BUCKETS)

    def request(self, path: str, status: int) -> None:
        key = ("/v1/models" if path.startswith("/v1/models/") else path if path in ROUTES else "other", status)
        with self.lock:
            self.requests[key] = self.requests.get(key, 0) + 1

    def generated(self, n: int) -> None:
        with self.lock:
            self.tokens += n

    def finished(self, ttft_s: float, tpot_s: float | None) -> None:
        with self.lock:
            self.ttft.observe(ttft_s)
            if tpot_s is not None:
                self.tpot.observe(tpot_s)

    def render(self, active: int, queued: int, slots: int, engines: list[dict]) -> str:
        """``engines``: one dict per engine with ``method``, ``budget``, ``late_rate`` and ``degraded``."""
        with self.lock:
            out = _head("asyncspade_requests_total", "counter", "HTTP requests by endpoint and status code.")
            out += [f'asyncspade_requests_total{{endpoint="{p}",status="{s}"}} {n}'
                    for (p, s), n in sorted(self.requests.items())]
            out += _head("asyncspade_active_sequences", "gauge", "Sequences holding a decode slot.")
            out += [f"asyncspade_active_sequences {active}"]
            out += _head("asyncspade_queued_sequences", "gauge", "Sequences waiting for a decode slot.")
            out += [f"asyncspade_queued_sequences {queued}"]
            out += _head("asyncspade_decode_slots", "gauge", "Decode slots of the server (--max-batch), shared by "
                         "all engines.")
            out += [f"asyncspade_decode_slots {slots}"]
            out += _head("asyncspade_generated_tokens_total", "counter", "Tokens generated.")
            out += [f"asyncspade_generated_tokens_total {self.tokens}"]
            out += _head("asyncspade_time_to_first_token_seconds", "histogram", "Time to first token per sequence.")
            out += self.ttft.lines("asyncspade_time_to_first_token_seconds")
            out += _head("asyncspade_time_per_output_token_seconds", "histogram", "Mean time per output token "
                         "after the first, per sequence.")
            out += self.tpot.lines("asyncspade_time_per_output_token_seconds")
        out += _head("asyncspade_engines", "gauge", "Engines alive (one per sparse configuration in use).")
        out += [f"asyncspade_engines {len(engines)}"]
        out += _head("asyncspade_selector_late_rate", "gauge", "Share of selections not ready when the decode loop "
                     "needed them, per engine (0 without an asynchronous selector).")
        out += [f'asyncspade_selector_late_rate{{method="{e["method"]}",budget="{e["budget"]}"}} {e["late_rate"]}'
                for e in engines]
        out += _head("asyncspade_selector_degraded", "gauge", "1 when the engine's cache-rank worker is gone and "
                     "selection runs in-process (slower), per engine.")
        out += [f'asyncspade_selector_degraded{{method="{e["method"]}",budget="{e["budget"]}"}} '
                f'{int(e["degraded"])}' for e in engines]
        return "\n".join(out) + "\n"
