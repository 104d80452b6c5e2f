"""Sparse verification of MTP drafts: quality on a trained model, verify-step cost and time.

    python scripts/bench_sparse_verify.py quality --run runs/stdlib_tiny_2k      # trained MTP head
    python scripts/bench_sparse_verify.py timing --contexts 4096,8192            # random `small`
    python scripts/bench_decode.py --sparse-verify block_budget=64 ...           # = timing

`quality` (held-out stdlib files, prompts of `--context` tokens):
  - engine: greedy generation of `--new-tokens` with k MTP drafts per round, dense verify and
    each sparse setting; acceptance length (1 + accepted drafts per round), tokens equal to the
    dense run's, and the dense model's NLL of the generated text.
  - teacher-forced verify: the true continuation fed in verify blocks of k+1 tokens through the
    engine's own step (`runner.forward_step`) with the sparse selector; the verifier's NLL of the
    next true tokens (what acceptance depends on), and the overlap statistics: Jaccard of each
    verify token's own top-K retrieved pages with the scoring token's (forced sink/local pages
    left out), and of consecutive scoring sublayers' sets.
  - cost: XLA's cost analysis (flops, bytes accessed) of the compiled verify block, dense vs
    sparse, and the analytic attention cost (`sparse_verify.attention_cost`).
  - A²ATS (`--a2ats KEY=V,..` sets its A2ATSConfig; codebooks calibrated once on
    `--a2ats-calib-seqs` train-split files): the setting "a2ats" is dense-structure verify with
    A²ATS retrieval (each verify token retrieves; the step attends the union), and a setting
    ending in "+a2ats" is sparse verification over A²ATS (the score query's retrieved keys shared,
    lcjax/sparsity/sparse_verify_retrieval.py). Overlap columns are Quest-only; "keys" is the
    share of the context a verify block attends (A²ATS: the shared sets' measured size; Quest:
    budget pages x page size).
`timing`: one jitted MTP round (`runner.speculative_step`: drafts + verify) and the verify pass
alone (k+1 tokens through `runner.forward_step`, with XLA's cost analysis) over a filled random
cache at each context, dense vs sparse, median of `--repeats`; acceptance is not measured
(random weights): tokens/s = acceptance length x `tok_s_per_acceptance` (batch / round time).
Prints tables; writes JSON with `--json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.config_io import load_config, resolve_config_path
from lcjax.data.sources import stdlib_corpus
from lcjax.model.embedding import ngram_history
from lcjax.model.model import LongCatModel, project_logits
from lcjax.serve import runner
from lcjax.serve.engine import Engine, EngineConfig
from lcjax.serve.loading import load_run, random_model
from lcjax.serve.sampling import SamplingParams, sampling_tensors
from lcjax.sparsity import sparse_verify as sv
from lcjax.sparsity.sparse_verify_retrieval import RetrievalSelector


def _settings(text: str) -> sv.SparseVerifyConfig:
    return sv.parse_settings(text.replace(";", ","))


# ------------------------------------------------------------------------------ data
def heldout_sequences(tokenizer, heldout_fraction: float, length: int, count: int,
                      split: str = "heldout") -> np.ndarray:
    """`count` token sequences of `length` from held-out stdlib files (long files first)."""
    seqs = []
    for path in sorted(stdlib_corpus(split, heldout_fraction), key=lambda p: -p.stat().st_size):
        ids = tokenizer.encode(path.read_text(errors="replace"))
        if len(ids) >= length:
            seqs.append(ids[:length])
        if len(seqs) == count:
            return np.asarray(seqs, np.int32)
    raise ValueError(f"only {len(seqs)} held-out files hold {length} tokens; lower --context")


# ------------------------------------------------------------------------------ teacher forcing
def _inputs(tokens, starts, tables):
    b = tokens.shape[0]
    return runner.StepInputs(tokens=tokens, slots=jnp.arange(b, dtype=jnp.int32), starts=starts,
                             num_valid=jnp.full((b,), tokens.shape[1], jnp.int32),
                             block_tables=tables, reset=starts == 0, seeds=None, gen_steps=None,
                             sampling=None, bias=None, num_draft=None)


@functools.partial(jax.jit, static_argnames=("cfg", "all_valid", "settings"))
def _step(cfg, variables, cache, tokens, starts, tables, *, all_valid, settings):
    """One step through the engine's forward: (cache, log-probs [B, S, V], overlap stats)."""
    if settings is None:
        select = None
    elif cache.retrieval is not None:  # sparse verify over A²ATS: no page statistics
        select = RetrievalSelector(settings)
    else:
        select = sv.Selector(settings, record=True)
    run_cfg = cfg if settings is None else sv.verify_model_config(cfg, settings)
    run_vars = variables if settings is None else sv.verify_variables(variables)
    hidden, cache, history = runner.forward_step(run_cfg, run_vars, cache,
                                                 _inputs(tokens, starts, tables),
                                                 all_valid=all_valid, implementation=None,
                                                 select=select)
    if cfg.ngram.enabled:
        new = ngram_history(tokens, jnp.full(tokens.shape[:1], tokens.shape[1], jnp.int32), cfg,
                            history)
        cache = cache.replace(ngram_history=new)
    logp = jax.nn.log_softmax(project_logits(cfg, hidden, variables["params"]["lm_head"]).astype(
        jnp.float32), axis=-1)
    stats = {}
    if isinstance(select, RetrievalSelector) and select.sizes:
        stats["keys"] = jnp.stack(select.sizes)  # [calls, B] keys each shared set holds
    if isinstance(select, sv.Selector):
        stats["token_overlap"] = jnp.stack(select.token_overlap) if select.token_overlap else None
        stats["kept_overlap"] = (jnp.stack(select.token_overlap_kept)
                                 if select.token_overlap_kept else None)
        stats["layer_overlap"] = jnp.stack(select.layer_overlap) if select.layer_overlap else None
    return cache, logp, stats


