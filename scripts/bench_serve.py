"""Serving benchmark: a fixed synthetic workload replayed against an OpenAI-compatible server.

    python scripts/bench_serve.py --launch --smoke            # starts the server itself (CPU, ~1 min)
    python scripts/bench_serve.py --base-url http://127.0.0.1:8000/v1 --num-prompts 200
    python scripts/bench_serve.py --launch -- --config small --max-num-seqs 16   # server flags after --

Like `vllm bench serve` with its random dataset: N streaming /v1/completions requests whose
prompts are random token ids (`prompt` as a token list, so input lengths are exact) and whose
output lengths are exact too (`ignore_eos`, sent through `extra_body`); lengths are drawn
uniformly from [len * (1 - r), len * (1 + r)] with a seeded generator, so every run replays the
same workload. Requests arrive as a Poisson process (`--request-rate`, default inf = all at
once), at most `--max-concurrency` in flight. Per request: TTFT (first streamed chunk), TPOT
((latency - TTFT) / (output tokens - 1)), ITL (gaps between chunks) and end-to-end latency.
Prints vLLM's result table and writes `--json`.

The server compiles every step shape before its ready line, so no warm-up is needed; untimed
warm-up bursts of up to `--num-warmups` simultaneous requests (the workload's own prompts, at
most 8 output tokens; see `warmup_sizes`) still run first by default, for servers started with
`--no-warmup`.

`--mixed` rotates the requests through the kinds real traffic sends (see `MIXED_KINDS`): plain,
n = 2-4, logprobs 0-20, stop strings, penalties, and chat requests with `response_format`
json_object and with `tools` (tool_choice "required"); kinds that may stop early are not held to
their output length. It runs no warm-up bursts and reports the server's compiled step shapes
(`lcjax_compiled_step_shapes` on /metrics) before and after the run: a server that compiled
every shape before ready shows 0 new compilations.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Optional, Sequence

import numpy as np

READY = "lcjax.serve: ready"
SERVING = re.compile(r"lcjax\.serve: serving (?P<model>\S+) at (?P<url>\S+)")


# ------------------------------------------------------------------------------ workload
MIXED_KINDS = ("plain", "n", "logprobs", "stop", "penalties", "json", "tools")
CHAT_MAX_TOKENS = 32  # the json and tools kinds' max_tokens at most


@dataclasses.dataclass(frozen=True)
class Request:
    prompt: list[int]
    output_len: int
    arrival: float  # seconds after the start
    kind: str = "plain"  # one of MIXED_KINDS
    option: int = 0  # n for "n", top logprobs for "logprobs"


def lengths(rng: np.random.Generator, mean: int, ratio: float, n: int) -> np.ndarray:
    low, high = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return rng.integers(low, high + 1, size=n)


def workload(num: int, input_len: int, output_len: int, range_ratio: float, token_range: Sequence[int],
             request_rate: float, seed: int, mixed: bool = False) -> list[Request]:
    """The same requests for the same arguments; arrivals come from their own stream, so the
    request rate changes only the timing. mixed: request i has kind MIXED_KINDS[i % 7]."""
    rng = np.random.default_rng(seed)
    ins = lengths(rng, input_len, range_ratio, num)
    outs = lengths(rng, output_len, range_ratio, num)
    prompts = [rng.integers(token_range[0], token_range[1], size=int(n)).tolist() for n in ins]
    if request_rate == float("inf"):
        arrivals = np.zeros(num)
    else:
        gaps = np.random.default_rng([seed, 1]).exponential(1.0 / request_rate, size=num)
        arrivals = np.cumsum(gaps) - gaps[0]
    reqs = [Request(p, int(o), float(a)) for p, o, a in zip(prompts, outs, arrivals)]
    if mixed:
        options = np.random.default_rng([seed, 2]).integers(0, 21, size=num)
        reqs = [dataclasses.replace(r, kind=MIXED_KINDS[i % len(MIXED_KINDS)],
                                    option=int(2 + o % 3) if i % len(MIXED_KINDS) == 1 else int(o))
                for i, (r, o) in enumerate(zip(reqs, options))]
    return reqs


def _text(prompt: list[int]) -> str:
    return " ".join("".join(chr(97 + t % 26) for t in prompt[i: i + 5]) for i in range(0, len(prompt), 5))


_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


def request_call(client, model: str, req: Request, temperature: float):
    """(create coroutine, exact): the streaming call for `req`'s kind; exact = the server must
    return exactly req.output_len tokens per choice (kinds that may stop early are not)."""
    common = dict(model=model, max_tokens=req.output_len, temperature=temperature, stream=True,
                  stream_options={"include_usage": True})
    ignore = {"ignore_eos": True}
    if req.kind in ("json", "tools"):
        # A short message and at most CHAT_MAX_TOKENS: the chat template and the tool schema
        # add ~200 tokens of their own (the byte-level tiny tokenizer).
        common["max_tokens"] = min(req.output_len, CHAT_MAX_TOKENS)
        chat = dict(messages=[{"role": "user", "content": _text(req.prompt[:8])}], **common)
        if req.kind == "json":
            chat["response_format"] = {"type": "json_object"}
        else:
            chat.update(tools=[_TOOL], tool_choice="required")
        return client.chat.completions.create(**chat), False
    kw = dict(prompt=req.prompt, **common)
    if req.kind == "n":
        kw.update(n=req.option, temperature=max(temperature, 0.8), seed=req.option)
    elif req.kind == "logprobs":
        kw.update(logprobs=req.option)
    elif req.kind == "stop":
        return client.completions.create(stop=["a", "xy"], extra_body=ignore, **kw), False
    elif req.kind == "penalties":
        kw.update(presence_penalty=1.0, frequency_penalty=0.5, extra_body={**ignore,
                                                                         "repetition_penalty": 1.2})
        return client.completions.create(**kw), True
    return client.completions.create(extra_body=ignore, **kw), True


def _has_output(choice) -> bool:
    """A streamed choice that carries generated output (not just the opening role delta)."""
    if hasattr(choice, "text"):
        return bool(choice.text) or choice.finish_reason is not None
    d = choice.delta
    return bool(d.content or d.tool_calls or getattr(d, "reasoning_content", None)
                or choice.finish_reason is not None)


# ------------------------------------------------------------------------------ client
@dataclasses.dataclass
class Result:
    prompt_len: int
    output_len: int = 0  # tokens the server reports (usage.completion_tokens)
    ttft: float = 0.0
    latency: float = 0.0
    itl: list = dataclasses.field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> Optional[float]:
        return (self.latency - self.ttft) / (self.output_len - 1) if self.output_len > 1 else None


async def one_request(client, model: str, req: Request, temperature: float) -> Result:
    result = Result(prompt_len=len(req.prompt))
    start = last = time.perf_counter()
    try:
        call, exact = request_call(client, model, req, temperature)
        stream = await call
        async for chunk in stream:
            now = time.perf_counter()
            # one chunk per engine step that advanced this request (per choice when n > 1)
            if chunk.choices and any(_has_output(c) for c in chunk.choices):
                if not result.ttft:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
            if chunk.usage is not None:
                result.output_len = chunk.usage.completion_tokens
        result.latency = time.perf_counter() - start
        want = req.output_len * (req.option if req.kind == "n" else 1)
        if exact and result.output_len != want:
            result.error = f"{req.kind}: got {result.output_len} tokens, asked for {want}"
    except Exception as err:  # noqa: BLE001 - a failed request is counted, not fatal
        result.error = f"{type(err).__name__}: {err}"
    return result


async def replay(client, model: str, requests: list[Request], max_concurrency: Optional[int],
                 temperature: float) -> tuple[list[Result], float]:
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    start = time.perf_counter()

    async def run(req: Request) -> Result:
        delay = req.arrival - (time.perf_counter() - start)
        if delay > 0:
            await asyncio.sleep(delay)
        if gate is None:
            return await one_request(client, model, req, temperature)
        async with gate:
            return await one_request(client, model, req, temperature)

    results = await asyncio.gather(*(run(r) for r in requests))
    return list(results), time.perf_counter() - start


def summarize(results: list[Result], duration: float) -> dict:
    ok = [r for r in results if not r.error]
    ms = lambda xs: [1000 * x for x in xs]  # noqa: E731
    series = {"ttft": ms(r.ttft for r in ok), "tpot": ms(r.tpot for r in ok if r.tpot is not None),
              "itl": ms(x for r in ok for x in r.itl), "e2el": ms(r.latency for r in ok)}
    out_tokens, in_tokens = sum(r.output_len for r in ok), sum(r.prompt_len for r in ok)
    metrics = {"completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
               "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
               "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
               "total_token_throughput": (in_tokens + out_tokens) / duration}
    for name, xs in series.items():
        xs = np.asarray(xs) if xs else np.zeros(1)
        metrics.update({f"mean_{name}_ms": float(xs.mean()), f"median_{name}_ms": float(np.median(xs)),
                        f"p99_{name}_ms": float(np.percentile(xs, 99))})
    errors = sorted({r.error for r in results if r.error})
    return {**metrics, "errors": errors[:5]}


def table(m: dict) -> str:
    def row(name, value, fmt="{:.2f}"):
        return f"{name:<40}{fmt.format(value):<10}"

    lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="="),
             row("Successful requests:", m["completed"], "{}"),
             row("Failed requests:", m["failed"], "{}"),
             row("Benchmark duration (s):", m["duration_s"]),
             row("Total input tokens:", m["total_input_tokens"], "{}"),
             row("Total generated tokens:", m["total_output_tokens"], "{}"),
             row("Request throughput (req/s):", m["request_throughput"]),
             row("Output token throughput (tok/s):", m["output_throughput"]),
             row("Total Token throughput (tok/s):", m["total_token_throughput"])]
    for key, title, label in (("ttft", "Time to First Token", "TTFT"),
                              ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
                              ("itl", "Inter-token Latency", "ITL"),
                              ("e2el", "End-to-end Latency", "E2EL")):
        lines.append("{s:{c}^50}".format(s=title, c="-"))
        for stat in ("mean", "median", "p99"):
            lines.append(row(f"{stat.capitalize() if stat != 'p99' else 'P99'} {label} (ms):",
                             m[f"{stat}_{key}_ms"]))
    if "acceptance_length" in m:
        lines.append("{s:{c}^50}".format(s="Speculative Decoding", c="-"))
        lines.append(row("Acceptance rate (%):", 100 * m["acceptance_rate"]))
        lines.append(row("Acceptance length:", m["acceptance_length"]))
        lines.append(row("Drafts (rounds):", m["spec_rounds"], "{}"))
        lines.append(row("Draft tokens:", m["spec_draft_tokens"], "{}"))
        lines.append(row("Accepted tokens:", m["spec_accepted_tokens"], "{}"))
    lines.append("{s:{c}^50}".format(s="Compilations", c="-"))
    if "compilations_during_run" in m:
        lines.append(row("Step shapes compiled at start:", m["compiled_shapes_at_start"], "{}"))
        lines.append(row("Compilations during the run:", m["compilations_during_run"], "{}"))
    lines.append(row("P99 / median TTFT:", m["p99_ttft_ms"] / max(m["median_ttft_ms"], 1e-9)))
    if m.get("p99_over_median_ttft_without_tools") is not None:
        lines.append(row("P99 / median TTFT, all but tools:", m["p99_over_median_ttft_without_tools"]))
    for kind, (median, p99) in m.get("ttft_by_kind_ms", {}).items():
        lines.append(row(f"TTFT median / P99 (ms), {kind}:", f"{median:.0f} / {p99:.0f}", "{}"))
    lines.append("=" * 50)
    return "\n".join(lines)


# ------------------------------------------------------------------------------ --launch
class LaunchedServer:
    """`python -m lcjax.serve ARGS` as a child; its output is echoed with a prefix."""

    def __init__(self, args: list[str], timeout: float, quiet: bool):
        if not any(a == "--port" or a.startswith("--port=") for a in args):
            args = [*args, "--port", "0"]  # a free port; the ready lines name it
        self.command = [sys.executable, "-m", "lcjax.serve", *args]
        print("launching:", " ".join(self.command), flush=True)
        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1)
        self.url = self.model = None
        self._ready = threading.Event()
        self._quiet = quiet
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.2):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode} before it was ready")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server was not ready after {timeout:.0f} s")

    def _pump(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            if not self._quiet or "lcjax.serve:" in line:
                print(f"[server] {line}", flush=True)
            match = SERVING.search(line)
            if match:
                self.url, self.model = match["url"], match["model"]
            if READY in line:
                self._ready.set()

    def stop(self, timeout: float = 60.0) -> int:
        """SIGINT (drain and exit 0), then SIGKILL after `timeout` seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


