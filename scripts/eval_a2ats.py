"""A²ATS quality on a model trained on long sequences: attention-mass recall and held-out
perplexity against exact attention.

    python scripts/eval_a2ats.py --run runs/stdlib_tiny_2k --json a2ats_quality.json

Data: standard-library files of the run's held-out split long enough for `--seq-len` tokens
(the first `--seq-len` tokens of each, one document per sequence); calibration: the first
`--calib-seqs` such files of the train split. Every query attends its own A²ATS selection
(teacher-forced: one forward equals token-by-token decoding with retrieval), in each full
attention sublayer; LoZA sparse sublayers stay as they are.

Rows: the oracle (top-k by exact scores, the ceiling of any top-k retrieval); query-aware VQ for each codebook size x top-k fraction; plain VQ (k-means on raw keys);
the WRoPE position ablation (codebook calibrated and queries rotated at each W); "capped f":
at most ceil(f * T) + sinks + window keys per query (A2ATSConfig.max_gather_fraction). Columns:
recall = mean share of each head's exact attention probability on the selected keys (queries
at positions >= --long-from, averaged over heads and full sublayers); ppl = exp(mean NLL) over
all positions and over positions >= --long-from, where retrieval is active.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.data.sources import stdlib_corpus
from lcjax.serve.loading import load_run
from lcjax.sparsity.a2ats import A2ATSConfig
from lcjax.sparsity.a2ats_calibrate import calibrate, evaluate


def long_documents(split: str, tokenizer, seq_len: int, count: int) -> np.ndarray:
    """[count, seq_len] token ids: the first seq_len tokens of the split's first long files."""
    out = []
    for path in stdlib_corpus(split):
        ids = tokenizer.encode(path.read_text(errors="replace"))
        if len(ids) >= seq_len:
            out.append(ids[:seq_len])
            if len(out) == count:
                break
    if len(out) < count:
        raise ValueError(f"only {len(out)} {split} files have >= {seq_len} tokens (asked {count})")
    return np.asarray(out, np.int32)


def score(cfg, variables, seqs, index, long_from: int, oracle: bool = False) -> dict:
    nll, recall = [], []
    for row in seqs:
        res = evaluate(cfg, variables, jnp.asarray(row[None]), index, oracle)
        nll.append(np.asarray(res["nll"][0]))
        if res["recall"]:
            recall.append(np.mean([np.asarray(r[0, long_from:]).mean() for r in res["recall"].values()]))
    nll = np.stack(nll)  # [N, S-1]; entry t predicts token t+1 from position t
    return dict(ppl=math.exp(nll.mean()), ppl_long=math.exp(nll[:, long_from:].mean()),
                recall=float(np.mean(recall)) if recall else 1.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/stdlib_tiny_2k")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--eval-seqs", type=int, default=8)
    p.add_argument("--calib-seqs", type=int, default=8)
    p.add_argument("--long-from", type=int, default=512)
    p.add_argument("--codebooks", default="256,1024,4096")
    p.add_argument("--topk", default="0.01,0.03,0.05,0.10")
    p.add_argument("--wrope", default="0,256,1024,2048,4096", help="WRoPE positions to ablate")
    p.add_argument("--kmeans-iters", type=int, default=20)
    p.add_argument("--caps", default="0.05,0.10",
                   help="max_gather_fraction values to add (largest codebook, 3%%; '' = none)")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)

    config, variables, tokenizer = load_run(args.run)
    cfg = config.model
    evals = long_documents("heldout", tokenizer, args.seq_len, args.eval_seqs)
    calib = long_documents("train", tokenizer, args.seq_len, args.calib_seqs)
    sizes = [int(x) for x in args.codebooks.split(",")]
    fracs = [float(x) for x in args.topk.split(",")]
    t0 = time.time()
    rows = [dict(method="exact", codebook=None, topk=None, wrope=None, cap=None,
                 **score(cfg, variables, evals, None, args.long_from))]
    books = {}

    def book(size, aware, w):
        if (size, aware, w) not in books:
            a2 = A2ATSConfig(codebook_size=size, query_aware=aware, wrope_position=w,
                             kmeans_iters=args.kmeans_iters)
            books[size, aware, w] = calibrate(cfg, variables, [calib[i: i + 4] for i in range(0, len(calib), 4)], a2)
        return books[size, aware, w]

    def add(method, size, aware, w, frac, cap=None):
        index = book(size, aware, w).with_config(topk_fraction=frac, max_gather_fraction=cap)
        oracle = method == "oracle"
        rows.append(dict(method=method, codebook=None if oracle else size, topk=frac, wrope=w,
                         cap=cap, **score(cfg, variables, evals, index, args.long_from, oracle)))
        r = rows[-1]
        print(f"  {method:<10} K={size:<5} k={frac:.2f} W={w:<5} recall={r['recall']:.4f} "
              f"ppl={r['ppl']:.4f} ppl_long={r['ppl_long']:.4f}  ({time.time() - t0:.0f}s)", flush=True)

    for frac in fracs:  # top-k by exact scores: the ceiling of any retrieval at that budget
        add("oracle", min(sizes), True, 2048, frac)
    for size in sizes:
        for frac in fracs:
            add("query-VQ", size, True, 2048, frac)
    for size in sizes:
        add("plain-VQ", size, False, 2048, 0.03)
    for cap in (float(x) for x in filter(None, args.caps.split(","))):
        add(f"capped {cap:.2f}", max(sizes), True, 2048, 0.03, cap)
    for w in (int(x) for x in args.wrope.split(",")):
        if w != 2048:
            add("query-VQ", max(sizes), True, w, 0.03)

    print(f"\nA²ATS quality: {args.run}, {len(evals)} held-out x {args.seq_len} tokens, "
          f"calibration {len(calib)} x {args.seq_len}; recall and ppl_long over positions >= {args.long_from}")
    print(f"{'method':<12} {'codebook':>8} {'top-k':>6} {'WRoPE':>6} {'recall':>8} {'ppl':>8} {'ppl_long':>9}")
    for r in rows:
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(f"{r['method']:<12} {fmt(r['codebook'], 'd'):>8} {fmt(r['topk'], '.2f'):>6} "
              f"{fmt(r['wrope'], 'd'):>6} {r['recall']:>8.4f} {r['ppl']:>8.4f} {r['ppl_long']:>9.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(run=args.run, seq_len=args.seq_len, eval_seqs=len(evals),
                           calib_seqs=len(calib), long_from=args.long_from, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
