"""Continuous-batching inference engine over the paged MLA cache.

`Engine.step()` is one scheduler iteration: admit waiting requests into free slots (reserving
their pages), run one batch of prefill chunks (at most `prefill_chunk` prompt tokens per row, so a
long prompt never stalls the running requests for more than one chunk), then one decode step
(or one MTP speculative round) for every running request, and hand back what each request
gained. New requests therefore join the running batch between decode steps.

Shapes are bucketed (rows: powers of two up to `max_num_seqs`; prefill length: powers of two
from 16 up to `prefill_chunk`), and nothing else a request asks for changes a shape: every step
computes the top-20 logprobs (a request's `logprobs=k` is picked on the host), n > 1 is n
requests, and penalties, stop conditions and logits processors are per-row inputs. So
`warmup()` compiles every shape the engine can ever run (`compile_plan()`: prefill rows x
prefill lengths, plus decode or speculative rows) and after it no request triggers a compile;
`stats().num_compilations` counts the shapes compiled. The engine is single-threaded:
`AsyncEngine` owns it from one thread.

Logits processors: `add_request(..., logits_processor=fn)` (or a `logits_processor` attribute
on the params) constrains one request's tokens: before each of its tokens is sampled the engine
calls `fn(generated_token_ids) -> Optional[np.ndarray]` on the host with the tokens that request
has generated so far (an n > 1 completion is n requests, so each sequence gets its own calls),
and adds the returned float32 [vocab_size] bias to the logits (-inf bans a token; None = no bias
this step). The bias is added after the penalties and before temperature / top-k / top-p / min-p
and the greedy argmax, so greedy and sampled requests both obey it; reported logprobs are those
of the biased logits. Every step takes a [rows, V] bias input (zeros for rows without a
processor), so processors add no compiled shapes. A row with a processor never speculates: its
speculative rounds accept no drafts and emit one token, so the processor sees every token. A
processor that raises, or returns a wrong shape, NaN or an all -inf bias, finishes only its own
request (finish_reason "error", `RequestOutput.error` says why).

Page policy: a request reserves pages for min(prompt + max_tokens, max_model_len) + k tokens at
admission and keeps them until it finishes, so running requests never run out of pages and no
preemption is needed; a request waits while too few pages are free.
"""

from __future__ import annotations

import functools
import math
import time
import uuid
from collections import deque
from typing import Any, Callable, Optional, Sequence, Union

import jax
import numpy as np

from jax.sharding import Mesh

from lcjax.config import Config, ModelConfig, ParallelConfig
from lcjax.model.model import model_config
from lcjax.serve import runner, sharding
from lcjax.serve.kv_cache import PageAllocator
from lcjax.serve.outputs import EngineStats, RequestOutput, TokenLogprob
from lcjax.serve.sampling import SamplingParams, sampling_tensors

from lcjax.serve.engine_state import EngineConfig, LogitsProcessor  # noqa: F401 (re-exported)
from lcjax.serve.engine_state import RequestState as _Request
from lcjax.serve.engine_state import bucket as _bucket
from lcjax.serve.engine_state import buckets as _buckets
from lcjax.serve.engine_state import cache_placement, check_engine_config, find_stop