# ------------------------------------------------------------------------------ main
def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    server_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="With --launch, arguments after `--` go to python -m lcjax.serve.")
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", help="model id (default: the server's first /v1/models entry)")
    p.add_argument("--api-key", default=os.environ.get("LCJAX_API_KEY", "unused"))
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len*(1-r), len*(1+r)] (default 0: all equal)")
    p.add_argument("--token-range", type=int, nargs=2, default=(3, 256), metavar=("LOW", "HIGH"),
                   help="prompt token ids drawn from [LOW, HIGH) (default 3 256: valid in every "
                        "preset's vocabulary, past pad/bos/eos)")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf = all at once")
    p.add_argument("--max-concurrency", type=int, help="requests in flight at most (default: no limit)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--num-warmups", type=int,
                   help="untimed warm-up bursts of up to N requests (default: "
                        "--max-concurrency, else 16; 0 = none); match the server's --max-num-seqs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the metrics and per-request figures here")
    p.add_argument("--launch", action="store_true", help="start python -m lcjax.serve, benchmark, stop it")
    p.add_argument("--launch-timeout", type=float, default=900.0, help="seconds to wait for its ready line")
    p.add_argument("--quiet-server", action="store_true", help="echo only the server's lcjax.serve lines")
    p.add_argument("--mixed", action="store_true",
                   help="rotate through n, logprobs, stop, penalties, JSON and tool requests; no "
                        "warm-up bursts; report compilations after the server's ready line")
    p.add_argument("--smoke", action="store_true",
                   help="32 requests of 32 + 32 tokens at concurrency 4 (warm-up bursts of 1-4); with "
                        "--launch and no server flags, a small random tiny server")
    args = p.parse_args(argv)
    if args.smoke:
        args.num_prompts, args.input_len, args.output_len, args.max_concurrency = 32, 32, 32, 4
        if args.launch and not server_args:
            server_args = ["--config", "tiny", "--max-num-seqs", "4", "--max-model-len", "128",
                           "--prefill-chunk", "32"]
    if args.num_warmups is None:
        args.num_warmups = 0 if args.mixed else args.max_concurrency or 16
    if server_args and not args.launch:
        p.error("arguments after `--` are server flags: they need --launch")
    return args, server_args


