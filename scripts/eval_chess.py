"""Held-out perplexity and activated-parameter fraction of a trained run under CATS / CHESS /
CHESS+ activation sparsity at several target sparsities.

    python scripts/eval_chess.py --run runs/stdlib_tiny_2k --json chess_quality.json

Calibration: the first `--calib-batches` batches of the train split (one forward each; the
thresholds of every method and s come from the same recorded activations). Perplexity =
exp(mean token cross-entropy) of the main head over the trainer's held-out batches
(`data_setup.eval_batches`, the split training evaluates on).

Columns: "FFN sparsity" is the fraction of FFN intermediate channels (dense MLPs and routed
experts, token-weighted) zeroed on the first `--activity-batches` held-out batches; "active
params" is the weights a token reads with sparsity over those it reads dense, over the main
model's non-embedding matmul weights: attention (q_a, q_b, kv_a, kv_b, o), the dense MLPs, the
router and the routed experts of its non-zero slots. A zeroed FFN channel skips its W_up column
and W_down row (W_gate is always read: it decides); a zeroed q_a / o input channel skips that
weight row. Embeddings, lm_head and the MTP head are not counted.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lcjax.model import LongCatModel
from lcjax.serve.loading import load_run
from lcjax.sparsity import chess
from lcjax.train import data_setup


def _eval_fn(cfg):
    @jax.jit
    def run(variables, batch):
        logits = LongCatModel(cfg).apply(variables, batch["inputs"], batch["segment_ids"],
                                         batch["positions"]).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
        mask = batch["loss_mask"]
        return jnp.sum((lse - target) * mask), jnp.sum(mask)
    return run


def perplexity(run, variables, batches) -> tuple[float, float]:
    ce, tokens = 0.0, 0.0
    for batch in batches:
        s, n = run(variables, batch)
        ce, tokens = ce + float(s), tokens + float(n)
    mean = ce / max(tokens, 1.0)
    return math.exp(mean), mean


def weight_reads(cfg, seen) -> tuple[float, float, float]:
    """(weights read with sparsity, dense, FFN channel sparsity), summed over the sites of the main
    model in `seen` (chess.activity). See the module docstring for what counts."""
    a, moe = cfg.mla, cfg.moe
    m, q, c, r, h = cfg.hidden_size, a.q_lora_rank, a.kv_lora_rank, a.qk_rope_head_dim, a.num_heads
    sparse = dense = ffn_active = ffn_all = 0.0
    tokens = None
    for path, st in seen.items():
        if path[0] == "mtp":
            continue
        act, rows, ch = float(np.sum(st["active"])), float(np.sum(st["rows"])), st["channels"]
        site = path[-1]
        if site == "gate":  # W_gate always, W_up columns / W_down rows of active channels
            dense += rows * 3 * m * ch
            sparse += rows * m * ch + 2 * m * act
            ffn_active, ffn_all = ffn_active + act, ffn_all + rows * ch
            if path[-2] != "moe":
                tokens = float(np.max(st["rows"])) if tokens is None else tokens
        elif site == "q_a":  # rows of W_q_a [M, Q]
            dense += rows * ch * q
            sparse += act * q
        elif site == "o":  # rows of W_o [H*Dv, M]
            dense += rows * ch * m
            sparse += act * m
    # Never thresholded, per token: q_b, kv_a, kv_b of each attention sublayer; the router.
    other = 2 * (q * h * a.qk_head_dim + m * (c + r) + c * h * (a.qk_nope_head_dim + a.v_head_dim))
    other = cfg.num_layers * (other + m * moe.num_router_outputs) * (tokens or 0.0)
    return sparse + other, dense + other, 1.0 - ffn_active / max(ffn_all, 1.0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/stdlib_tiny_2k")
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--activity-batches", type=int, default=4)
    ap.add_argument("--sparsities", default="0.3,0.5,0.7")
    ap.add_argument("--methods", default="cats,chess,chess+")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)

    config, variables, _ = load_run(args.run)
    cfg = config.model
    tokenizer = data_setup.run_tokenizer(config)
    eval_batches = [{k: jnp.asarray(v) for k, v in b.items()}
                    for b in data_setup.eval_batches(config, tokenizer)]
    iterator = data_setup.train_iterator(config, tokenizer)
    calib = [next(iterator)["inputs"] for _ in range(args.calib_batches)]
    t0 = time.time()
    stats = chess.collect_stats(cfg, variables, calib)
    calib_tokens = sum(int(np.size(b)) for b in calib)
    print(f"calibration: {len(calib)} train batches, {calib_tokens} tokens ({time.time() - t0:.1f}s)")
    run = _eval_fn(cfg)
    activity_ids = [b["inputs"] for b in eval_batches[: args.activity_batches]]

    def row(method, s, thresholds):
        t0 = time.time()
        v = chess.with_thresholds(variables, thresholds)
        ppl, ce = perplexity(run, v, eval_batches)
        th = thresholds or chess.ChessThresholds(tree={}, method="dense", sparsity=0.0)
        sp, de, ffn = weight_reads(cfg, chess.activity(chess.collect_stats(cfg, v, activity_ids), th))
        out = {"method": method, "s": s, "ppl": ppl, "ce": ce, "active_params": sp / de,
               "ffn_sparsity": ffn}
        print(f"{method:<7} s={s:.1f}  ppl {ppl:8.4f}  active params {sp / de:.3f}  FFN sparsity "
              f"{ffn:.3f}  ({time.time() - t0:.1f}s)", flush=True)
        return out

    rows = [row("dense", 0.0, None)]
    for method in args.methods.split(","):
        for s in (float(x) for x in args.sparsities.split(",")):
            flat = {p: jnp.asarray(t) for p, t in chess.thresholds_from_stats(stats, s, method).items()}
            rows.append(row(method, s, chess.ChessThresholds(traverse_util.unflatten_dict(flat), method, s)))

    base = rows[0]["ppl"]
    print(f"\n## {args.run}: held-out perplexity vs activation sparsity ({len(eval_batches)} held-out "
          f"batches; calibration {calib_tokens} train tokens)\n")
    print("| method | s | ppl | Δppl vs dense | FFN sparsity | active params |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['s']:.1f} | {r['ppl']:.3f} | {r['ppl'] - base:+.3f} | "
              f"{r['ffn_sparsity']:.3f} | {r['active_params']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"run": args.run, "calib_batches": args.calib_batches,
                       "calib_tokens": calib_tokens, "eval_batches": len(eval_batches),
                       "activity_batches": args.activity_batches,
                       "device": jax.devices()[0].device_kind, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