def teacher_forced(cfg, variables, seqs, context, k, page, settings, chunk=256, index=None):
    """Prefill `context` tokens, then verify blocks of k+1 true tokens: (mean NLL, token overlap
    of retrieved pages, of kept pages, layer overlap, XLA cost of one verify block). `index`:
    an A2ATSIndex (the cache retrieves keys)."""
    b, total = seqs.shape
    pages = -(-total // page)
    state = runner.init_engine_state(cfg, b, b * pages + 1, page, k, page_bounds=index is None)
    cache = state.cache if index is None else index.attach(state.cache, b * pages + 1, page)
    tables = jnp.asarray(1 + np.arange(b * pages).reshape(b, pages), jnp.int32)
    for start in range(0, context, chunk):
        end = min(start + chunk, context)
        cache, _, _ = _step(cfg, variables, cache, jnp.asarray(seqs[:, start:end]),
                            jnp.full((b,), start, jnp.int32), tables, all_valid=False,
                            settings=None)
    nll, tok_ov, kept_ov, lay_ov, cost, keys = [], [], [], [], None, []
    for start in range(context, total - k - 1, k + 1):
        args = (cfg, variables, cache, jnp.asarray(seqs[:, start:start + k + 1]),
                jnp.full((b,), start, jnp.int32), tables)
        if cost is None:
            compiled = _step.lower(*args, all_valid=True, settings=settings).compile()
            analysis = compiled.cost_analysis()
            analysis = analysis[0] if isinstance(analysis, list) else analysis
            cost = dict(flops=float(analysis.get("flops", 0)),
                        bytes=float(analysis.get("bytes accessed", 0)))
        cache, logp, stats = _step(*args, all_valid=True, settings=settings)
        target = jnp.asarray(seqs[:, start + 1:start + k + 2])
        nll.append(-np.asarray(jnp.take_along_axis(logp, target[..., None], -1))[..., 0])
        if stats.get("token_overlap") is not None:
            tok_ov.append(np.asarray(stats["token_overlap"])[..., 1:])  # token 0 is the scorer
            kept_ov.append(np.asarray(stats["kept_overlap"])[..., 1:])
        if stats.get("layer_overlap") is not None:
            lay_ov.append(np.asarray(stats["layer_overlap"]))
        if stats.get("keys") is not None:  # share of the block's context the set holds
            keys.append(np.asarray(stats["keys"]) / (start + k + 1))
        elif settings is not None and index is None:
            keys.append(min(settings.block_budget * page, start + k + 1) / (start + k + 1)
                        if settings.block_budget else 1.0)
    mean = lambda x: float(np.mean(x)) if x else None  # noqa: E731
    return float(np.mean(nll)), mean(tok_ov), mean(kept_ov), mean(lay_ov), cost, mean(keys)


def dense_nll(cfg, variables, seqs, prompt_len):
    """The dense model's mean NLL of tokens after `prompt_len` (full forward, no cache)."""
    logits = jax.jit(LongCatModel(cfg).apply)(variables, jnp.asarray(seqs))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)[:, prompt_len - 1:-1]
    target = jnp.asarray(seqs[:, prompt_len:])
    return float(-jnp.mean(jnp.take_along_axis(logp, target[..., None], -1)))