def warmup_sizes(n: int) -> list[int]:
    """Burst sizes: every size up to 8, then powers of two, then n (nothing for n = 0).

    How a burst's requests group into prefill batches depends on when each reaches the engine,
    so the small sizes (where prefill batches are formed) are all tried, and the whole sequence
    runs twice (`bench`), to meet the buckets a timed run can."""
    sizes = set(range(1, min(n, 8) + 1))
    b = 16
    while b < n:
        sizes.add(b)
        b *= 2
    return sorted(sizes | {n}) if n > 0 else []


async def bench(args: argparse.Namespace, base_url: str, model: Optional[str]) -> tuple[dict, list[Result]]:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key=args.api_key, max_retries=0, timeout=3600)
    try:
        if model is None:
            model = (await client.models.list()).data[0].id
        requests = workload(args.num_prompts, args.input_len, args.output_len, args.range_ratio,
                            args.token_range, args.request_rate, args.seed, args.mixed)
        compiled_before = await compiled_shapes(base_url)
        sizes = warmup_sizes(args.num_warmups)
        if sizes:
            print(f"warm-up: untimed bursts of {sizes} requests, twice", flush=True)
        for size in sizes * 2:
            burst = [dataclasses.replace(requests[i % len(requests)], arrival=0.0,
                                         output_len=min(8, requests[i % len(requests)].output_len))
                     for i in range(size)]
            results, _ = await replay(client, model, burst, None, args.temperature)
            failed = [r.error for r in results if r.error]
            if failed:
                raise RuntimeError(f"{len(failed)} warm-up request(s) failed, e.g. {failed[0]}")
        print(f"benchmark: {len(requests)} requests to {model} at {base_url}, request rate "
              f"{args.request_rate}, max concurrency {args.max_concurrency}", flush=True)
        spec_before = await server_metrics(base_url, SPEC_COUNTERS)
        results, duration = await replay(client, model, requests, args.max_concurrency, args.temperature)
        spec_after = await server_metrics(base_url, SPEC_COUNTERS)
        compiled_after = await compiled_shapes(base_url)
    finally:
        await client.close()
    extra = speculative_figures(spec_before, spec_after)
    if args.mixed:
        extra["ttft_by_kind_ms"] = ttft_by_kind(requests, results)
        extra["p99_over_median_ttft_without_tools"] = ttft_ratio_without_tools(requests, results)
    if compiled_before is not None and compiled_after is not None:
        extra.update(compiled_shapes_at_start=compiled_before,
                     compilations_during_run=compiled_after - compiled_before)
    return {"model": model, **summarize(results, duration), **extra}, results


