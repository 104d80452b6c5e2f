"""Prometheus metrics of one server, in its own CollectorRegistry.

A registry per server (not prometheus_client's global one) so several servers can live in one
process (the tests start more than one). Names follow vLLM's (`vllm:` -> `lcjax_`), so existing
dashboards need only the prefix changed. Request timings are observed by the AsyncEngine thread
as outputs arrive; gauges are refreshed from `EngineStats` when /metrics is scraped.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Iterable, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

from lcjax.serve.outputs import EngineStats, RequestOutput

CONTENT_TYPE = CONTENT_TYPE_LATEST
TOKENS_PER_S_WINDOW = 10.0  # seconds of history behind the tokens/s gauge

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                 10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                 1.0, 2.5, 5.0, 10.0)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0)


class ServingMetrics:
    """Counters, gauges and histograms of one server; `observe` is called from the engine thread."""

    def __init__(self, model_name: str = "model"):
        self.registry = CollectorRegistry(auto_describe=True)
        labels, values = ["model_name"], [model_name]

        def make(kind, name, doc, **kw):
            return kind(name, doc, labels, registry=self.registry, **kw).labels(*values)

        self.waiting = make(Gauge, "lcjax_num_requests_waiting", "Requests waiting to be scheduled.")
        self.running = make(Gauge, "lcjax_num_requests_running", "Requests in the running batch.")
        self.kv_usage = make(Gauge, "lcjax_kv_cache_usage_perc", "Fraction of KV-cache pages in use (0-1).")
        self.tokens_per_s = make(Gauge, "lcjax_generation_tokens_per_second",
                                 f"Generated tokens per second over the last {TOKENS_PER_S_WINDOW:g} s.")
        self.prompt_tokens = make(Counter, "lcjax_prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = make(Counter, "lcjax_generation_tokens", "Generated tokens.")
        self.finished = Counter("lcjax_request_success", "Finished requests by finish reason.",
                                ["model_name", "finished_reason"], registry=self.registry)
        self.ttft = make(Histogram, "lcjax_time_to_first_token_seconds",
                         "Arrival to first generated token.", buckets=_TTFT_BUCKETS)
        self.tpot = make(Histogram, "lcjax_time_per_output_token_seconds",
                         "Mean time between generated tokens, per request.", buckets=_TPOT_BUCKETS)
        self.e2e = make(Histogram, "lcjax_e2e_request_latency_seconds",
                        "Arrival to finish.", buckets=_E2E_BUCKETS)
        self.errors = make(Counter, "lcjax_engine_errors", "Engine steps that raised (requests failed).")
        self._model_name = model_name
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def observe(self, outputs: Iterable[RequestOutput], now: Optional[float] = None) -> None:
        """Account one engine step's outputs (times are `time.monotonic()`)."""
        now = time.monotonic() if now is None else now
        new_tokens = 0
        for out in outputs:
            n = len(out.new_token_ids)
            new_tokens += n
            if n and len(out.token_ids) == n and out.first_token_time is not None:
                self.ttft.observe(max(0.0, out.first_token_time - out.arrival_time))
            if out.finished:
                self._observe_finished(out, now)
        if new_tokens:
            self.generation_tokens.inc(new_tokens)
            with self._lock:
                self._recent.append((now, new_tokens))

    def _observe_finished(self, out: RequestOutput, now: float) -> None:
        self.prompt_tokens.inc(out.num_prompt_tokens)
        self.finished.labels(self._model_name, out.finish_reason or "unknown").inc()
        self.e2e.observe(max(0.0, now - out.arrival_time))
        if out.first_token_time is not None and out.num_generated_tokens > 1:
            self.tpot.observe(max(0.0, now - out.first_token_time) / (out.num_generated_tokens - 1))

    def update(self, stats: Optional[EngineStats], now: Optional[float] = None) -> None:
        """Refresh the gauges (called on scrape)."""
        now = time.monotonic() if now is None else now
        if stats is not None:
            self.waiting.set(stats.num_waiting)
            self.running.set(stats.num_running)
            used = stats.total_pages - stats.free_pages
            self.kv_usage.set(used / stats.total_pages if stats.total_pages else 0.0)
        with self._lock:
            while self._recent and self._recent[0][0] < now - TOKENS_PER_S_WINDOW:
                self._recent.popleft()
            tokens = sum(n for _, n in self._recent)
        self.tokens_per_s.set(tokens / TOKENS_PER_S_WINDOW)

    def exposition(self, stats: Optional[EngineStats]) -> bytes:
        """The Prometheus text format of everything, gauges refreshed from `stats`."""
        self.update(stats)
        return generate_latest(self.registry)