class Engine:
    """Continuous batching over slots and pages; see the module docstring."""

    def __init__(self, config: Union[Config, ModelConfig], variables: Any, tokenizer=None,
                 engine_config: EngineConfig = EngineConfig(), mesh: Optional[Mesh] = None,
                 parallel: Optional[ParallelConfig] = None, kv_retrieval: Any = None):
        """`mesh` (with `parallel`: rule table, expert dispatch, TP comm) shards the engine over
        its devices (lcjax.serve.sharding); None runs on the default device. `kv_retrieval` (an
        A2ATSIndex) makes decode and verify attend retrieved keys (A²ATS); None: exact."""
        self.config = config
        self.model_cfg = cfg = model_config(config)
        self.engine_config = ec = engine_config
        self.tokenizer = tokenizer
        check_engine_config(cfg, ec, variables)
        k = ec.num_speculative_tokens
        num_pages = ec.num_pages or ec.max_num_seqs * ec.pages_per_seq + 1
        self.allocator = PageAllocator(num_pages)
        self.variables = variables
        if kv_retrieval is not None and mesh is not None:
            raise ValueError("kv_retrieval (A²ATS) runs on one device: drop the mesh")
        self.state = runner.init_engine_state(cfg, ec.max_num_seqs, num_pages, ec.page_size, k,
                                              **cache_placement(ec.sparse_verify, kv_retrieval))
        if kv_retrieval is not None:
            self.state = self.state.replace(
                cache=kv_retrieval.attach(self.state.cache, num_pages, ec.page_size))
        self.eos_id = cfg.eos_token_id
        self._free_slots = list(range(ec.max_num_seqs - 1, -1, -1))
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._requests: dict[str, _Request] = {}
        self._rng = np.random.default_rng(ec.seed)
        self._compiled: set = set()
        self._zero_bias: dict[int, jax.Array] = {}
        self._counters = dict(generated=0, prompt=0, draft=0, accepted=0, rounds=0)
        self._row_buckets = _buckets(ec.max_num_seqs)
        self._prefill_rows = _buckets(min(ec.max_prefill_seqs, ec.max_num_seqs))
        self._prefill_lens = _buckets(ec.prefill_chunk, start=min(16, ec.prefill_chunk))
        # The state (argument 1 after cfg is bound) is donated: steps update the cache in place.
        # XLA:CPU cannot donate, and would warn on every call.
        donate = () if jax.default_backend() == "cpu" else (1,)
        impl = ec.attention_impl
        steps = ((runner.prefill_step, 4, ("speculative",)), (runner.decode_step, 3, ()),
                 (functools.partial(runner.speculative_step, sparse_verify=ec.sparse_verify), 3,
                  ("num_draft",)))
        self.parallelism = None
        if mesh is None:
            jit = [jax.jit(functools.partial(fn, cfg, implementation=impl), static_argnames=static,
                           donate_argnums=donate) for fn, _, static in steps]
        else:
            self.parallelism = par = sharding.parallelism(mesh, parallel or ParallelConfig(), variables)
            self.variables, self.state, var_sh = sharding.place(cfg, variables, self.state, par)
            jit = [sharding.ShardedStep(functools.partial(fn, cfg, implementation=impl), par, var_sh,
                                        num_args=n, donate_argnums=donate)
                   for fn, n, static in steps]
        self._prefill, self._decode, self._spec = jit

    # ----------------------------------------------------------------------------------- API
    def add_request(self, prompt_token_ids: Sequence[int], params: SamplingParams,
                    request_id: Optional[str] = None, arrival_time: Optional[float] = None,
                    logits_processor: Optional[LogitsProcessor] = None) -> str:
        """Queue a request; ValueError names the bad value (nothing is queued then).

        logits_processor: see the module docstring (default: `params.logits_processor` if the
        params carry one).
        """
        ec, cfg = self.engine_config, self.model_cfg
        prompt = [int(t) for t in prompt_token_ids]
        if not prompt:
            raise ValueError("prompt is empty: at least one token is needed")
        if len(prompt) >= ec.max_model_len:
            raise ValueError(f"prompt has {len(prompt)} tokens; this server's max_model_len is "
                             f"{ec.max_model_len}, which must leave room for at least one "
                             f"generated token")
        bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")
        params.validate(cfg.vocab_size)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if logits_processor is None:
            logits_processor = getattr(params, "logits_processor", None)
        if logits_processor is not None and not callable(logits_processor):
            raise ValueError(f"logits_processor must be callable; got {logits_processor!r}")
        seed = params.seed if params.seed is not None else int(self._rng.integers(0, 2**31))
        req = _Request(id=request_id, prompt=prompt, params=params, seed=seed & 0xFFFFFFFF,
                       arrival=arrival_time if arrival_time is not None else time.monotonic(),
                       logits_processor=logits_processor)
        self._requests[request_id] = req
        self._waiting.append(req)
        return request_id

    def abort(self, request_id: str) -> None:
        """Drop a request wherever it is and free its pages (unknown ids are ignored)."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        if req in self._waiting:
            self._waiting.remove(req)
        if req in self._running:
            self._running.remove(req)
            self._release(req)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def compiled_steps(self) -> tuple:
        """(key, jitted steps, shape log) to hand to another engine's `share_steps`."""
        key = (self.model_cfg, self.engine_config, self.parallelism is None)
        return key, (self._prefill, self._decode, self._spec, self._compiled)

    def share_steps(self, steps: tuple) -> None:
        """Run another engine's `compiled_steps`: variables are an argument, so engines of one
        model and engine config (e.g. one per policy version) compile each shape once."""
        key, shared = steps
        if key != (self.model_cfg, self.engine_config, self.parallelism is None):
            raise ValueError("share_steps needs steps of an engine with the same model config, "
                             "engine config and placement")
        self._prefill, self._decode, self._spec, self._compiled = shared

    def stats(self) -> EngineStats:
        c = self._counters
        return EngineStats(num_waiting=len(self._waiting), num_running=len(self._running),
                           free_pages=self.allocator.num_free, total_pages=self.allocator.num_usable,
                           num_compilations=len(self._compiled), generated_tokens_total=c["generated"],
                           prompt_tokens_total=c["prompt"], draft_tokens_total=c["draft"],
                           accepted_tokens_total=c["accepted"], spec_rounds_total=c["rounds"])

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: Union[SamplingParams, Sequence[SamplingParams]]) -> list[RequestOutput]:
        """Run the given prompts to completion (all queued at once); final outputs in order."""
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        final: dict[str, RequestOutput] = {}
        merged: dict[str, list] = {i: [] for i in ids}
        while len(final) < len(ids):
            for out in self.step():
                if out.request_id in merged and out.logprobs:
                    merged[out.request_id].extend(out.logprobs)
                if out.finished and out.request_id in merged:
                    final[out.request_id] = out
        for i in ids:
            if final[i].logprobs is not None:
                final[i].logprobs = merged[i]
        return [final[i] for i in ids]

    # ----------------------------------------------------------------------------- scheduler
    def step(self) -> list[RequestOutput]:
        """One iteration: admit, one prefill batch, one decode batch; outputs of progressed requests."""
        self._admit()
        outputs: dict[str, RequestOutput] = {}
        prefilling = [r for r in self._running if not r.decoding][: self.engine_config.max_prefill_seqs]
        decoding = [r for r in self._running if r.decoding and r.output]
        ec = self.engine_config
        samples_now = decoding + [r for r in prefilling
                                  if r.prefilled + ec.prefill_chunk >= len(r.prompt)]
        for out in self._run_processors(samples_now):
            outputs[out.request_id] = out
        prefilling = [r for r in prefilling if r.id in self._requests]
        decoding = [r for r in decoding if r.id in self._requests]
        if prefilling:
            for out in self._run_prefill(prefilling):
                outputs[out.request_id] = out
        if decoding:
            for out in self._run_decode(decoding):
                outputs[out.request_id] = out
        return list(outputs.values())

    def _run_processors(self, reqs: Sequence[_Request]) -> list[RequestOutput]:
        """Set each request's next-token bias from its logits processor; a processor that fails
        finishes its own request (finish_reason "error"). Returns those requests' outputs."""
        failed = []
        v = self.model_cfg.vocab_size
        for r in reqs:
            r.bias = None
            if r.logits_processor is None:
                continue
            try:
                bias = r.logits_processor(list(r.output))
                if bias is not None:
                    bias = np.asarray(bias, np.float32)
                    if bias.shape != (v,):
                        raise ValueError(f"returned shape {bias.shape}; expected ({v},)")
                    if np.isnan(bias).any():
                        raise ValueError("returned NaN")
                    if np.isneginf(bias).all():
                        raise ValueError("banned every token (all -inf)")
                r.bias = bias
            except Exception as err:  # noqa: BLE001 - a bad processor fails its request only
                failed.append(self._finish_with_error(r, f"logits_processor failed: {err}"))
        return failed

    def _finish_with_error(self, req: _Request, message: str) -> RequestOutput:
        self._requests.pop(req.id, None)
        self._running.remove(req)
        self._release(req)
        return RequestOutput(
            request_id=req.id, prompt_token_ids=req.prompt, token_ids=list(req.output),
            new_token_ids=[], text=req.text, delta_text="", finished=True, finish_reason="error",
            first_token_time=req.first_token_time, arrival_time=req.arrival,
            num_draft_tokens=req.draft_tokens, num_accepted_tokens=req.accepted_tokens,
            error=message)

    def _pages_needed(self, req: _Request) -> int:
        ec = self.engine_config
        total = min(len(req.prompt) + req.params.max_tokens, ec.max_model_len)
        return math.ceil((total + ec.num_speculative_tokens) / ec.page_size)

    def _admit(self) -> None:
        while self._waiting and self._free_slots:
            req = self._waiting[0]
            need = self._pages_needed(req)
            if need > self.allocator.num_free:
                break  # FIFO: later requests wait too, so a large one is not starved
            self._waiting.popleft()
            req.pages = self.allocator.allocate(need)
            req.slot = self._free_slots.pop()
            self._running.append(req)

    def _release(self, req: _Request) -> None:
        self.allocator.free(req.pages)
        req.pages = []
        self._free_slots.append(req.slot)
        req.slot = -1

    def _block_tables(self, reqs: Sequence[_Request], rows: int) -> np.ndarray:
        table = np.zeros((rows, self.engine_config.pages_per_seq), np.int32)
        for b, r in enumerate(reqs):
            table[b, : len(r.pages)] = r.pages
        return table

    def _inputs(self, reqs: Sequence[_Request], rows: int, tokens: np.ndarray, starts, num_valid,
                reset) -> runner.StepInputs:
        """Host-built step inputs. device_put, not jnp.asarray: the latter stages each array
        through a jitted copy, one more compile per new shape."""
        n = len(reqs)

        def pad(values, fill, dtype):
            out = np.full((rows,), fill, dtype)
            out[:n] = values
            return out

        return runner.StepInputs(
            tokens=jax.device_put(tokens), slots=jax.device_put(pad([r.slot for r in reqs], -1, np.int32)),
            starts=jax.device_put(pad(starts, 0, np.int32)),
            num_valid=jax.device_put(pad(num_valid, 0, np.int32)),
            block_tables=jax.device_put(self._block_tables(reqs, rows)),
            reset=jax.device_put(pad(reset, False, bool)),
            seeds=jax.device_put(pad([r.seed for r in reqs], 0, np.uint32)),
            gen_steps=jax.device_put(pad([len(r.output) for r in reqs], 0, np.int32)),
            sampling=sampling_tensors([r.params for r in reqs], rows),
            bias=self._bias(reqs, rows),
            num_draft=jax.device_put(pad([0 if r.logits_processor else self.engine_config.num_speculative_tokens
                                       for r in reqs], 0, np.int32)))

    def _bias(self, reqs: Sequence[_Request], rows: int) -> jax.Array:
        """[rows, V] float32 logit bias (a cached device zeros array when no row has one)."""
        if all(r.bias is None for r in reqs):
            if rows not in self._zero_bias:
                self._zero_bias[rows] = jax.device_put(
                    np.zeros((rows, self.model_cfg.vocab_size), np.float32))
            return self._zero_bias[rows]
        bias = np.zeros((rows, self.model_cfg.vocab_size), np.float32)
        for b, r in enumerate(reqs):
            if r.bias is not None:
                bias[b] = r.bias
        return jax.device_put(bias)

    def _note_compile(self, *key) -> None:
        self._compiled.add(key)

    def compile_plan(self) -> list[tuple]:
        """Every (step, rows[, length]) shape this engine can run, in warm-up order."""
        plan = [("prefill", rows, length) for rows in self._prefill_rows
                for length in self._prefill_lens]
        step = "speculative" if self.engine_config.num_speculative_tokens else "decode"
        return plan + [(step, rows) for rows in self._row_buckets]

    def warmup(self, progress: Optional[Callable[[int, int, tuple], None]] = None) -> int:
        """Compile (or load from the persistent compilation cache) every shape in
        `compile_plan()` by running it once over padding rows only, which touch no slot and only
        the reserved page 0. Call before serving; returns how many shapes were new.
        `progress(i, total, shape)` is called before each."""
        if self._running or self._waiting:
            raise RuntimeError("warmup() must run before any request is added")
        before = len(self._compiled)
        plan = self.compile_plan()
        for i, shape in enumerate(plan):
            if progress is not None:
                progress(i, len(plan), shape)
            if shape[0] == "prefill":
                self._prefill_call([], shape[1], np.zeros(shape[1:], np.int32), [],
                                   np.full((shape[1],), -1, np.int32))
            else:
                self._decode_call([], shape[1])
        jax.block_until_ready(self.state)
        return len(self._compiled) - before

    def _prefill_call(self, reqs, rows, tokens, chunk_lens, follow):
        inp = self._inputs(reqs, rows, tokens, [r.prefilled for r in reqs], chunk_lens,
                           [r.prefilled == 0 for r in reqs])
        spec = self.engine_config.num_speculative_tokens > 0
        self._note_compile("prefill", rows, tokens.shape[1], spec)
        self.state, first, scores = self._prefill(self.variables, self.state, inp,
                                                  jax.device_put(follow), speculative=spec)
        return first, scores

    def _decode_call(self, reqs, rows):
        """One decode step (or speculative round): (tokens [rows, k+1], accepted [rows], scores)."""
        k = self.engine_config.num_speculative_tokens
        tokens = np.zeros((rows, 1), np.int32)
        tokens[: len(reqs), 0] = [r.output[-1] for r in reqs]
        inp = self._inputs(reqs, rows, tokens, [r.length for r in reqs], [1] * len(reqs),
                           [False] * len(reqs))
        if k:
            self._note_compile("speculative", rows, k)
            self.state, out, accepted, scores = self._spec(self.variables, self.state, inp,
                                                           num_draft=k)
            return out, accepted, scores
        self._note_compile("decode", rows)
        self.state, out, scores = self._decode(self.variables, self.state, inp)
        # numpy from here: slicing the device array would dispatch (and compile) an op per shape
        return np.asarray(out)[:, None], np.zeros((rows,), np.int32), scores

    def _run_prefill(self, reqs: list[_Request]) -> list[RequestOutput]:
        ec = self.engine_config
        chunks = [r.prompt[r.prefilled: r.prefilled + ec.prefill_chunk] for r in reqs]
        rows = _bucket(len(reqs), self._prefill_rows)
        length = _bucket(max(len(c) for c in chunks), self._prefill_lens)
        tokens = np.zeros((rows, length), np.int32)
        follow = np.full((rows,), -1, np.int32)
        for b, (r, c) in enumerate(zip(reqs, chunks)):
            tokens[b, : len(c)] = c
            end = r.prefilled + len(c)
            if end < len(r.prompt):
                follow[b] = r.prompt[end]
        first, scores = self._prefill_call(reqs, rows, tokens, [len(c) for c in chunks], follow)
        first = np.asarray(first)
        scores = jax.tree.map(np.asarray, scores)
        outs = []
        for b, (r, c) in enumerate(zip(reqs, chunks)):
            r.prefilled += len(c)
            self._counters["prompt"] += len(c)
            if r.decoding:  # the prompt is done: its first token was sampled
                outs.append(self._emit(r, [int(first[b])], scores, b, 1))
        return [o for o in outs if o is not None]

    def _run_decode(self, reqs: list[_Request]) -> list[RequestOutput]:
        ec = self.engine_config
        k = ec.num_speculative_tokens
        rows = _bucket(len(reqs), self._row_buckets)
        out, accepted, scores = self._decode_call(reqs, rows)
        out, accepted = np.asarray(out), np.asarray(accepted)
        scores = jax.tree.map(np.asarray, scores)
        outs = []
        for b, r in enumerate(reqs):
            count = int(accepted[b]) + 1
            if k and r.logits_processor is None:
                r.draft_tokens += k
                r.accepted_tokens += count - 1
                self._counters["draft"] += k
                self._counters["rounds"] += 1
                self._counters["accepted"] += count - 1
            outs.append(self._emit(r, [int(t) for t in out[b, :count]], scores, b, count))
        return [o for o in outs if o is not None]

    # ------------------------------------------------------------------------------- outputs
    def _emit(self, req: _Request, new: list[int], scores, row: int, count: int) -> Optional[RequestOutput]:
        """Append new tokens up to the first stop condition; build the request's output."""
        if req.id not in self._requests:
            return None
        now = time.monotonic()
        if req.first_token_time is None:
            req.first_token_time = now
        p, ec = req.params, self.engine_config
        kept, reason, stop_reason = [], None, None
        for tok in new:
            kept.append(tok)
            n_out = len(req.output) + len(kept)
            if n_out > p.min_tokens:
                if tok == self.eos_id and not p.ignore_eos:
                    reason, stop_reason = "stop", None
                elif tok in p.stop_token_ids:
                    reason, stop_reason = "stop", tok
            if reason is None and (n_out >= p.max_tokens or
                                   len(req.prompt) + n_out >= ec.max_model_len):
                reason = "length"
            if reason:
                break
        req.output.extend(kept)
        self._counters["generated"] += len(kept)
        logprobs = None
        if p.logprobs is not None and scores is not None:
            chosen, top_ids, top_lp = scores
            logprobs = [TokenLogprob(token_id=t, logprob=float(chosen[row, j]),
                                     top=[(int(i), float(v)) for i, v in
                                          zip(top_ids[row, j, : p.logprobs], top_lp[row, j, : p.logprobs])])
                        for j, t in enumerate(kept)]
        text_ids = req.output
        if self.tokenizer is not None:
            # The EOS or stop token that ended the request is not part of the text (as in vLLM).
            skip_last = reason == "stop" and (stop_reason is None or isinstance(stop_reason, int))
            text_ids = req.output[:-1] if skip_last else req.output
            req.text = self.tokenizer.decode(text_ids)
            if p.stop and reason != "stop":
                hit = find_stop(req.text, p.stop, req.emitted_text)
                if hit is not None:
                    cut, stop = hit
                    req.text, reason, stop_reason = req.text[:cut], "stop", stop
        # Hold back text that may be the start of a stop string or an incomplete character.
        visible = len(req.text)
        if reason is None:
            if req.text.endswith("\ufffd"):
                visible = len(req.text.rstrip("\ufffd"))
            for s in p.stop:
                for n in range(min(len(s) - 1, visible), 0, -1):
                    if req.text[:visible].endswith(s[:n]):
                        visible -= n
                        break
        visible = max(visible, req.emitted_text)
        delta = req.text[req.emitted_text: visible]
        req.emitted_text = visible
        finished = reason is not None
        out = RequestOutput(
            request_id=req.id, prompt_token_ids=req.prompt, token_ids=list(req.output),
            new_token_ids=kept, text=req.text if finished else req.text[:visible],
            delta_text=delta, finished=finished, finish_reason=reason, logprobs=logprobs,
            stop_reason=stop_reason, first_token_time=req.first_token_time,
            arrival_time=req.arrival, num_draft_tokens=req.draft_tokens,
            num_accepted_tokens=req.accepted_tokens)
        if finished:
            self._requests.pop(req.id, None)
            self._running.remove(req)
            self._release(req)
        return out