def ttft_by_kind(requests: list[Request], results: list[Result]) -> dict:
    """{kind: [median, P99] TTFT in ms} over the kind's successful requests. A "tools" request's
    first output is its first tool-call delta, sent once the call's head names the function."""
    out = {}
    for kind in MIXED_KINDS:
        xs = [1000 * r.ttft for q, r in zip(requests, results) if q.kind == kind and not r.error]
        if xs:
            out[kind] = [float(np.median(xs)), float(np.percentile(xs, 99))]
    return out


def ttft_ratio_without_tools(requests: list[Request], results: list[Result]) -> Optional[float]:
    """P99 / median TTFT over every kind whose first output is its first token (all but tools)."""
    xs = [r.ttft for q, r in zip(requests, results) if q.kind != "tools" and not r.error]
    return float(np.percentile(xs, 99) / np.median(xs)) if xs else None


async def server_metrics(base_url: str, names: Sequence[str]) -> dict[str, float]:
    """{name: value} of the server's /metrics samples named (missing ones left out)."""
    import httpx

    root = base_url[: -len("/v1")] if base_url.endswith("/v1") else base_url
    try:
        async with httpx.AsyncClient() as http:
            text = (await http.get(root + "/metrics", timeout=30)).text
    except httpx.HTTPError:
        return {}
    out = {}
    for name in names:
        match = re.search(rf"^{re.escape(name)}(?:_total)?(?:\{{[^}}]*\}})? (\S+)$", text, re.M)
        if match:
            out[name] = float(match.group(1))
    return out