def calibrate_chess(config, variables, tokenizer, sparsity: float, count: int = 8, length: int = 512):
    """CHESS thresholds (lcjax.sparsity.chess) from `count` training-split stdlib sequences."""
    from lcjax.sparsity.chess import calibrate

    seqs = []
    for path in stdlib_corpus("train", config.data.heldout_fraction)[::50]:
        ids = tokenizer.encode(path.read_text(errors="replace"))
        if len(ids) >= length:
            seqs.append(ids[:length])
        if len(seqs) == count:
            break
    batches = [np.asarray(seqs[i:i + 2], np.int32) for i in range(0, len(seqs), 2)]
    return calibrate(config, variables, batches, sparsity=sparsity, method="chess")


def calibrate_a2ats(config, variables, tokenizer, args):
    """A2ATSIndex from `--a2ats-calib-seqs` train-split files of `--context` tokens."""
    from lcjax.serve.retrieval_flags import a2ats_config
    from lcjax.sparsity.a2ats_calibrate import calibrate

    seqs = heldout_sequences(tokenizer, config.data.heldout_fraction, args.context,
                             args.a2ats_calib_seqs, split="train")
    return calibrate(config.model, variables, [seqs[i:i + 4] for i in range(0, len(seqs), 4)],
                     a2ats_config(args.a2ats))


