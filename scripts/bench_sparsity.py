"""Decode-time sparsity: A²ATS retrieval vs exact attention, and N-gram tables off the device.

    python scripts/bench_sparsity.py --json bench_sparsity.json

1. A²ATS, per full-attention sublayer of `small` (configs/models/small.yaml: 16 heads, latent
   C=128 + rope R=32, 16 full sublayers), one decode token per sequence over a paged cache of
   each context length: the step time of exact paged attention (the engine's all-valid path),
   of A²ATS with the pages on the device, and of A²ATS with the pages in host memory (only codes
   on the device; the retrieved rows move per step). Random pages, codes and codebook: the work
   does not depend on their values. Device KV bytes per sequence are for all 16 sublayers: exact
   = every latent row; A²ATS on device = rows + codes; host offload = codes + one sublayer's
   gathered rows (a transient buffer each sublayer reuses, sized for the worst case H * k + sinks +
   window); the codebooks, shared by all sequences, are listed apart. "read ratio": bytes one
   decode token reads per sublayer, A²ATS (codes + centroid table share + gathered rows) over
   exact (every row): the algorithmic saving, independent of the machine.
2. N-gram tables (Flash-Lite's 12 tables, rows scaled down by --ngram-scale): the embedding
   step of a decode batch with the tables on the device and in host memory, and the device bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.config import LozaConfig
from lcjax.config_io import load_config, resolve_config_path
from lcjax.ops import attention as attention_op
from lcjax.serve.kv_cache import PagedLayerCache
from lcjax.sparsity.a2ats import A2ATSConfig, Codebook, code_dtype
from lcjax.sparsity.a2ats_cache import RetrievalPagedCache
from lcjax.sparsity.host_offload import device_bytes, host_memory_kind, to_host


def timed(fn, *args, reps: int) -> float:
    """Fastest of `reps` timed calls (after a warm-up call): the least disturbed by other load."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.min(times))


def attention_case(mla, context: int, batch: int, page: int, a2: A2ATSConfig, reps: int) -> dict:
    c, r, h = mla.kv_lora_rank, mla.qk_rope_head_dim, mla.num_heads
    d = c + r
    pages_per_seq = math.ceil((context + 1) / page)
    num_pages = batch * pages_per_seq + 1
    key = jax.random.key(0)
    pages = jax.random.normal(key, (num_pages, page, d), jnp.float32)
    tables = jnp.arange(1, num_pages, dtype=jnp.int32).reshape(batch, pages_per_seq)
    codes = jax.random.randint(key, (num_pages, page), 0, a2.codebook_size).astype(code_dtype(a2.codebook_size))
    cents = jax.random.normal(key, (a2.codebook_size, d), jnp.float32)
    book = Codebook(centroids=cents, centroids_l=cents, transform=jnp.eye(d))
    q = jax.random.normal(key, (batch, 1, h, d), jnp.float32)
    new = (jax.random.normal(key, (batch, 1, c)), jax.random.normal(key, (batch, 1, r)))
    positions = jnp.full((batch, 1), context, jnp.int32)
    valid = jnp.ones((batch, 1), bool)

    def attend(qq, k, v, **kw):
        return attention_op.attention(qq, k, v, layout=attention_op.CausalLayout(),
                                      scale=mla.softmax_scale, **kw)

    def step(view):
        out, new_view = view.update_and_attend(q, *new, positions, valid, sparse=False,
                                               loza=LozaConfig(), attend=attend,
                                               scale=mla.softmax_scale)
        return out, new_view.pages

    exact_fn = jax.jit(lambda p: step(PagedLayerCache(pages=p, block_tables=tables, kv_lora_rank=c,
                                                      all_valid=True)))
    a2_fn = jax.jit(lambda p, cd, b: step(RetrievalPagedCache(
        pages=p, codes=cd, block_tables=tables, book=b, kv_lora_rank=c, rope=mla.rope, config=a2,
        all_valid=True)))
    row = dict(context=context, batch=batch)
    row["exact_ms"] = 1e3 * timed(exact_fn, pages, reps=reps)
    row["a2ats_ms"] = 1e3 * timed(a2_fn, pages, codes, book, reps=reps)
    if host_memory_kind() is not None:
        row["a2ats_host_ms"] = 1e3 * timed(a2_fn, to_host(pages), codes, book, reps=reps)
    # Bytes per sequence over every full sublayer.
    n_full = 16
    kmax = a2.topk_for(pages_per_seq * page)
    gathered = min(pages_per_seq * page, h * kmax + a2.sink_tokens + a2.local_window)
    if a2.max_gather_fraction is not None:
        gathered = min(gathered, math.ceil(a2.max_gather_fraction * pages_per_seq * page)
                       + a2.sink_tokens + a2.local_window)
    rows_bytes = context * d * 4
    code_bytes = context * jnp.dtype(code_dtype(a2.codebook_size)).itemsize
    row["exact_kv_mib"] = n_full * rows_bytes / 2**20
    row["a2ats_device_kv_mib"] = n_full * (rows_bytes + code_bytes) / 2**20
    # The gathered rows live only while their sublayer attends: one buffer, reused by all.
    row["a2ats_host_device_kv_mib"] = (n_full * code_bytes + gathered * d * 4) / 2**20
    # Bytes one decode token reads per sublayer: every row (exact) vs codes + its heads' centroid
    # tables (K x D, read once per step for all rows) + the gathered rows (A²ATS).
    row["exact_read_kib"] = rows_bytes / 2**10
    row["a2ats_read_kib"] = (code_bytes + a2.codebook_size * d * 4 / batch + gathered * d * 4) / 2**10
    row["codebooks_mib_shared"] = n_full * 2 * a2.codebook_size * d * 4 / 2**20
    return row