async def compiled_shapes(base_url: str) -> Optional[int]:
    """The server's `lcjax_compiled_step_shapes` (None if its /metrics does not say)."""
    value = (await server_metrics(base_url, ["lcjax_compiled_step_shapes"])).get("lcjax_compiled_step_shapes")
    return None if value is None else int(value)


SPEC_COUNTERS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                 "vllm:spec_decode_num_accepted_tokens")


def speculative_figures(before: dict, after: dict) -> dict:
    """Acceptance over the run from the server's spec-decode counters (as `vllm bench serve`
    reports them): length = 1 + accepted / rounds, rate = accepted / proposed. {} when the
    server ran no speculative rounds."""
    if any(n not in before or n not in after for n in SPEC_COUNTERS):
        return {}
    rounds, drafts, accepted = (after[n] - before[n] for n in SPEC_COUNTERS)
    if rounds <= 0:
        return {}
    return {"spec_rounds": int(rounds), "spec_draft_tokens": int(drafts),
            "spec_accepted_tokens": int(accepted), "acceptance_length": 1 + accepted / rounds,
            "acceptance_rate": accepted / drafts if drafts else 0.0}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, server_args = parse_args(sys.argv[1:] if argv is None else argv)
    server = LaunchedServer(server_args, args.launch_timeout, args.quiet_server) if args.launch else None
    try:
        base_url = server.url if server else args.base_url
        model = args.model or (server.model if server else None)
        metrics, results = asyncio.run(bench(args, base_url, model))
    finally:
        code = server.stop() if server else 0
        if server:
            print(f"server stopped (exit code {code})", flush=True)
    print(table(metrics))
    for error in metrics["errors"]:
        print("error:", error)
    if args.json:
        config = {k: v for k, v in vars(args).items() if k != "api_key"}
        config["request_rate"] = str(config["request_rate"])
        record = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "config": config, "server_args": server_args,
                  **metrics, "input_lens": [r.prompt_len for r in results],
                  "output_lens": [r.output_len for r in results], "ttfts": [r.ttft for r in results],
                  "itls": [r.itl for r in results], "latencies": [r.latency for r in results]}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {args.json}")
    return 1 if metrics["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