# ------------------------------------------------------------------------------ quality
def quality(args) -> list[dict]:
    config, variables, tokenizer = load_run(args.run)
    cfg = config.model
    k, page = args.num_speculative_tokens, args.page_size
    seqs = heldout_sequences(tokenizer, config.data.heldout_fraction, args.context + args.new_tokens,
                             args.num_prompts)
    prompts = [list(map(int, s[:args.context])) for s in seqs]
    ec = dict(max_num_seqs=args.num_prompts, max_model_len=args.context + args.new_tokens + 8,
              page_size=page, prefill_chunk=256, max_prefill_seqs=args.num_prompts,
              num_speculative_tokens=k)
    full_layers = sum(not s for s in cfg.sparse_layers)
    rows, dense_tokens, chess, a2ats_index = [], None, None, None
    for text in ["dense"] + args.settings:
        index = None
        if text == "a2ats" or text.endswith("+a2ats"):
            a2ats_index = a2ats_index or calibrate_a2ats(config, variables, tokenizer, args)
            index = a2ats_index
        core = text.removesuffix("+a2ats").removesuffix("+chess")
        settings = None if core in ("dense", "a2ats") else _settings(core)
        run_vars = variables
        if text.endswith("+chess"):  # CHESS thresholds on the verify pass's FFNs and experts
            chess = chess or calibrate_chess(config, variables, tokenizer, args.chess_sparsity)
            run_vars = sv.with_verify_thresholds(variables, chess)
        engine = Engine(config, run_vars, tokenizer, EngineConfig(**ec, sparse_verify=settings),
                        kv_retrieval=index)
        t0 = time.perf_counter()
        outs = engine.generate(prompts, SamplingParams(max_tokens=args.new_tokens, temperature=0.0,
                                                       ignore_eos=True))
        wall = time.perf_counter() - t0
        st = engine.stats()
        tokens = [o.token_ids for o in outs]
        dense_tokens = dense_tokens or tokens
        same = np.mean([a == b for x, y in zip(tokens, dense_tokens) for a, b in zip(x, y)])
        gen = np.asarray([p + t for p, t in zip(prompts, tokens)], np.int32)
        tf_nll, tok_ov, kept_ov, lay_ov, cost, keys = teacher_forced(cfg, run_vars, seqs, args.context,
                                                               k, page, settings, index=index)
        an = sv.attention_cost(settings or sv.SparseVerifyConfig(block_budget=0), args.context + k + 1,
                               k + 1, page, cfg.mla.num_heads,
                               cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim, cfg.mla.kv_lora_rank,
                               full_layers, 4)
        if settings is None:
            an["sparse_flops"], an["sparse_bytes"] = an["dense_flops"], an["dense_bytes"]
        if index is not None:  # Quest's cost model does not describe A²ATS
            an["sparse_flops"] = an["sparse_bytes"] = None
        row = dict(setting=text, acceptance_length=1 + st.accepted_tokens_total / max(st.spec_rounds_total, 1),
                   same_as_dense=float(same), generated_nll_dense_model=dense_nll(cfg, variables, gen, args.context),
                   verify_nll=tf_nll, keys_attended=keys, token_overlap=tok_ov, kept_overlap=kept_ov, layer_overlap=lay_ov,
                   xla_flops=cost["flops"], xla_bytes=cost["bytes"],
                   attn_flops_ratio=an["sparse_flops"] and an["sparse_flops"] / an["dense_flops"],
                   attn_bytes_ratio=an["sparse_bytes"] and an["sparse_bytes"] / an["dense_bytes"],
                   wall_s=wall)
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]
    print(f"\n{'setting':44s} {'acc.len':>7s} {'=dense':>6s} {'gen NLL':>7s} {'verify NLL':>10s} "
          f"{'keys':>5s} "
          f"{'tok J':>5s} {'kept J':>6s} {'lay J':>5s} {'XLA fl':>6s} {'XLA B':>6s} {'attn fl':>7s} "
          f"{'attn B':>6s}")
    for r in rows:
        f = lambda v: "  -  " if v is None else f"{v:.3f}"  # noqa: E731
        print(f"{r['setting']:44s} {r['acceptance_length']:7.3f} {r['same_as_dense']:6.3f} "
              f"{r['generated_nll_dense_model']:7.3f} {r['verify_nll']:10.4f} {f(r['keys_attended']):>5s} "
              f"{f(r['token_overlap']):>5s} "
              f"{f(r['kept_overlap']):>6s} "
              f"{f(r['layer_overlap']):>5s} {r['xla_flops'] / base['xla_flops']:6.3f} "
              f"{r['xla_bytes'] / base['xla_bytes']:6.3f} {f(r['attn_flops_ratio']):>7s} "
              f"{f(r['attn_bytes_ratio']):>6s}")
    return rows


