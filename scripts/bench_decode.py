"""Decode throughput: lcjax's serving engine vs transformers `generate`, and the HBM roofline.

    python scripts/bench_decode.py                                  # small, bf16, batch 1 and 16
    python scripts/bench_decode.py --num-speculative-tokens 2 model.mtp_layers=1   # + MTP rounds
    python scripts/bench_decode.py --smoke                          # tiny, f32, CPU, < 2 min
    python scripts/bench_decode.py --sparse-verify "block_budget=64" --dtype float32
        # one MTP round, dense vs sparse verify, at --contexts (scripts/bench_sparse_verify.py)

One process, one random model: lcjax variables are initialised for the preset, written as a
Hugging Face directory with `lcjax.convert.save_hf_checkpoint` and loaded by transformers'
`LongcatFlashForCausalLM` (torch CUDA when available, else CPU), so both run the same weights on
the same prompts (random token ids, batch x prompt_len), greedily, for exactly `new_tokens` tokens
(EOS ignored).

Decode is timed apart from prefill on both sides:
- lcjax: the Engine (`lcjax.serve`) with every request queued at once; compiles are warmed up by
  a first run of the same shapes, then each timed run (the fastest of `--repeats` counts) clocks `engine.step()` from the step after
  the one that sampled every request's first token until all finish. tok/s = tokens generated
  in those steps / their time; with `--num-speculative-tokens k` a step is one MTP round, and the
  acceptance length (mean accepted drafts + 1 per row and round) comes from the engine counters.
- transformers: the decode time is generate(new_tokens) - generate(1) (both after a warm-up,
  fastest of `--repeats`), over batch x (new_tokens - 1) tokens.

Roofline (memory-bound decode): bytes one step must read = weights + KV cache, over the step time,
as a fraction of `--hbm-gbps`. Weights: the activated non-expert parameters of
`lcjax.count_params` (attention, dense MLPs, router, lm_head; embedding rows excluded) plus, per
layer, the routed experts a step's T tokens touch, E * (1 - (1 - k/(E+Z))^T) under uniform
routing (T = batch, or batch * (k_spec + 1) when verifying). KV cache: per row, (C + R) latent
values per context token for each full-attention sublayer and at most the ring size for each
LoZA sparse sublayer, at the mean context prompt_len + new_tokens / 2. MTP rounds add k reads of
the MTP head (and of the lm_head) and of its cache. On a CPU the fraction is printed but means
nothing (the default bandwidth is an H100 SXM's).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lcjax import count_params  # noqa: E402
from lcjax.config import Config  # noqa: E402
from lcjax.config_io import load_config, resolve_config_path  # noqa: E402
from lcjax.model import LongCatModel  # noqa: E402
from lcjax.params_count import expert_params, mtp_params  # noqa: E402
from lcjax.serve.engine import Engine, EngineConfig  # noqa: E402
from lcjax.serve.sampling import SamplingParams  # noqa: E402

BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


# ------------------------------------------------------------------------------ model
def build_config(model: str, dtype: str, overrides: list[str]) -> Config:
    # transformers has no n-gram embedding (Flash-Lite), so tiny's is switched off here.
    base = ["model.ngram.enabled=false"] if model == "tiny" else []
    return load_config(resolve_config_path(model),
                       [*base, f"model.dtype={dtype}", f"model.param_dtype={dtype}", *overrides])


def init_variables(config: Config, seed: int) -> dict:
    ids = jnp.zeros((1, 8), jnp.int32)
    return dict(nn.unbox(jax.jit(LongCatModel(config.model).init)(jax.random.key(seed), ids)))


# ------------------------------------------------------------------------------ roofline
def bytes_per_step(config: Config, batch: int, context: float, k: int) -> dict:
    """Bytes one decode step (k = 0) or MTP round (k drafts) reads: weights and KV cache."""
    cfg = config.model
    w = BYTES[cfg.param_dtype]
    moe = cfg.moe
    counts = count_params(cfg)
    tokens = batch * (k + 1)
    touched = moe.num_experts * (1 - (1 - moe.top_k / moe.num_router_outputs) ** tokens)
    weights = (counts.activated_min + cfg.num_layers * touched * expert_params(cfg)) * w
    width = (cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim) * BYTES[cfg.dtype]
    per_row = sum(min(context, cfg.loza.cache_tokens) if sparse else context for sparse in cfg.sparse_layers)
    kv = batch * per_row * width
    if k:  # each draft reads the MTP head (its embedding: one row) and the shared lm_head
        weights += k * (mtp_params(cfg) - cfg.vocab_size * cfg.hidden_size
                        + cfg.hidden_size * cfg.vocab_size) * w
        kv += k * batch * context * width
    return {"weights": weights, "kv": kv, "total": weights + kv}


# ------------------------------------------------------------------------------ lcjax
def lcjax_decode(config: Config, variables: dict, prompts: np.ndarray, new_tokens: int, k: int,
                 attention_impl, repeats: int) -> dict:
    """A warm-up run, then the fastest of `repeats` timed ones; decode steps are timed apart from
    the prefill step(s)."""
    batch, prompt_len = prompts.shape
    engine = Engine(config, variables, None, EngineConfig(
        max_num_seqs=batch, max_model_len=prompt_len + new_tokens + k + 1, page_size=16,
        prefill_chunk=max(16, prompt_len), max_prefill_seqs=batch, num_speculative_tokens=k,
        attention_impl=attention_impl))
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    def run():
        before = engine.stats()
        ids = [engine.add_request(p.tolist(), params) for p in prompts]
        first: set = set()
        steps, start = 0, None
        tokens = {i: 0 for i in ids}
        t_prefill = time.perf_counter()
        while engine.has_unfinished():
            outs = engine.step()
            if start is not None:
                steps += 1
            for out in outs:
                tokens[out.request_id] = out.num_generated_tokens
                first.add(out.request_id)
            if start is None and len(first) == batch:
                start = time.perf_counter()
                prefill_s = start - t_prefill
                tokens_at_start = sum(tokens.values())
        decode_s = time.perf_counter() - start
        after = engine.stats()
        row_rounds = (after.draft_tokens_total - before.draft_tokens_total) / k if k else 0
        accepted = after.accepted_tokens_total - before.accepted_tokens_total
        return {"prefill_s": prefill_s, "decode_s": decode_s, "decode_steps": steps,
                "decode_tokens": sum(tokens.values()) - tokens_at_start,
                "acceptance_length": 1 + accepted / row_rounds if row_rounds else None}

    t = time.perf_counter()
    run()
    warmup_s = time.perf_counter() - t
    result = min((run() for _ in range(repeats)), key=lambda r: r["decode_s"] / r["decode_tokens"])
    result.update(warmup_s=warmup_s, step_s=result["decode_s"] / max(result["decode_steps"], 1),
                  tok_s=result["decode_tokens"] / result["decode_s"],
                  compilations=engine.stats().num_compilations)
    return result


# ------------------------------------------------------------------------------ transformers
def hf_decode(config: Config, variables: dict, prompts: np.ndarray, new_tokens: int, dtype: str,
              attn: str, repeats: int, threads: int) -> dict:
    import torch

    from hf_peer import load_transformers_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and threads:
        # Two thread pools (XLA's and torch's OpenMP one) on a small CPU: steps of torch's MoE
        # were seen to take 1 s instead of 3 ms; tests/convert pins torch to one thread too.
        torch.set_num_threads(threads)
    model = load_transformers_model(variables, config, dtype=dtype, attn_implementation=attn,
                                    device=device).eval()
    model.generation_config.eos_token_id = None  # exactly new_tokens, as ignore_eos
    model.generation_config.pad_token_id = config.model.pad_token_id
    ids = torch.as_tensor(prompts, device=device)
    mask = torch.ones_like(ids)

    def generate(n: int) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False)
        if device == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == prompts.shape[1] + n, out.shape
        return time.perf_counter() - t

    generate(2)  # warm-up
    t1 = min(generate(1) for _ in range(max(repeats, 2)))
    tn = min(generate(new_tokens) for _ in range(repeats))
    decode_s = tn - t1
    tokens = prompts.shape[0] * (new_tokens - 1)
    return {"device": device, "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "prefill_s": t1, "decode_s": decode_s,
            "decode_tokens": tokens, "tok_s": tokens / decode_s, "step_s": decode_s / (new_tokens - 1)}


# ------------------------------------------------------------------------------ main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small", help="preset: small | tiny (or any configs/models name)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(BYTES))
    p.add_argument("--num-speculative-tokens", type=int, default=0,
                   help="also run lcjax with k MTP drafts per round (the model needs an MTP head)")
    p.add_argument("--attention-impl", help="paged decode backend (default: the platform's)")
    p.add_argument("--hf-attn", default="sdpa", help="transformers attn_implementation")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch CPU threads (default 1, see hf_decode; 0 = torch's default)")
    p.add_argument("--hbm-gbps", type=float, default=3350.0, help="HBM bandwidth in GB/s (H100 SXM: 3350)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per measurement; the fastest counts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny, float32, batch 1 and 4, 32 + 32 tokens, k=2")
    p.add_argument("--json", default="bench_decode.json")
    p.add_argument("--sparse-verify", nargs="+", metavar="KEY=V;..",
                   help="instead: time one MTP round (k = --num-speculative-tokens, default 3) "
                        "with dense and with each sparse verify setting over a filled cache at "
                        "--contexts, batch --batch[0] (scripts/bench_sparse_verify.py timing)")
    p.add_argument("--contexts", default="4096,8192,16384,32768")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. model.mtp_layers=1")
    args = p.parse_args()
    if args.sparse_verify:
        import bench_sparse_verify  # scripts/ is on sys.path when this file runs

        contexts = [int(c) for c in args.contexts.split(",")]
        config = build_config(args.model, args.dtype, [
            f"model.max_position_embeddings={max(contexts) + 64}", "model.mtp_layers=1", *args.overrides])
        ns = argparse.Namespace(settings=args.sparse_verify, contexts=contexts, batch=args.batch[0],
                                repeats=max(args.repeats, 3), page_size=16,
                                num_speculative_tokens=args.num_speculative_tokens or 3)
        rows = bench_sparse_verify.timing(ns, config)
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M:%S"), "model": args.model,
                       "dtype": args.dtype, "device": jax.devices()[0].device_kind,
                       "sparse_verify": rows}, f, indent=2)
        return
    if args.smoke:
        args.model, args.dtype, args.batch, args.prompt_len, args.new_tokens = "tiny", "float32", [1, 4], 32, 32
        args.num_speculative_tokens = args.num_speculative_tokens or 2
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (the first token comes from the prefill)")
    config = build_config(args.model, args.dtype, args.overrides)
    variables = init_variables(config, args.seed)
    platform_name = jax.devices()[0].platform
    context = args.prompt_len + args.new_tokens / 2
    rows, header = [], None
    for batch in args.batch:
        prompts = np.random.default_rng([args.seed, batch]).integers(
            3, config.model.vocab_size, (batch, args.prompt_len)).astype(np.int32)
        runs = {"lcjax": lcjax_decode(config, variables, prompts, args.new_tokens, 0, args.attention_impl,
                                      args.repeats)}
        if args.num_speculative_tokens:
            k = args.num_speculative_tokens
            runs[f"lcjax k={k}"] = lcjax_decode(config, variables, prompts, args.new_tokens, k,
                                               args.attention_impl, args.repeats)
        if not args.no_hf:
            runs["transformers"] = hf_decode(config, variables, prompts, args.new_tokens, args.dtype,
                                             args.hf_attn, args.repeats, args.torch_threads)
        for name, r in runs.items():
            k = args.num_speculative_tokens if name.startswith("lcjax k=") else 0
            need = bytes_per_step(config, batch, context, k)
            r.update(name=name, batch=batch, bytes_per_step=need,
                     roofline_fraction=need["total"] / r["step_s"] / (args.hbm_gbps * 1e9))
            if k:
                r["speedup_vs_k0"] = r["tok_s"] / runs["lcjax"]["tok_s"]
            rows.append(r)
    header = (f"{'run':<16}{'batch':>6}{'decode tok/s':>14}{'step ms':>10}{'MB/step':>10}"
              f"{'roofline':>10}{'accept len':>12}{'vs k=0':>8}")
    note = " (n-gram embedding off: transformers has none)" if args.model == "tiny" else ""
    print(f"model {args.model}{note} ({count_params(config.model).total / 1e6:.2f}M params), {args.dtype}, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, JAX on {jax.devices()[0].device_kind}")
    print(header)
    for r in rows:
        accept = "-" if r.get("acceptance_length") is None else f"{r['acceptance_length']:.2f}"
        speedup = f"{r['speedup_vs_k0']:.2f}x" if "speedup_vs_k0" in r else "-"
        print(f"{r['name']:<16}{r['batch']:>6}{r['tok_s']:>14,.1f}{1e3 * r['step_s']:>10.2f}"
              f"{r['bytes_per_step']['total'] / 1e6:>10.2f}{r['roofline_fraction']:>10.2%}"
              f"{accept:>12}{speedup:>8}")
    if platform_name == "cpu":
        print(f"(CPU: the roofline fraction uses --hbm-gbps {args.hbm_gbps:g} and means nothing here)")
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "model": args.model, "dtype": args.dtype,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "hbm_gbps": args.hbm_gbps,
              "device": jax.devices()[0].device_kind, "platform": platform_name, "jax": jax.__version__,
              "python": platform.python_version(), "overrides": args.overrides,
              "params": dataclasses.asdict(count_params(config.model)), "runs": rows}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