def ngram_case(scale: int, batch: int, reps: int) -> dict:
    """Embedding step of `batch` decode tokens, Flash-Lite's tables scaled down by `scale`."""
    from lcjax.model.embedding import Embedder
    lite = load_config(resolve_config_path("longcat_flash_lite")).model
    import dataclasses
    cfg = dataclasses.replace(lite, vocab_size=lite.vocab_size // scale, dtype="float32",
                              param_dtype="float32")
    ids = jnp.zeros((1, 4), jnp.int32)
    variables = jax.jit(Embedder(cfg).init)(jax.random.key(0), ids)
    variables = jax.tree.map(lambda x: getattr(x, "value", x), variables,
                             is_leaf=lambda x: hasattr(x, "value"))
    from lcjax.sparsity.host_offload import offload_ngram_tables
    moved = offload_ngram_tables(variables)
    tokens = jax.random.randint(jax.random.key(1), (batch, 1), 3, cfg.vocab_size)
    history = jax.random.randint(jax.random.key(2), (batch, cfg.ngram.neighbor_num - 1), 3, cfg.vocab_size)
    run = jax.jit(lambda v, t, hst: Embedder(cfg).apply(v, t, None, hst))
    same = bool(np.array_equal(run(variables, tokens, history), run(moved, tokens, history)))
    return dict(vocab=cfg.vocab_size, tables=cfg.ngram.num_tables,
                rows_per_table=cfg.ngram.vocab_size_ratio * cfg.vocab_size,
                dim=cfg.ngram_table_dim, batch=batch, equal_outputs=same,
                device_mib=device_bytes(variables) / 2**20, offload_device_mib=device_bytes(moved) / 2**20,
                device_ms=1e3 * timed(run, variables, tokens, history, reps=reps),
                offload_ms=1e3 * timed(run, moved, tokens, history, reps=reps))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="4096,8192,16384,32768")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--topk", type=float, default=0.03)
    p.add_argument("--codebook", type=int, default=4096)
    p.add_argument("--max-gather", type=float, default=None,
                   help="A2ATSConfig.max_gather_fraction (default: room for the whole union)")
    p.add_argument("--ngram-scale", type=int, default=256, help="Flash-Lite vocab divided by this")
    p.add_argument("--ngram-batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args(argv)
    mla = load_config(resolve_config_path("small")).model.mla
    a2 = A2ATSConfig(topk_fraction=args.topk, codebook_size=args.codebook,
                     max_gather_fraction=args.max_gather)
    rows = []
    print(f"A²ATS vs exact, one full sublayer of small (H={mla.num_heads}, C+R="
          f"{mla.kv_lora_rank + mla.qk_rope_head_dim}), batch {args.batch}, top {args.topk:.0%}, "
          f"{args.codebook} centroids, gather cap {args.max_gather}; {jax.devices()[0].device_kind}")
    print(f"{'context':>8} {'exact ms':>9} {'a2ats ms':>9} {'ratio':>6} {'host ms':>8} {'ratio':>6} "
          f"{'exact KV MiB':>12} {'a2ats dev':>10} {'host dev':>9} {'ratio':>6} {'read ratio':>10}")
    for ctx in (int(x) for x in args.contexts.split(",")):
        r = attention_case(mla, ctx, args.batch, args.page_size, a2, args.reps)
        rows.append(r)
        host = r.get("a2ats_host_ms", float("nan"))
        print(f"{ctx:>8} {r['exact_ms']:>9.2f} {r['a2ats_ms']:>9.2f} {r['a2ats_ms'] / r['exact_ms']:>6.2f} "
              f"{host:>8.2f} {host / r['exact_ms']:>6.2f} {r['exact_kv_mib']:>12.1f} "
              f"{r['a2ats_device_kv_mib']:>10.1f} {r['a2ats_host_device_kv_mib']:>9.2f} "
              f"{r['a2ats_host_device_kv_mib'] / r['exact_kv_mib']:>6.3f} "
              f"{r['a2ats_read_kib'] / r['exact_read_kib']:>10.3f}", flush=True)
    print(f"(codebooks, shared by all sequences: {rows[0]['codebooks_mib_shared']:.1f} MiB)")
    ng = ngram_case(args.ngram_scale, args.ngram_batch, args.reps)
    print(f"\nN-gram tables (Flash-Lite / {args.ngram_scale}: {ng['tables']} tables x "
          f"{ng['rows_per_table']} rows x {ng['dim']}), embedding of {ng['batch']} decode tokens: "
          f"device {ng['device_mib']:.1f} MiB, {ng['device_ms']:.2f} ms; tables on host: device "
          f"{ng['offload_device_mib']:.2f} MiB, {ng['offload_ms']:.2f} ms; outputs equal: {ng['equal_outputs']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(attention=rows, ngram=ng, topk=args.topk, codebook=args.codebook,
                           max_gather=args.max_gather,
                           page_size=args.page_size, device=jax.devices()[0].device_kind), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
