"""/metrics of the real HTTP server under vLLM's metric names, with gauges that stay current
while an engine step runs (the engine thread is busy and cannot refresh them)."""

import re
import threading
import time

import httpx

from lcjax.serve.metrics import ServingMetrics
from lcjax.serve.outputs import EngineStats
from tests.serve.test_api import IGNORE_EOS, metric, patched_step, wait_idle


def _names(text):
    return {m.group(1) for m in re.finditer(r"^([a-zA-Z_:][\w:]*)(?:\{| )", text, re.M)}


def test_vllm_metric_names(served):
    out = served.client().completions.create(model=served.model, prompt="metrics", max_tokens=3,
                                             extra_body=IGNORE_EOS)
    assert out.usage.completion_tokens == 3
    wait_idle(served)
    text = httpx.get(served.url + "/metrics", timeout=10).text
    names = _names(text)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:time_to_first_token_seconds_count",
                 "vllm:time_per_output_token_seconds_count", "vllm:inter_token_latency_seconds_count",
                 "vllm:e2e_request_latency_seconds_count", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:request_success_total",
                 "vllm:request_prompt_tokens_count", "vllm:request_generation_tokens_count",
                 "vllm:spec_decode_num_accepted_tokens_total", "vllm:spec_decode_num_draft_tokens_total",
                 "vllm:avg_generation_throughput_toks_per_s", "vllm:num_preemptions_total"):
        assert name in names, name
        assert metric(served, name) >= 0  # carries model_name="<served name>"
    assert {n for n in names if n.startswith("lcjax_")} <= {
        "lcjax_engine_errors_total", "lcjax_engine_errors_created", "lcjax_compiled_step_shapes"}
    assert metric(served, "vllm:request_success_total", finished_reason="length") >= 1
    assert metric(served, "vllm:time_to_first_token_seconds_count") >= 1
    assert metric(served, "vllm:time_per_output_token_seconds_count") >= 2  # 3 tokens, 2 gaps
    assert metric(served, "vllm:prompt_tokens_total") >= len("metrics")
    assert metric(served, "vllm:num_requests_running") == 0


def test_gauges_are_current_while_a_step_runs(served):
    """Requests sent while the engine thread is inside a step count as waiting at once."""
    entered, release = threading.Event(), threading.Event()

    def blocking(step):
        def fn():
            entered.set()
            release.wait(60)
            return step()
        return fn

    def complete():
        served.client().completions.create(model=served.model, prompt="wait", max_tokens=2,
                                           extra_body=IGNORE_EOS)

    threads = []
    try:
        with patched_step(served, blocking):
            threads.append(threading.Thread(target=complete))
            threads[0].start()
            assert entered.wait(60)
            for _ in range(3):  # arrive while the step is blocked
                threads.append(threading.Thread(target=complete))
                threads[-1].start()
            deadline = time.monotonic() + 30
            while metric(served, "vllm:num_requests_waiting") < 4:
                assert time.monotonic() < deadline, httpx.get(served.url + "/metrics").text
                time.sleep(0.05)
            assert metric(served, "vllm:num_requests_waiting") == 4
            release.set()
    finally:
        release.set()
        for t in threads:
            t.join(60)
    wait_idle(served)
    assert metric(served, "vllm:num_requests_waiting") == 0


def test_spec_decode_counters_follow_engine_totals():
    metrics = ServingMetrics("m")
    base = dict(num_waiting=0, num_running=1, free_pages=3, total_pages=4, num_compilations=5,
                generated_tokens_total=0, prompt_tokens_total=7)
    metrics.update(EngineStats(**base, draft_tokens_total=10, accepted_tokens_total=4,
                               spec_rounds_total=5))
    metrics.update(EngineStats(**base, draft_tokens_total=12, accepted_tokens_total=5,
                               spec_rounds_total=6))
    text = metrics.exposition(None).decode()

    def value(name):
        return float(re.search(rf'^{name}\{{model_name="m"\}} (\S+)$', text, re.M).group(1))

    assert value("vllm:spec_decode_num_draft_tokens_total") == 12
    assert value("vllm:spec_decode_num_accepted_tokens_total") == 5
    assert value("vllm:spec_decode_num_drafts_total") == 6
    assert value("vllm:spec_decode_num_emitted_tokens_total") == 11
    assert abs(value("vllm:spec_decode_draft_acceptance_rate") - 5 / 12) < 1e-9
    assert value("vllm:prompt_tokens_total") == 7  # a total seen twice counts once
    assert value("vllm:gpu_cache_usage_perc") == 0.25
    assert value("lcjax_compiled_step_shapes") == 5
