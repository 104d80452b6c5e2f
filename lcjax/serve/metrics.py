"""Prometheus metrics of one server under vLLM's names, in its own CollectorRegistry.

Every metric carries a `model_name` label and is named as vLLM names it (`vllm:*`, v0 and v1
names where they differ), so Grafana dashboards built for vLLM work unchanged. Two `lcjax_*`
metrics add what vLLM has no name for: engine step failures and compiled step shapes.

A registry per server (not prometheus_client's global one) so several servers can live in one
process (the tests start more than one). Request timings are observed by the AsyncEngine thread
as outputs arrive; gauges and the engine-wide counters are refreshed from `EngineStats` when
/metrics is scraped. `AsyncEngine.stats()` counts requests sent but not yet taken by the engine
thread as waiting, so the gauges stay current while a step runs.
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
THROUGHPUT_WINDOW = 10.0  # seconds of history behind the throughput gauges

# vLLM's buckets.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000,
                  100000)


class ServingMetrics:
    """Counters, gauges and histograms of one server; `observe` is called from the engine thread."""

    def __init__(self, model_name: str = "model"):
        self.registry = CollectorRegistry(auto_describe=True)
        labels, values = ["model_name"], [model_name]

        def make(kind, name, doc, **kw):
            return kind(name, doc, labels, registry=self.registry, **kw).labels(*values)

        self.running = make(Gauge, "vllm:num_requests_running", "Requests in the running batch.")
        self.waiting = make(Gauge, "vllm:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = [make(Gauge, name, "KV-cache usage: fraction of pages in use (0-1).")
                         for name in ("vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc")]
        self.preemptions = make(Counter, "vllm:num_preemptions",
                                "Preemptions (always 0: pages are reserved at admission).")
        self.prompt_tokens = make(Counter, "vllm:prompt_tokens", "Prefilled prompt tokens.")
        self.generation_tokens = make(Counter, "vllm:generation_tokens", "Generated tokens.")
        self.prompt_throughput = make(Gauge, "vllm:avg_prompt_throughput_toks_per_s",
                                      f"Prompt tokens per second over the last {THROUGHPUT_WINDOW:g} s.")
        self.generation_throughput = make(
            Gauge, "vllm:avg_generation_throughput_toks_per_s",
            f"Generated tokens per second over the last {THROUGHPUT_WINDOW:g} s.")
        self.finished = Counter("vllm:request_success", "Finished requests by finish reason.",
                                ["model_name", "finished_reason"], registry=self.registry)
        self.ttft = make(Histogram, "vllm:time_to_first_token_seconds",
                         "Arrival to first generated token.", buckets=_TTFT_BUCKETS)
        self.tpot = [make(Histogram, name, "Time between generated tokens (per token; tokens "
                                           "of one speculative round share its interval).",
                          buckets=_TPOT_BUCKETS)
                     for name in ("vllm:time_per_output_token_seconds",
                                  "vllm:inter_token_latency_seconds")]
        self.e2e = make(Histogram, "vllm:e2e_request_latency_seconds", "Arrival to finish.",
                        buckets=_E2E_BUCKETS)
        self.request_prompt = make(Histogram, "vllm:request_prompt_tokens",
                                   "Prompt tokens per finished request.", buckets=_TOKEN_BUCKETS)
        self.request_generation = make(Histogram, "vllm:request_generation_tokens",
                                       "Generated tokens per finished request.",
                                       buckets=_TOKEN_BUCKETS)
        self.spec_drafts = make(Counter, "vllm:spec_decode_num_drafts",
                                "Speculative rounds (one per request per round).")
        self.spec_draft_tokens = make(Counter, "vllm:spec_decode_num_draft_tokens",
                                      "Draft tokens proposed.")
        self.spec_accepted = make(Counter, "vllm:spec_decode_num_accepted_tokens",
                                  "Draft tokens accepted.")
        self.spec_emitted = make(Counter, "vllm:spec_decode_num_emitted_tokens",
                                 "Tokens emitted by speculative rounds (accepted + one per round).")
        self.spec_rate = make(Gauge, "vllm:spec_decode_draft_acceptance_rate",
                              "Accepted / proposed draft tokens since start.")
        self.errors = make(Counter, "lcjax_engine_errors", "Engine steps that raised (requests failed).")
        self.compilations = make(Gauge, "lcjax_compiled_step_shapes",
                                 "Step shapes compiled so far (constant after warm-up).")
        self._model_name = model_name
        self._last_token: dict[str, float] = {}  # request id -> time of its latest token
        self._recent: collections.deque[tuple[float, int, int]] = collections.deque()
        self._seen = dict(prompt=0, rounds=0, draft=0, accepted=0)
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
            last = self._last_token.get(out.request_id)
            if n and last is not None:
                for hist in self.tpot:
                    for _ in range(n):
                        hist.observe(max(0.0, now - last) / n)
            if n:
                self._last_token[out.request_id] = now
            if out.finished:
                self._last_token.pop(out.request_id, None)
                self._observe_finished(out, now)
        if new_tokens:
            self.generation_tokens.inc(new_tokens)
            with self._lock:
                self._recent.append((now, 0, new_tokens))

    def _observe_finished(self, out: RequestOutput, now: float) -> None:
        self.finished.labels(self._model_name, out.finish_reason or "unknown").inc()
        self.e2e.observe(max(0.0, now - out.arrival_time))
        self.request_prompt.observe(out.num_prompt_tokens)
        self.request_generation.observe(out.num_generated_tokens)

    def update(self, stats: Optional[EngineStats], now: Optional[float] = None) -> None:
        """Refresh the gauges and engine-wide counters (called on scrape)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if stats is not None:
                self.waiting.set(stats.num_waiting)
                self.running.set(stats.num_running)
                used = stats.total_pages - stats.free_pages
                for gauge in self.kv_usage:
                    gauge.set(used / stats.total_pages if stats.total_pages else 0.0)
                self.compilations.set(stats.num_compilations)
                self._advance(stats, now)
            while self._recent and self._recent[0][0] < now - THROUGHPUT_WINDOW:
                self._recent.popleft()
            prompt = sum(p for _, p, _ in self._recent)
            generated = sum(g for _, _, g in self._recent)
        self.prompt_throughput.set(prompt / THROUGHPUT_WINDOW)
        self.generation_throughput.set(generated / THROUGHPUT_WINDOW)

    def _advance(self, stats: EngineStats, now: float) -> None:
        """Counters that the engine keeps as totals: add what is new since the last scrape."""
        totals = dict(prompt=stats.prompt_tokens_total, rounds=stats.spec_rounds_total,
                      draft=stats.draft_tokens_total, accepted=stats.accepted_tokens_total)
        delta = {k: max(0, v - self._seen[k]) for k, v in totals.items()}
        self._seen = totals
        self.prompt_tokens.inc(delta["prompt"])
        if delta["prompt"]:
            self._recent.append((now, delta["prompt"], 0))
        self.spec_drafts.inc(delta["rounds"])
        self.spec_draft_tokens.inc(delta["draft"])
        self.spec_accepted.inc(delta["accepted"])
        self.spec_emitted.inc(delta["accepted"] + delta["rounds"])
        if totals["draft"]:
            self.spec_rate.set(totals["accepted"] / totals["draft"])

    def exposition(self, stats: Optional[EngineStats]) -> bytes:
        """The Prometheus text format of everything, gauges refreshed from `stats`."""
        self.update(stats)
        return generate_latest(self.registry)
