"""Full fine-tuning vs LoRA vs AFA-LoRA on a verifiable toy task, from the default trained run.

    python scripts/eval_lora.py                       # 3 methods x 3 seeds, ~15 min on 2 CPU cores
    python scripts/eval_lora.py --seeds 0 --steps 100 --json /tmp/eval_lora.json   # a quick look

The task (generated here, seeded): word-list questions with one exact answer, e.g.
"reverse: if list self" -> "self list if", "first: ..." / "last: ..." (one word), over words the
base run's tokenizer keeps as one token each (2-4 words; all need attention back to the prompt,
which the code-trained base never had to do across a chat turn). Train and held-out
prompts are disjoint word lists. Each method fine-tunes the base run (`train.init_from`) on the
chat records (`data.source=chat`: loss on the assistant tokens only) for the same steps, batch
and seed; LoRA and AFA-LoRA use the same rank and targets, AFA-LoRA adds the annealed SiLU
(`lora.afa.activation=silu`, lam 1 -> 0 over the first half, then linear, so it merges). Reported
per run and as mean ± std over seeds: held-out assistant-token loss (nats / token, teacher
forced) and exact match of greedy replies (lcjax.serve.Engine, merged adapters), plus the base
model before fine-tuning. Prints a table; writes `--json`.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import shutil
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CANDIDATE_WORDS = ("if else for while return import from class def self None True False list "
                   "dict set int str len print range open file name path data value key type "
                   "args kwargs line text result error object item index start end size").split()
OPS = ("reverse", "first", "last")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default=str(ROOT / "runs" / "stdlib_tiny"),
                   help="the trained base run (default: runs/stdlib_tiny, from `python -m lcjax.train`)")
    p.add_argument("--out", default=str(ROOT / "runs" / "eval_lora"), help="runs and data go here")
    p.add_argument("--methods", nargs="+", default=["full", "lora", "afa"],
                   choices=["full", "lora", "afa"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=16, help="rows of 64 tokens per step")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr-full", type=float, default=2e-3, help="the base run's peak rate")
    p.add_argument("--lr-lora", type=float, default=5e-3, help="LoRA and AFA-LoRA learning rate")
    p.add_argument("--train-examples", type=int, default=6000)
    p.add_argument("--heldout-examples", type=int, default=192)
    p.add_argument("--min-words", type=int, default=2)
    p.add_argument("--max-words", type=int, default=4)
    p.add_argument("--json", default="eval_lora.json")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------ task
def one_token_words(tokenizer) -> list[str]:
    """Candidate words the tokenizer keeps as one token after a space (so a reply's length in
    tokens is its length in words)."""
    words = [w for w in CANDIDATE_WORDS if len(tokenizer.encode(" " + w)) == 1]
    if len(words) < 8:
        raise SystemExit(f"only {len(words)} one-token words in the base tokenizer: {words}")
    return words


def answer(op: str, words: list[str]) -> str:
    if op == "reverse":
        return " ".join(words[::-1])
    if op == "first":
        return words[0]
    if op == "last":
        return words[-1]
    raise ValueError(f"unknown op {op!r}")


def make_examples(rng: np.random.Generator, vocab: list[str], count: int, lengths, exclude=frozenset()):
    """`count` distinct (op, words) pairs whose word tuples are not in `exclude`."""
    seen, out = set(), []
    while len(out) < count:
        n = int(rng.integers(lengths[0], lengths[1] + 1))
        words = tuple(vocab[i] for i in rng.choice(len(vocab), size=n, replace=False))
        op = OPS[int(rng.integers(len(OPS)))]
        if words in exclude or (op, words) in seen:
            continue
        seen.add((op, words))
        out.append((op, list(words)))
    return out


def record(op: str, words: list[str]) -> dict:
    return {"messages": [{"role": "user", "content": f"{op}: {' '.join(words)}"},
                         {"role": "assistant", "content": answer(op, words)}]}


def write_task(out: pathlib.Path, tokenizer, args) -> tuple[pathlib.Path, list[dict]]:
    vocab = one_token_words(tokenizer)
    rng = np.random.default_rng(1234)
    heldout = make_examples(rng, vocab, args.heldout_examples, (args.min_words, args.max_words))
    held_words = frozenset(tuple(w) for _, w in heldout)
    train = make_examples(rng, vocab, args.train_examples, (args.min_words, args.max_words), held_words)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "train.jsonl"
    path.write_text("".join(json.dumps(record(op, w)) + "\n" for op, w in train))
    held = [record(op, w) for op, w in heldout]
    (out / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    return path, held


# ------------------------------------------------------------------------------- training
def finetune(method: str, seed: int, data: pathlib.Path, run_dir: pathlib.Path, args) -> dict:
    from lcjax.config_io import load_config
    from lcjax.train import loop

    overrides = [
        "data.source=chat", f"data.path={data}", "data.seq_len=64", f"data.global_batch={args.batch}",
        "data.heldout_fraction=0.01", f"train.steps={args.steps}", f"train.run_dir={run_dir}",
        f"train.init_from={args.base}", "train.eval_every=0", "train.eval_batches=1",
        f"train.checkpoint_every={args.steps}", f"train.log_every={max(1, args.steps // 4)}",
        "train.async_checkpoint=false", f"optimizer.warmup_steps={max(1, args.steps // 10)}",
        f"optimizer.learning_rate={args.lr_full if method == 'full' else args.lr_lora}",
        f"runtime.seed={seed}", f"data.shuffle_seed={seed}"]
    if method != "full":
        overrides += [f"lora.rank={args.rank}", f"lora.alpha={2 * args.rank}"]
    if method == "afa":
        overrides += ["lora.afa.activation=silu", "lora.afa.anneal_fraction=0.5"]
    config = load_config(pathlib.Path(args.base) / "config.yaml", overrides)
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    summary = loop.train(config)
    return {"train_seconds": time.perf_counter() - start, "last_train_loss": float(summary.losses[-1])}


def load_finetuned(method: str, run_dir: pathlib.Path):
    """(Config, variables, tokenizer, trainable parameter count) of a finished run."""
    import jax

    if method == "full":
        from lcjax.serve.loading import load_run

        config, variables, tokenizer = load_run(run_dir)
        return config, variables, tokenizer, sum(x.size for x in jax.tree.leaves(variables["params"]))
    from lcjax.lora.merge import load_lora_run, load_merged_run

    _, _, adapters, _, _ = load_lora_run(run_dir)
    config, variables, tokenizer = load_merged_run(run_dir)  # lam = 0 at the end: exact
    return config, variables, tokenizer, sum(x.size for x in jax.tree.leaves(adapters))


# ----------------------------------------------------------------------------- evaluation
def heldout_loss(config, variables, tokenizer, template, records) -> float:
    """Mean cross-entropy (nats / token) of the assistant tokens (and their eos), teacher forced."""
    import jax
    import jax.numpy as jnp

    from lcjax.data.chat import tokenize_conversation
    from lcjax.model import LongCatModel

    rows = [tokenize_conversation({"messages": r["messages"], "tools": None}, template, tokenizer)
            for r in records]
    width = max(len(r["ids"]) for r in rows)
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.float32)
    for i, r in enumerate(rows):
        ids[i, :len(r["ids"])] = r["ids"]
        mask[i, :len(r["ids"])] = r["trained"]
    logits = jax.jit(LongCatModel(config.model).apply)(variables, jnp.asarray(ids))
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.asarray(ids)[:, 1:, None], axis=-1)[..., 0]
    m = jnp.asarray(mask)[:, 1:]
    return float((nll * m).sum() / m.sum())


def exact_match(config, variables, tokenizer, template, records) -> float:
    """Share of held-out prompts whose greedy reply equals the answer exactly."""
    from lcjax.serve import Engine, EngineConfig, SamplingParams

    prompts = [tokenizer.encode(template.render(r["messages"][:1], add_generation_prompt=True))
               for r in records]
    engine = Engine(config, variables, tokenizer, EngineConfig(max_num_seqs=32, max_model_len=128))
    outs = engine.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0))
    hits = [o.text.strip() == r["messages"][1]["content"] for o, r in zip(outs, records)]
    return float(np.mean(hits))


def evaluate(config, variables, tokenizer, records) -> dict:
    from lcjax.serve.chat_template import resolve_chat_template

    template = resolve_chat_template(None, tokenizer)
    return {"heldout_loss": heldout_loss(config, variables, tokenizer, template, records),
            "exact_match": exact_match(config, variables, tokenizer, template, records)}


# ---------------------------------------------------------------------------------- main
def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        group = [r for r in rows if r["method"] == method]
        agg = {"method": method, "runs": len(group)}
        for key in ("heldout_loss", "exact_match"):
            vals = np.asarray([r[key] for r in group])
            agg[key] = float(vals.mean())
            agg[key + "_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        out.append(agg)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from lcjax.serve.loading import load_run

    base = pathlib.Path(args.base).absolute()
    args.base = str(base)
    if not (base / "checkpoints").is_dir():
        raise SystemExit(f"{base} has no checkpoints: train the default run first (python -m lcjax.train)")
    out = pathlib.Path(args.out).absolute()
    base_cfg, base_vars, tokenizer = load_run(base)
    data, heldout = write_task(out, tokenizer, args)
    print(f"task: {args.train_examples} train / {len(heldout)} held-out records in {out}; "
          f"e.g. {heldout[0]['messages'][0]['content']!r} -> {heldout[0]['messages'][1]['content']!r}")
    rows = [{"method": "base (no fine-tuning)", "seed": "-", "trainable": 0,
             **evaluate(base_cfg, base_vars, tokenizer, heldout)}]
    print(f"base: {rows[0]}", flush=True)
    for seed in args.seeds:  # seeds outermost: a cut-short sweep still compares every method
        for method in args.methods:
            run_dir = out / f"{method}_s{seed}"
            stats = finetune(method, seed, data, run_dir, args)
            config, variables, tok, trainable = load_finetuned(method, run_dir)
            row = {"method": method, "seed": seed, "trainable": int(trainable), **stats,
                   **evaluate(config, variables, tok, heldout)}
            rows.append(row)
            print(f"{method} seed {seed}: loss {row['heldout_loss']:.4f}  exact {row['exact_match']:.3f}  "
                  f"({row['train_seconds']:.0f} s)", flush=True)
    summary = summarize(rows)
    print(f"\n{'method':24s} {'runs':>4s} {'trainable':>10s} {'held-out loss':>18s} {'exact match':>16s}")
    for s in summary:
        trainable = next(r["trainable"] for r in rows if r["method"] == s["method"])
        print(f"{s['method']:24s} {s['runs']:4d} {trainable:10,d} "
              f"{s['heldout_loss']:10.4f} ± {s['heldout_loss_std']:.4f} "
              f"{s['exact_match']:9.3f} ± {s['exact_match_std']:.3f}")
    settings = {k: v for k, v in vars(args).items()}
    pathlib.Path(args.json).write_text(json.dumps({"settings": settings, "runs": rows,
                                                   "summary": summary}, indent=1))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
