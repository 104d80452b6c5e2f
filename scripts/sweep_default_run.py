"""Sweep of the embedded default run (`python -m lcjax.train`): model size, learning rate, batch,
sequence length and steps, each variant a real run of the CLI in a fresh process.

    python scripts/sweep_default_run.py                        # every variant below
    python scripts/sweep_default_run.py --variants base lr2x   # a subset
    python scripts/sweep_default_run.py --list

Each row reports held-out loss (nats/token and bits/byte), tokens/s and the wall time of the
whole command (tokenizer, compile, training, evaluation). Held-out loss at fixed steps does not
depend on machine load; wall time does, so run it on an otherwise idle machine. Prints a table
and writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

# Sizes: every one keeps MLA (LoRA ranks), routed + zero experts, the n-gram embedding, LoZA
# sublayers and the MTP head of configs/models/tiny.yaml.
_SIZES = {
    "h48": [],  # configs/models/tiny.yaml as it is
    "h64": ["model.hidden_size=64", "model.ffn_hidden_size=128", "model.mla.q_lora_rank=32",
            "model.mla.kv_lora_rank=24", "model.moe.expert_ffn_size=32"],
    "h96": ["model.hidden_size=96", "model.ffn_hidden_size=192", "model.mla.q_lora_rank=48",
            "model.mla.kv_lora_rank=32", "model.mla.qk_nope_head_dim=16", "model.mla.qk_rope_head_dim=8",
            "model.mla.v_head_dim=16", "model.moe.expert_ffn_size=48"],
    "h128": ["model.hidden_size=128", "model.ffn_hidden_size=256", "model.mla.q_lora_rank=64",
             "model.mla.kv_lora_rank=32", "model.mla.qk_nope_head_dim=16", "model.mla.qk_rope_head_dim=8",
             "model.mla.v_head_dim=16", "model.moe.expert_ffn_size=64"],
    "h192": ["model.hidden_size=192", "model.ffn_hidden_size=384", "model.mla.num_heads=6",
             "model.mla.q_lora_rank=96", "model.mla.kv_lora_rank=48", "model.mla.qk_nope_head_dim=24",
             "model.mla.qk_rope_head_dim=8", "model.mla.v_head_dim=24", "model.moe.expert_ffn_size=96"],
}


# Held-out tokens per evaluation, the same for every variant (the first rows of the held-out
# split in file order): comparable losses whatever the batch shape.
EVAL_TOKENS = 131072


def _variant(size: str, steps: int, lr: float, batch: int, seq: int, warmup: int | None = None,
             extra: tuple[str, ...] = ()) -> list[str]:
    warmup = warmup if warmup is not None else max(steps // 10, 1)
    return [*_SIZES[size], f"train.steps={steps}", f"optimizer.learning_rate={lr}",
            f"optimizer.warmup_steps={warmup}", f"data.global_batch={batch}", f"data.seq_len={seq}",
            f"train.eval_every={steps}", f"train.checkpoint_every={steps}",
            f"train.eval_batches={max(EVAL_TOKENS // (batch * seq), 1)}", *extra]


VARIANTS: dict[str, list[str]] = {
    "h48_s300": _variant("h48", 300, 3e-3, 16, 128),
    "h48_s1500": _variant("h48", 1500, 3e-3, 16, 128),
    "h96_s800": _variant("h96", 800, 3e-3, 16, 128),
    "h128_s800": _variant("h128", 800, 3e-3, 16, 128),
    "h128_s800_lr1e-3": _variant("h128", 800, 1e-3, 16, 128),
    "h128_s800_lr6e-3": _variant("h128", 800, 6e-3, 16, 128),
    "h128_s400_b32": _variant("h128", 400, 3e-3, 32, 128),
    "h128_s800_seq256_b8": _variant("h128", 800, 3e-3, 8, 256),
    "h192_s600": _variant("h192", 600, 3e-3, 16, 128),
    "h48_s2000": _variant("h48", 2000, 3e-3, 16, 128),
    "h48_s2000_lr5e-3": _variant("h48", 2000, 5e-3, 16, 128),
    "h48_s2000_lr2e-3": _variant("h48", 2000, 2e-3, 16, 128),
    "h48_s1000_b32": _variant("h48", 1000, 3e-3, 32, 128),
    "h48_s1500_b32": _variant("h48", 1500, 3e-3, 32, 128),
    "h48_s1200_b32_lr5e-3": _variant("h48", 1200, 5e-3, 32, 128),
    "h64_s1000_b32": _variant("h64", 1000, 3e-3, 32, 128),
    "h48_s2000_seq256_b8": _variant("h48", 2000, 3e-3, 8, 256),
    "h64_s1500": _variant("h64", 1500, 3e-3, 16, 128),
}

_LOSS = re.compile(r"held-out loss, end\s+([\d.]+) nats/token, ([\d.]+) bits/byte")
_TOKS = re.compile(r"tokens / s\s+([\d,]+)")


def run_variant(name: str, overrides: list[str], run_root: str, timeout: float) -> dict:
    """One `python -m lcjax.train` in a fresh process; parses the end-of-run summary."""
    cmd = [sys.executable, "-m", "lcjax.train", "--no-samples",
           f"train.run_dir={os.path.join(run_root, name)}", *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"variant": name, "error": proc.stderr.strip().splitlines()[-1:], "wall_s": wall}
    loss, toks = _LOSS.search(proc.stdout), _TOKS.search(proc.stdout)
    return {"variant": name, "overrides": overrides, "wall_s": round(wall, 1),
            "heldout_nats": float(loss.group(1)), "heldout_bits_per_byte": float(loss.group(2)),
            "tokens_per_s": int(toks.group(1).replace(",", ""))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="*", default=None, help="names (default: all)")
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    parser.add_argument("--out", default="sweep_default_run.json")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per variant")
    args = parser.parse_args()
    if args.list:
        for name, overrides in VARIANTS.items():
            print(f"{name:24s} {' '.join(overrides)}")
        return 0
    names = args.variants or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; --list shows them")
    rows = []
    print(f"{'variant':24s} {'nats':>7s} {'bits/B':>7s} {'tok/s':>8s} {'wall s':>7s}")
    with tempfile.TemporaryDirectory(prefix="lcjax_sweep_") as root:
        for name in names:
            row = run_variant(name, VARIANTS[name], root, args.timeout)
            rows.append(row)
            if "error" in row:
                print(f"{name:24s} failed: {row['error']}")
            else:
                print(f"{name:24s} {row['heldout_nats']:7.3f} {row['heldout_bits_per_byte']:7.3f} "
                      f"{row['tokens_per_s']:8,d} {row['wall_s']:7.1f}", flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
