"""Draft-head (MTP) fine-tuning on the model's own greedy outputs, and acceptance before / after.

    python scripts/eval_draft_head.py                 # runs/stdlib_tiny, ~10 min on 2 CPU cores
    python scripts/eval_draft_head.py --steps 100 --train-prompts 128 --json /tmp/draft.json

1. Self-distillation data: `--train-prompts` windows of the base run's training split (the first
   `--prompt-len` tokens of packed rows) continued greedily for `--new-tokens` tokens by the base
   model itself (lcjax.serve.Engine, no drafts), written as text JSONL.
2. Fine-tune only the MTP head: `lora.targets=mtp` (LoRA on the MTP block's attention and MLP;
   every other weight frozen), `train.init_from` the base run, on that text.
3. Acceptance on held-out prompts (the held-out split's rows, never trained on): greedy decoding
   with k MTP drafts per round (k = 1, 2), the base run's head vs the fine-tuned one served
   unmerged (lcjax.lora.merge.load_unmerged_run, what `python -m lcjax.serve --lora RUN` serves).
   Acceptance length = 1 + accepted drafts / rounds per row (the engine's counters); the text is
   the base model's greedy text in both cases (drafts never change greedy output).

Prints a table; writes `--json`. The serve benchmark reads the same counters from /metrics:
`python scripts/bench_serve.py --launch -- --lora RUN --num-speculative-tokens 2`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default=str(ROOT / "runs" / "stdlib_tiny"), help="the trained base run")
    p.add_argument("--out", default=str(ROOT / "runs" / "draft_head"), help="data and the fine-tuned run")
    p.add_argument("--train-prompts", type=int, default=512)
    p.add_argument("--eval-prompts", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2], help="drafts per round measured")
    p.add_argument("--json", default="eval_draft_head.json")
    return p.parse_args(argv)


def prompts_of(config, tokenizer, split: str, count: int, length: int) -> list[list[int]]:
    """The first `length` tokens of `count` packed rows of `split` (rows with fewer real tokens
    skipped)."""
    from lcjax.data import make_iterator

    iterator = make_iterator(config.data, tokenizer, split, host_index=0, host_count=1)
    out = []
    while len(out) < count:
        batch = next(iterator)
        for ids, mask in zip(np.asarray(batch["inputs"]), np.asarray(batch["loss_mask"])):
            if mask[:length].all() and len(out) < count:
                out.append([int(t) for t in ids[:length]])
    return out


def greedy_engine(config, variables, tokenizer, k: int):
    from lcjax.serve import Engine, EngineConfig

    return Engine(config, variables, tokenizer,
                  EngineConfig(max_num_seqs=32, max_model_len=256, num_speculative_tokens=k))


def self_distillation(config, variables, tokenizer, prompts, new_tokens: int, path: pathlib.Path) -> int:
    """Greedy continuations of `prompts` by the model itself, as {"text": ...} JSONL lines."""
    from lcjax.serve import SamplingParams

    engine = greedy_engine(config, variables, tokenizer, 0)
    outs = engine.generate(prompts, SamplingParams(max_tokens=new_tokens, temperature=0.0,
                                                   ignore_eos=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": tokenizer.decode(p + o.token_ids)}) + "\n"
                            for p, o in zip(prompts, outs)))
    return sum(len(o.token_ids) for o in outs)


def acceptance(config, variables, tokenizer, prompts, new_tokens: int, k: int) -> dict:
    from lcjax.serve import SamplingParams

    engine = greedy_engine(config, variables, tokenizer, k)
    outs = engine.generate(prompts, SamplingParams(max_tokens=new_tokens, temperature=0.0,
                                                   ignore_eos=True))
    stats = engine.stats()
    rounds = stats.spec_rounds_total
    return {"acceptance_length": 1 + stats.accepted_tokens_total / rounds if rounds else None,
            "rounds": int(rounds), "accepted": int(stats.accepted_tokens_total),
            "tokens": [o.token_ids for o in outs]}


def main(argv=None) -> int:
    args = parse_args(argv)
    from lcjax.config_io import load_config
    from lcjax.lora.merge import load_unmerged_run
    from lcjax.serve.loading import load_run
    from lcjax.train import loop

    base = pathlib.Path(args.base).absolute()
    if not (base / "checkpoints").is_dir():
        raise SystemExit(f"{base} has no checkpoints: train the default run first (python -m lcjax.train)")
    out = pathlib.Path(args.out).absolute()
    config, variables, tokenizer = load_run(base)
    train_prompts = prompts_of(config, tokenizer, "train", args.train_prompts, args.prompt_len)
    eval_prompts = prompts_of(config, tokenizer, "heldout", args.eval_prompts, args.prompt_len)
    data = out / "self_distill.jsonl"
    start = time.perf_counter()
    generated = self_distillation(config, variables, tokenizer, train_prompts, args.new_tokens, data)
    print(f"self-distillation: {generated} greedy tokens of {len(train_prompts)} prompts in "
          f"{time.perf_counter() - start:.0f} s -> {data}", flush=True)

    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = ["data.source=jsonl", f"data.path={data}", "data.seq_len=128", "data.global_batch=16",
                 "data.heldout_fraction=0.02", f"train.steps={args.steps}", f"train.run_dir={run_dir}",
                 f"train.init_from={base}", "train.eval_every=0", "train.eval_batches=1",
                 f"train.checkpoint_every={args.steps}", f"train.log_every={max(1, args.steps // 4)}",
                 "train.async_checkpoint=false", f"optimizer.warmup_steps={max(1, args.steps // 10)}",
                 f"optimizer.learning_rate={args.lr}", f"lora.rank={args.rank}",
                 f"lora.alpha={args.rank}", "lora.targets=mtp"]
    start = time.perf_counter()
    loop.train(load_config(base / "config.yaml", overrides))
    train_seconds = time.perf_counter() - start
    tuned_cfg, tuned, _, _ = load_unmerged_run(run_dir)

    rows = []
    for k in args.ks:
        before = acceptance(config, variables, tokenizer, eval_prompts, args.new_tokens, k)
        after = acceptance(tuned_cfg, tuned, tokenizer, eval_prompts, args.new_tokens, k)
        if before.pop("tokens") != after.pop("tokens"):
            raise SystemExit("greedy text changed with the draft head: drafts must never change it")
        rows.append({"k": k, "before": before, "after": after})
        print(f"k={k}: acceptance length {before['acceptance_length']:.3f} -> "
              f"{after['acceptance_length']:.3f}", flush=True)
    print(f"\n{'drafts k':>8} {'MTP head':>22} {'acceptance length':>18} {'rounds':>8}")
    for r in rows:
        for name, key in (("as trained (base run)", "before"), ("self-distilled (LoRA)", "after")):
            print(f"{r['k']:>8} {name:>22} {r[key]['acceptance_length']:>18.3f} {r[key]['rounds']:>8}")
    pathlib.Path(args.json).write_text(json.dumps({
        "settings": vars(args), "self_distill_tokens": generated, "train_seconds": train_seconds,
        "eval_prompts": len(eval_prompts), "rows": rows}, indent=1))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