# ------------------------------------------------------------------------------ timing
def timing(args, config=None) -> list[dict]:
    """Median time of one MTP round (drafts + verify) dense vs sparse over a filled random cache."""
    if config is None:
        config = load_config(resolve_config_path(args.model),
                             [f"model.max_position_embeddings={max(args.contexts) + 64}",
                              "model.mtp_layers=1", *args.overrides])
    config, variables, _ = random_model(config, seed=0)
    cfg = config.model
    k, page, b = args.num_speculative_tokens, args.page_size, args.batch
    rows = []
    for context in args.contexts:
        pages = -(-(context + k + 1) // page)
        state = runner.init_engine_state(cfg, b, b * pages + 1, page, k, page_bounds=True)
        rng = np.random.default_rng(0)
        tables = jnp.asarray(1 + np.arange(b * pages).reshape(b, pages), jnp.int32)
        dtype = state.cache.mtp.dtype
        # A filled cache: random latent rows in every pool (bounds from them), pending MTP input.
        layers, bounds = [], []
        for held, bnd in zip(state.cache.layers, state.cache.bounds):
            if bnd is None:
                layers.append(held)
                bounds.append(None)
                continue
            pool = jnp.asarray(rng.normal(size=held.shape), dtype)
            layers.append(pool)
            bounds.append(jnp.stack([pool.min(1), pool.max(1)], 1))
        cache = state.cache.replace(layers=tuple(layers), bounds=tuple(bounds))
        state = state.replace(cache=cache, pending_count=jnp.ones((b,), jnp.int32),
                              pending_start=jnp.full((b,), context - 1, jnp.int32))
        inp = runner.StepInputs(
            tokens=jnp.ones((b, 1), jnp.int32), slots=jnp.arange(b, dtype=jnp.int32),
            starts=jnp.full((b,), context, jnp.int32), num_valid=jnp.ones((b,), jnp.int32),
            block_tables=tables, reset=jnp.zeros((b,), bool), seeds=jnp.zeros((b,), jnp.uint32),
            gen_steps=jnp.zeros((b,), jnp.int32),
            sampling=sampling_tensors([SamplingParams(temperature=0.0)] * b, b),
            bias=jnp.zeros((b, cfg.vocab_size), jnp.float32), num_draft=jnp.full((b,), k, jnp.int32))
        block = (cfg, variables, cache, jnp.ones((b, k + 1), jnp.int32),
                 jnp.full((b,), context, jnp.int32), tables)
        for text in ["dense"] + args.settings:
            settings = None if text == "dense" else _settings(text)
            with_round = not getattr(args, "verify_only", False)
            if with_round:
                step = jax.jit(functools.partial(runner.speculative_step, cfg, num_draft=k,
                                                 sparse_verify=settings))
                compiled = step.lower(variables, state, inp).compile()
            # The verify pass alone: the main model over k+1 tokens (no drafts, no sampling).
            verify = _step.lower(*block, all_valid=True, settings=settings).compile()
            analysis = verify.cost_analysis()
            analysis = analysis[0] if isinstance(analysis, list) else analysis
            round_s = (_median_time(lambda: compiled(variables, state, inp), args.repeats)
                       if with_round else float("nan"))
            verify_s = _median_time(lambda: verify(*block[1:]), args.repeats)
            rows.append(dict(context=context, setting=text, round_ms=1e3 * round_s,
                             verify_ms=1e3 * verify_s, tok_s_per_acceptance=b / round_s,
                             verify_xla_flops=float(analysis.get("flops", 0)),
                             verify_xla_bytes=float(analysis.get("bytes accessed", 0))))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'context':>7s} {'setting':34s} {'round ms':>9s} {'x dense':>7s} {'verify ms':>9s} "
          f"{'x dense':>7s} {'XLA fl':>6s} {'XLA B':>6s}")
    for r in rows:
        base = next(x for x in rows if x["context"] == r["context"] and x["setting"] == "dense")
        print(f"{r['context']:7d} {r['setting']:34s} {r['round_ms']:9.2f} "
              f"{r['round_ms'] / base['round_ms']:7.3f} {r['verify_ms']:9.2f} "
              f"{r['verify_ms'] / base['verify_ms']:7.3f} "
              f"{r['verify_xla_flops'] / base['verify_xla_flops']:6.3f} "
              f"{r['verify_xla_bytes'] / base['verify_xla_bytes']:6.3f}")
    return rows


def _median_time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # warm
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def add_timing_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")],
                   default=[4096, 8192, 16384, 32768])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--verify-only", action="store_true",
                   help="time the verify pass alone (skip compiling the whole MTP round)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=("quality", "timing"))
    p.add_argument("--run", default="runs/stdlib_tiny_2k")
    p.add_argument("--model", default="small", help="timing: preset (random weights)")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--num-speculative-tokens", type=int, default=3)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--settings", nargs="+", default=["block_budget=16", "block_budget=32"],
                   help="sparse settings, key=v;key=v each")
    p.add_argument("--chess-sparsity", type=float, default=0.5,
                   help="quality: CHESS target sparsity of settings ending in +chess")
    p.add_argument("--a2ats", default="topk_fraction=0.03,codebook_size=1024,kmeans_iters=20",
                   help="quality: A2ATSConfig of settings 'a2ats' / '...+a2ats' (KEY=V,..)")
    p.add_argument("--a2ats-calib-seqs", type=int, default=8)
    p.add_argument("--json")
    p.add_argument("overrides", nargs="*", help="timing: model overrides key=value")
    add_timing_flags(p)
    args = p.parse_args(argv)
    rows = quality(args) if args.mode == "quality" else timing(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(mode=args.mode, device=jax.devices()[0].device_kind, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
