"""Held-out perplexity of a trained run under each quantization recipe.

    python -m lcjax.train                      # the default run -> runs/stdlib_tiny
    python scripts/eval_quant.py --run runs/stdlib_tiny --group-size 8 --json quant_quality.json

Rows: fp32, W8A8 (+SmoothQuant), FPTQ W4A8 (train-token and random-token calibration), W4A8 +
Integer Scale for each α, W4A16, OdysseyLLM per-channel W4A8 (without and with clip search),
naive W4A8 (group W4, per-tensor static A8, no equalization) and W4A8 with per-token dynamic A8
(no equalization). Perplexity = exp(mean token cross-entropy) of the main head over the
trainer's held-out batches (`data_setup.eval_batches`). Calibration: the first
`--calib-batches` batches of the train split.

The second table is Integer Scale against the same FPTQ W4A8 model with float group scales:
relative deviation of the logits, and of each weight's output over the calibration inputs
(||X (Ŵ_int - Ŵ_float)|| / ||X Ŵ_float||, mean and max over weights), per α.
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
from lcjax.quant import calibrate as calib_lib
from lcjax.quant.apply import layer_spec, quantize_layer, quantize_model
from lcjax.quant.integer_scale import to_integer_scale, weight_deviation
from lcjax.quant.recipes import get_recipe
from lcjax.serve.loading import load_run
from lcjax.train import data_setup


def _eval_fn(cfg):
    @jax.jit
    def run(variables, batch):
        logits = LongCatModel(cfg).apply(variables, batch["inputs"], batch["segment_ids"],
                                         batch["positions"])
        logits = logits.astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
        mask = batch["loss_mask"]
        return jnp.sum((lse - target) * mask), jnp.sum(mask), logits
    return run


def evaluate(run, variables, batches, reference=None):
    """(perplexity, mean CE, logits of every batch, relative logits deviation from `reference`)."""
    ce, tokens, all_logits, num, den = 0.0, 0.0, [], 0.0, 0.0
    for i, batch in enumerate(batches):
        s, n, logits = run(variables, batch)
        ce, tokens = ce + float(s), tokens + float(n)
        logits = np.asarray(logits)
        all_logits.append(logits)
        if reference is not None:
            mask = np.asarray(batch["loss_mask"])[..., None] > 0
            num += float(np.sum(np.where(mask, logits - reference[i], 0.0) ** 2))
            den += float(np.sum(np.where(mask, reference[i], 0.0) ** 2))
    mean = ce / max(tokens, 1.0)
    dev = math.sqrt(num / den) if reference is not None and den else 0.0
    return math.exp(mean), mean, all_logits, dev


# RMSNorm -> the weights reading its output (rows = the normed channels). post_norm_0 is left
# out: its output also enters the residual stream through the identity (zero) experts.
_NORM_CONSUMERS = {
    ("layers", "input_norm_0"): [("layers", "attn_0", "q_a"), ("layers", "attn_0", "kv_a")],
    ("layers", "input_norm_1"): [("layers", "attn_1", "q_a"), ("layers", "attn_1", "kv_a")],
    ("layers", "post_norm_1"): [("layers", "mlp_1", "gate"), ("layers", "mlp_1", "up")],
    ("mtp", "input_norm"): [("mtp", "attn", "q_a"), ("mtp", "attn", "kv_a")],
    ("mtp", "post_norm"): [("mtp", "mlp", "gate"), ("mtp", "mlp", "up")],
}


def outlier_twin(variables, cfg, factor: float, channels: int = 3, seed: int = 0):
    """The same function with outlier input channels: a few channels of each RMSNorm scale ×factor
    and the consuming weight rows ÷factor (LLM outliers sit in exactly such channels). The float
    model is unchanged up to rounding; the quantizers see inputs with max|x| ×factor there."""
    if not cfg.scan_layers:
        raise ValueError("outlier_twin expects the scanned parameter layout (model.scan_layers)")
    flat = dict(traverse_util.flatten_dict(variables["params"]))
    rng = np.random.default_rng(seed)
    for norm, consumers in _NORM_CONSUMERS.items():
        path = norm + ("scale",)
        scale = np.array(flat[path], np.float32)
        mult = np.ones(scale.shape[-1], np.float32)
        mult[rng.choice(scale.shape[-1], channels, replace=False)] = factor
        flat[path] = jnp.asarray(scale * mult)
        for w_path in consumers:
            w = np.array(flat[w_path], np.float32)
            m_axis = w.ndim - 2  # [.., M, N]: the normed channels are the rows
            shape = [1] * w.ndim
            shape[m_axis] = -1
            flat[w_path] = jnp.asarray(w / mult.reshape(shape))
    return {**variables, "params": traverse_util.unflatten_dict(flat)}


def _policy_summary(report) -> str:
    counts: dict[str, int] = {}
    for row in report:
        for p, c in row.get("policy", {}).items():
            counts[p] = counts.get(p, 0) + c
    return " ".join(f"{k}:{v}" for k, v in sorted(counts.items()))


def integer_scale_deviation(variables, cfg, recipe, stats, alphas):
    """Per α: (mean, max) relative output deviation of integer vs float group scales per weight."""
    flat = traverse_util.flatten_dict(variables["params"])
    float_qts = {}
    for path, w in flat.items():
        spec = layer_spec(path, cfg)
        if spec is None or spec.weight_only:
            continue
        float_qts[path], _ = quantize_layer("/".join(path), w, spec, recipe, stats.get(path))
    out = {}
    for a in alphas:
        devs = []
        try:
            for path, qt in float_qts.items():
                devs.append(weight_deviation(qt, to_integer_scale(qt, a, "/".join(path)),
                                             stats[path].get("gram")))
        except ValueError as e:
            out[a] = {"error": str(e)}
            continue
        out[a] = {"mean": float(np.mean(devs)), "max": float(np.max(devs))}
    return out


def study(config, variables, eval_batches, calib, random_calib, g, alphas):
    """All rows for one float model: (rows, integer-scale weight deviations, input ranges)."""
    cfg = config.model
    t0 = time.time()
    stats = calib_lib.calibrate(cfg, variables, calib, gram=True)
    random_stats = calib_lib.calibrate(cfg, variables, random_calib)
    print(f"calibrated ({time.time() - t0:.1f}s)")
    run = _eval_fn(cfg)
    ppl0, ce0, ref_logits, _ = evaluate(run, variables, eval_batches)
    rows = [{"recipe": "fp32", "ppl": ppl0, "ce": ce0, "logit_dev": 0.0, "note": "float weights"}]
    specs = [
        ("w8a8", "w8a8", stats, "int8 per-channel W, per-token A8"),
        ("w8a8_smoothquant", "w8a8_smoothquant", stats, "SmoothQuant a=0.5, then as w8a8"),
        ("fptq_w4a8", f"fptq_w4a8:group_size={g}", stats, "LAE + layer policy v0=15 v1=150"),
        ("fptq_w4a8 (random-token calib)", f"fptq_w4a8:group_size={g}", random_stats,
         "calibrated on uniform random tokens"),
        *[(f"w4a8_integer_scale a=2^{int(math.log2(a))}",
           f"w4a8_integer_scale:group_size={g},integer_scale={a}", stats, "fptq_w4a8 + integer ŝ")
          for a in alphas],
        ("w4a16", f"w4a16:group_size={g}", stats, "weight-only int4 groups"),
        ("odyssey_w4a8 (no clip)", "odyssey_w4a8:clip_search=false", stats,
         "int4 per-channel W, per-token A8"),
        ("odyssey_w4a8", "odyssey_w4a8", stats, "+ clip search (output MSE)"),
        ("naive_w4a8", f"naive_w4a8:group_size={g}", stats, "int4 groups, static per-tensor A8"),
        ("w4a8_dynamic", f"w4a8_dynamic:group_size={g}", stats, "int4 groups, per-token A8"),
    ]
    fptq_logits, v_ranges = None, {}
    for label, recipe, st, note in specs:
        t0 = time.time()
        try:
            q, report = quantize_model(variables, config, recipe, stats=st, return_report=True)
        except ValueError as e:
            rows.append({"recipe": label, "spec": recipe, "ppl": None, "note": f"refused: {e}"})
            print(f"{label:<34} refused: {e}")
            continue
        ppl, ce, logits, dev = evaluate(run, q, eval_batches, ref_logits)
        row = {"recipe": label, "spec": recipe, "ppl": ppl, "ce": ce, "logit_dev": dev, "note": note}
        if "fptq" in recipe or "integer_scale" in recipe:
            row["policy"] = _policy_summary(report)
        if label == "fptq_w4a8":
            fptq_logits = logits
            v_ranges = {r["layer"]: r["v"] for r in report if "v" in r}
        if "integer_scale" in recipe and fptq_logits is not None:
            num = sum(float(np.sum((a - b) ** 2)) for a, b in zip(logits, fptq_logits))
            den = sum(float(np.sum(b ** 2)) for b in fptq_logits)
            row["dev_vs_float_scales"] = math.sqrt(num / den)
        if "clip" in note:
            row["clip_mse_ratio"] = float(np.mean([r["clip_mse_ratio"] for r in report]))
        rows.append(row)
        print(f"{label:<34} ppl {ppl:8.3f}  ({time.time() - t0:.1f}s)")
    weight_devs = integer_scale_deviation(variables, cfg, get_recipe(f"fptq_w4a8:group_size={g}"),
                                          stats, alphas)
    return rows, weight_devs, v_ranges


def print_tables(title, rows, weight_devs, v_ranges, alphas):
    ppl0 = rows[0]["ppl"]
    print(f"\n## {title}\n")
    print("| recipe | ppl | Δppl vs fp32 | logits rel. dev. | setting |")
    print("|---|---|---|---|---|")
    for r in rows:
        if r.get("ppl") is None:
            print(f"| {r['recipe']} | - | - | - | {r['note']} |")
            continue
        extra = f" (policy {r['policy']})" if r.get("policy") else ""
        print(f"| {r['recipe']} | {r['ppl']:.3f} | {r['ppl'] - ppl0:+.3f} | {r['logit_dev']:.4f} | "
              f"{r['note']}{extra} |")
    print("\n| α | logits dev. vs float scales | per-weight output dev. mean / max |")
    print("|---|---|---|")
    for a in alphas:
        row = next((r for r in rows if r.get("spec", "").endswith(f"integer_scale={a}")), {})
        wd = weight_devs[a]
        wtxt = wd["error"] if "error" in wd else f"{wd['mean']:.2e} / {wd['max']:.2e}"
        ltxt = f"{row['dev_vs_float_scales']:.2e}" if "dev_vs_float_scales" in row else "-"
        print(f"| 2^{int(math.log2(a))} | {ltxt} | {wtxt} |")
    top = sorted(v_ranges.items(), key=lambda kv: -kv[1])
    print("\ninput range v = max|x| (largest first): " +
          ", ".join(f"{k} {v:.1f}" for k, v in top[:6]) + f"; smallest {top[-1][0]} {top[-1][1]:.2f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/stdlib_tiny")
    ap.add_argument("--group-size", type=int, default=8,
                    help="K-group of the group-wise recipes (must divide every contraction dim: "
                         "the tiny model's 48/64/16/24/32 -> 8)")
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--alphas", default="8,10,12,14,16", help="Integer Scale exponents: α = 2^e")
    ap.add_argument("--outlier-factor", type=float, default=20.0,
                    help="also study the function-preserving outlier twin with this factor (0: skip)")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)

    config, variables, _ = load_run(args.run)
    tokenizer = data_setup.run_tokenizer(config)
    eval_batches = [{k: jnp.asarray(v) for k, v in b.items()}
                    for b in data_setup.eval_batches(config, tokenizer)]
    iterator = data_setup.train_iterator(config, tokenizer)
    calib = [next(iterator) for _ in range(args.calib_batches)]
    random_calib = calib_lib.random_token_batches(config.model, args.calib_batches,
                                                  config.data.global_batch, config.data.seq_len)
    alphas = [2**int(e) for e in args.alphas.split(",")]
    models = {"trained": variables}
    if args.outlier_factor:
        models[f"outlier twin x{args.outlier_factor:g}"] = outlier_twin(variables, config.model,
                                                                       args.outlier_factor)
    results = {}
    for name, v in models.items():
        print(f"--- {name}")
        results[name] = study(config, v, eval_batches, calib, random_calib, args.group_size, alphas)
    for name, (rows, devs, ranges) in results.items():
        print_tables(f"{args.run}: {name} (group size {args.group_size}, {len(eval_batches)} "
                     f"held-out batches)", rows, devs, ranges, alphas)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"run": args.run, "group_size": args.group_size,
                       "calib_batches": args.calib_batches, "eval_batches": len(eval_batches),
                       "device": jax.devices()[0].device_kind,
                       "models": {name: {"rows": rows, "input_ranges": ranges,
                                         "integer_scale_weight_deviation": {str(k): d for k, d in devs.items()}}
                                  for name, (rows, devs, ranges) in results.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
