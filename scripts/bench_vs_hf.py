"""lcjax vs transformers' LongcatFlashForCausalLM on the same weights: forward, train step, decode.

    python scripts/bench_vs_hf.py --out bench_vs_hf.json                # CPU, one thread each
    python scripts/bench_vs_hf.py --write-benchmarks                     # + scripts/BENCHMARKS.md
    python scripts/bench_vs_hf.py --device gpu --out bench_vs_hf_gpu.json   # bf16 on both sides
    python scripts/bench_vs_hf.py --quick --out /tmp/bench_vs_hf.json   # tiny, seconds
    python scripts/bench_vs_hf.py --gmm-impl xla --label ragged_dot     # the lax.ragged_dot MoE
    python scripts/bench_vs_hf.py model.attention_impl=reference         # any lcjax override

Model (CPU default, "fine-grained MoE"): vocab 8192, hidden 256, 2 logical layers (4 MLA
sublayers), 4 heads, q/kv LoRA 128/64, nope/rope/v 32/16/32, dense FFN 512, 32 routed experts of
128 + 16 zero experts, top-4, scaling 6.0, no MTP head, float32. lcjax variables are initialised,
written with `lcjax.convert.save_hf_checkpoint` and loaded by transformers, so both sides run
the same weights; the script first checks that the logits agree (max |diff| is printed; a
difference above --tol exits 1 before anything is timed).

Measured, per round and side (rounds interleave the two sides, and alternate which goes first):
- forward: logits of a [B, S] batch (median of --calls calls);
- train step: cross-entropy forward + backward + AdamW update (same hyper-parameters on both
  sides: optax.adamw / torch.optim.AdamW, lr 1e-4, no weight decay), median of --calls steps;
- decode at each --decode-batch: greedy, cached, prompt --prompt-len then --new-tokens tokens;
  only the steps after the prefill are timed. lcjax: jitted `prefill` and `decode_step` (argmax
  inside the step); transformers: a manual `past_key_values` loop (use_cache=True).
The figure per task is the median over rounds of (transformers time / lcjax time): > 1 means
lcjax is faster. CPU runs pin the process to one core (sched_setaffinity), set
torch.set_num_threads(1) and XLA_FLAGS=--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1 before jax is imported. On a shared machine the figures are noisy.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # hf_peer, when imported as a module
BENCHMARKS = ROOT / "scripts" / "BENCHMARKS.md"
TARGETS = {"forward": 1.5, "train_step": 1.2, "decode_b16": 1.2, "decode_b1": 1.0}

# name -> lcjax config overrides on configs/models/small.yaml
MODELS = {
    "fine_moe": ["model.vocab_size=8192", "model.hidden_size=256", "model.num_layers=2",
                 "model.ffn_hidden_size=512", "model.mla.num_heads=4", "model.mla.q_lora_rank=128",
                 "model.mla.kv_lora_rank=64", "model.mla.qk_nope_head_dim=32",
                 "model.mla.qk_rope_head_dim=16", "model.mla.v_head_dim=32",
                 "model.moe.num_experts=32", "model.moe.num_zero_experts=16", "model.moe.top_k=4",
                 "model.moe.expert_ffn_size=128"],
    "quick": ["model.vocab_size=512", "model.hidden_size=64", "model.num_layers=1",
              "model.ffn_hidden_size=96", "model.mla.num_heads=2", "model.mla.q_lora_rank=32",
              "model.mla.kv_lora_rank=16", "model.mla.qk_nope_head_dim=8",
              "model.mla.qk_rope_head_dim=4", "model.mla.v_head_dim=8",
              "model.moe.num_experts=32", "model.moe.num_zero_experts=16", "model.moe.top_k=4",
              "model.moe.expert_ffn_size=16"],
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--model", choices=sorted(MODELS), default=None,
                   help="model shape (default fine_moe; quick with --quick)")
    p.add_argument("--batch", type=int, default=4, help="forward / train batch rows")
    p.add_argument("--seq", type=int, default=256, help="forward / train sequence length")
    p.add_argument("--decode-batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=3, help="calls per side and round (fwd, train)")
    p.add_argument("--tasks", nargs="+", default=["forward", "train_step", "decode"],
                   choices=("forward", "train_step", "decode"))
    p.add_argument("--hf-attn", default="sdpa", help="transformers attn_implementation")
    p.add_argument("--hf-experts", default=None,
                   help="transformers experts_implementation (default: its own choice)")
    p.add_argument("--gmm-impl", default=None,
                   help="grouped-matmul backend the lcjax model runs (default: the platform's "
                        "default order; e.g. 'xla' = lax.ragged_dot, the older path)")
    p.add_argument("--tol", type=float, default=None,
                   help="max |logits diff| allowed (default 1e-3 f32, 0.25 bf16)")
    p.add_argument("--no-pin", action="store_true", help="CPU: do not pin to one core")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny model and shapes, 2 rounds")
    p.add_argument("--label", default="",
                   help="a name for the run (e.g. ragged): stored in the JSON and, with "
                        "--write-benchmarks, its own section")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here")
    p.add_argument("--write-benchmarks", action="store_true",
                   help="replace this device's marked section of scripts/BENCHMARKS.md")
    p.add_argument("overrides", nargs="*", help="lcjax config overrides (key=value)")
    args = p.parse_args(argv)
    if args.quick:
        args.model = args.model or "quick"
        args.batch, args.seq, args.prompt_len, args.new_tokens = 2, 32, 8, 4
        args.rounds, args.calls = min(args.rounds, 2), 1
    args.model = args.model or "fine_moe"
    return args


def set_threads(args) -> None:
    """CPU: one core, one XLA thread; GPU: JAX allocates as it goes (torch shares the device).
    Must run before jax is imported."""
    if args.device != "cpu":
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        return
    if "jax" not in sys.modules:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1").strip()
    if not args.no_pin and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


# ------------------------------------------------------------------------------ the two sides
class Lcjax:
    """Jitted forward, train step and cached greedy decode of one lcjax model."""

    def __init__(self, config, variables):
        import jax
        import jax.numpy as jnp
        import optax

        from lcjax.model import LongCatModel, decode_step, prefill
        from lcjax.train.step import loss_fn

        self.jax, self.config = jax, config
        self.variables = variables
        model = LongCatModel(config.model)
        self._forward = jax.jit(lambda v, ids: model.apply(v, ids))
        self.tx = optax.adamw(1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0)
        self.params = variables["params"]
        self.opt_state = self.tx.init(self.params)
        bias = variables["router_bias"]

        def step(params, opt_state, batch):
            (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, bias, batch, config)
            updates, opt_state = self.tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        # Params are copied once so donation does not invalidate the forward's variables.
        self.params = jax.tree.map(jnp.copy, self.params)
        self._step = jax.jit(step, donate_argnums=(0, 1))
        self._prefill = jax.jit(lambda v, ids, lengths, max_len: _greedy(prefill(
            config, v, ids, lengths, max_len)), static_argnums=3)
        self._decode = jax.jit(lambda v, cache, tok: _greedy(decode_step(config, v, cache, tok)),
                               donate_argnums=1)

    def forward(self, ids):
        return self.jax.block_until_ready(self._forward(self.variables, ids))

    def train_step(self, batch):
        self.params, self.opt_state, loss = self._step(self.params, self.opt_state, batch)
        return float(loss)

    def decode(self, prompts, new_tokens: int):
        """Greedy tokens [B, new_tokens] and seconds spent after the prefill."""
        import jax.numpy as jnp
        b, s = prompts.shape
        tok, cache = self._prefill(self.variables, prompts, jnp.full((b,), s, jnp.int32),
                                   s + new_tokens)
        self.jax.block_until_ready(tok)
        out = [tok]
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            tok, cache = self._decode(self.variables, cache, tok)
            out.append(tok)
        self.jax.block_until_ready(tok)
        return self.jax.numpy.concatenate(out, 1), time.perf_counter() - start


def _greedy(result):
    logits, cache = result
    return logits[:, -1:].argmax(-1).astype("int32"), cache


class Transformers:
    """The same weights in transformers' LongcatFlashForCausalLM (torch)."""

    def __init__(self, config, variables, args):
        import torch

        from hf_peer import load_transformers_model

        self.torch = torch
        self.device = "cuda" if args.device == "gpu" else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(1)
        extra = {} if args.hf_experts is None else {"experts_implementation": args.hf_experts}
        self.model = load_transformers_model(variables, config, dtype=config.model.dtype,
                                             attn_implementation=args.hf_attn,
                                             device=self.device, **extra)
        # transformers >= 5.25 renamed past_key_values to cache (argument and output field).
        params = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.experts_implementation = getattr(self.model.config, "_experts_implementation", None)
        # train_step updates the weights in place: kept to restore them for the decode checks.
        self.initial = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                                     weight_decay=0.0)

    def restore_weights(self):
        with self.torch.no_grad():
            self.model.load_state_dict(self.initial)

    def _sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def tensor(self, array):
        import numpy as np
        return self.torch.as_tensor(np.asarray(array), device=self.device)

    def forward(self, ids):
        self.model.eval()
        with self.torch.inference_mode():
            logits = self.model(input_ids=ids).logits
        self._sync()
        return logits

    def train_step(self, batch):
        torch = self.torch
        self.model.train()
        logits = self.model(input_ids=batch["inputs"]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self._sync()
        return loss.item()

    def decode(self, prompts, new_tokens: int):
        torch = self.torch
        self.model.eval()
        with torch.inference_mode():
            out = self.model(input_ids=prompts, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            cache, toks = getattr(out, self._cache_kwarg), [tok]
            self._sync()
            start = time.perf_counter()
            for _ in range(new_tokens - 1):
                out = self.model(input_ids=tok, use_cache=True, **{self._cache_kwarg: cache})
                tok = out.logits[:, -1:].argmax(-1)
                cache = getattr(out, self._cache_kwarg)
                toks.append(tok)
            self._sync()
            return torch.cat(toks, 1), time.perf_counter() - start


# ------------------------------------------------------------------------------ measurement
def median_seconds(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def build(args):
    """(config, variables, Lcjax, Transformers) for the chosen shape and device."""
    import flax.linen as nn
    import jax

    from lcjax.config_io import load_config, resolve_config_path
    from lcjax.model import LongCatModel

    dtype = "bfloat16" if args.device == "gpu" else "float32"
    overrides = [*MODELS[args.model], "model.mtp_layers=0", "train.z_loss=0",
                 f"model.dtype={dtype}", f"model.param_dtype={dtype}", *args.overrides]
    config = load_config(resolve_config_path("small"), overrides)
    ids = jax.numpy.zeros((1, 8), jax.numpy.int32)
    variables = dict(nn.unbox(jax.jit(LongCatModel(config.model).init)(jax.random.key(args.seed), ids)))
    return config, variables, Lcjax(config, variables), Transformers(config, variables, args)


def check_logits(ours: Lcjax, hf: Transformers, ids, tol: float) -> float:
    import numpy as np
    a = np.asarray(ours.forward(ids), np.float32)
    b = hf.forward(hf.tensor(ids)).float().cpu().numpy()
    diff = float(np.max(np.abs(a - b)))
    print(f"logits max |lcjax - transformers| = {diff:.3g} (max |logit| {np.max(np.abs(b)):.3g}, "
          f"tolerance {tol:g})", flush=True)
    return diff


def run_rounds(name: str, ours, theirs, rounds: int) -> dict:
    """Interleaved rounds of (lcjax seconds, transformers seconds); the first side alternates."""
    ours(), theirs()  # compile / warm-up
    rows = []
    for r in range(rounds):
        if r % 2 == 0:
            a = ours()
            b = theirs()
        else:
            b = theirs()
            a = ours()
        rows.append((a, b))
        print(f"  {name} round {r}: lcjax {a * 1e3:9.2f} ms  transformers {b * 1e3:9.2f} ms  "
              f"ratio {b / a:5.2f}", flush=True)
    ratios = [b / a for a, b in rows]
    return {"task": name, "lcjax_s": [a for a, _ in rows], "hf_s": [b for _, b in rows],
            "ratios": ratios, "median_ratio": statistics.median(ratios),
            "lcjax_median_s": statistics.median(a for a, _ in rows),
            "hf_median_s": statistics.median(b for _, b in rows)}


def measure(args, config, ours: Lcjax, hf: Transformers) -> list[dict]:
    import numpy as np
    vocab = config.model.vocab_size
    rng = np.random.default_rng(args.seed)
    results = []
    if "forward" in args.tasks:
        ids = rng.integers(3, vocab, (args.batch, args.seq)).astype(np.int32)
        ids_t = hf.tensor(ids)
        row = run_rounds("forward", lambda: median_seconds(lambda: ours.forward(ids), args.calls),
                         lambda: median_seconds(lambda: hf.forward(ids_t), args.calls), args.rounds)
        row.update(tokens=args.batch * args.seq)
        results.append(row)
    if "train_step" in args.tasks:
        tok = rng.integers(3, vocab, (args.batch, args.seq + 1)).astype(np.int32)
        batch = {"inputs": tok[:, :-1], "targets": tok[:, 1:],
                 "loss_mask": np.ones((args.batch, args.seq), np.float32),
                 "segment_ids": np.ones((args.batch, args.seq), np.int32),
                 "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32),
                                              (args.batch, args.seq)).copy()}
        batch_j = {k: ours.jax.device_put(v) for k, v in batch.items()}
        batch_t = {k: hf.tensor(batch[k]).long() for k in ("inputs", "targets")}
        # The first step of each side starts from the same weights: equal losses check that
        # both train the same function (also the compile / warm-up step).
        first = (ours.train_step(batch_j), hf.train_step(batch_t))
        print(f"  first train-step loss: lcjax {first[0]:.6f}, transformers {first[1]:.6f}",
              flush=True)
        row = run_rounds("train_step",
                         lambda: median_seconds(lambda: ours.train_step(batch_j), args.calls),
                         lambda: median_seconds(lambda: hf.train_step(batch_t), args.calls),
                         args.rounds)
        row.update(tokens=args.batch * args.seq, first_step_loss=list(first))
        results.append(row)
        hf.restore_weights()  # lcjax trained a copy: both sides decode the initial weights
    if "decode" in args.tasks:
        for b in args.decode_batch:
            prompts = rng.integers(3, vocab, (b, args.prompt_len)).astype(np.int32)
            prompts_t = hf.tensor(prompts).long()
            got = {}

            def side(key, fn, p):
                toks, seconds = fn(p, args.new_tokens)
                got[key] = np.asarray(toks.cpu() if hasattr(toks, "cpu") else toks)
                return seconds

            row = run_rounds(f"decode_b{b}", lambda: side("lcjax", ours.decode, prompts),
                             lambda: side("hf", hf.decode, prompts_t), args.rounds)
            steps = b * (args.new_tokens - 1)
            row.update(batch=b, decode_tokens=steps,
                       lcjax_tok_s=steps / row["lcjax_median_s"], hf_tok_s=steps / row["hf_median_s"],
                       greedy_token_match=float(np.mean(got["lcjax"] == got["hf"])),
                       teacher_forced_agreement=teacher_forced(hf, prompts, got["lcjax"]))
            results.append(row)
    return results


def teacher_forced(hf: Transformers, prompts, tokens, rel_tie: float = 1e-5) -> float:
    """Fraction of lcjax's greedy tokens that transformers' full forward over the same prefix
    also ranks first (up to a tie within rel_tie of the logit range). Free-running token match
    can diverge at a near-tie and then differ for the rest of the row; this cannot."""
    import numpy as np
    seq = np.concatenate([prompts, tokens[:, :-1]], axis=1)
    logits = hf.forward(hf.tensor(seq).long()).float().cpu().numpy()[:, prompts.shape[1] - 1:]
    chosen = np.take_along_axis(logits, tokens[..., None].astype(np.int64), -1)[..., 0]
    best = logits.max(-1)
    span = logits.max() - logits.min()
    return float(np.mean(chosen >= best - rel_tie * span))


# ------------------------------------------------------------------------------ report
def table(result: dict) -> str:
    """Markdown table of the medians and the per-round ratio medians."""
    lines = ["| task | lcjax | transformers | speed-up (median of per-round ratios) | target | pass |",
             "|---|---|---|---|---|---|"]
    for r in result["tasks"]:
        target = TARGETS.get(r["task"])
        if r["task"].startswith("decode"):
            a, b = f"{r['lcjax_tok_s']:,.1f} tok/s", f"{r['hf_tok_s']:,.1f} tok/s"
        else:
            a, b = f"{r['lcjax_median_s'] * 1e3:,.1f} ms", f"{r['hf_median_s'] * 1e3:,.1f} ms"
        spread = f"{min(r['ratios']):.2f}-{max(r['ratios']):.2f}"
        ok = "-" if target is None else ("PASS" if r["median_ratio"] >= target else "FAIL")
        tgt = "-" if target is None else f">= {target:g}x"
        lines.append(f"| {r['task']} | {a} | {b} | {r['median_ratio']:.2f}x (rounds {spread}) | "
                     f"{tgt} | {ok} |")
    checks = [f"{r['task']} {r['teacher_forced_agreement']:.1%}" for r in result["tasks"]
              if "teacher_forced_agreement" in r]
    if checks:
        lines += ["", "Greedy decode tokens that transformers (teacher-forced, same weights) also "
                  "ranks first: " + ", ".join(checks) + "."]
    return "\n".join(lines)


def benchmarks_section(result: dict, table_text: str) -> str:
    m = result["model_summary"]
    return "\n".join([
        f"## lcjax vs transformers, {result['device']} ({result['date']})"
        + (f" — {result['label']}" if result["label"] else ""),
        "",
        f"Command: `{result['command']}`. Model: {m}. Logits max |diff| "
        f"{result['logits_max_abs_diff']:.2g}; transformers experts implementation "
        f"`{result['hf_experts_implementation']}`, attention `{result['hf_attn']}`; lcjax "
        f"grouped matmul `{result['lcjax_gmm_order'][0]}`. "
        f"{result['rounds']} interleaved rounds; speed-up = transformers time / lcjax time. "
        + ("One thread each on one pinned core of a shared CPU: noisy." if result["platform"] == "cpu"
           else "bf16 on both sides."),
        "",
        table_text,
    ])


def write_benchmarks(section: str, key: str, path: Path = BENCHMARKS) -> None:
    """Replace (or append) the section between the marker comments of `key` (the device, plus
    the run's --label when given, so labelled runs keep their own section)."""
    start, end = f"<!-- bench_vs_hf:{key}:start -->", f"<!-- bench_vs_hf:{key}:end -->"
    block = f"{start}\n{section}\n{end}"
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else \
        text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv=None) -> int:
    args = parse_args(argv)
    set_threads(args)
    import jax
    import numpy as np

    if args.device == "gpu" and jax.default_backend() != "gpu":
        print(f"--device gpu, but jax runs on {jax.default_backend()}", file=sys.stderr)
        return 2
    from pallas_kernels.grouped_matmul import api as gmm_api

    if args.gmm_impl is not None:
        # The model calls the grouped matmul with implementation=None: putting one backend alone
        # in this platform's default order makes every MoE matmul (and its VJP) run it.
        gmm_api.backend_module(args.gmm_impl)  # an unknown or unavailable name fails here
        gmm_api.REGISTRY.orders[jax.default_backend()] = (args.gmm_impl,)
    gmm_order = gmm_api.default_order()
    config, variables, ours, hf = build(args)
    cfg = config.model
    summary = (f"vocab {cfg.vocab_size}, hidden {cfg.hidden_size}, {cfg.num_layers} layers, "
               f"{cfg.mla.num_heads} heads, {cfg.moe.num_experts} routed experts of "
               f"{cfg.moe.expert_ffn_size} + {cfg.moe.num_zero_experts} zero, top-{cfg.moe.top_k}, "
               f"{cfg.dtype}; batch {args.batch} x {args.seq} (forward, train); decode prompt "
               f"{args.prompt_len} + {args.new_tokens} tokens")
    print(f"{summary}\njax {jax.__version__} on {jax.devices()[0].device_kind}; torch "
          f"{hf.torch.__version__} on {hf.device}, experts={hf.experts_implementation}; lcjax "
          f"grouped matmul order {gmm_order}", flush=True)
    tol = args.tol if args.tol is not None else (1e-3 if cfg.dtype == "float32" else 0.25)
    ids = np.random.default_rng(args.seed + 1).integers(3, cfg.vocab_size, (2, 16)).astype(np.int32)
    diff = check_logits(ours, hf, ids, tol)
    if not diff <= tol:
        print("logits disagree: not timing", file=sys.stderr)
        return 1
    tasks = measure(args, config, ours, hf)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": "python scripts/bench_vs_hf.py " + " ".join(argv if argv is not None
                                                                    else sys.argv[1:]),
              "label": args.label, "device": jax.devices()[0].device_kind,
              "platform": jax.default_backend(), "jax": jax.__version__,
              "torch": hf.torch.__version__, "transformers": sys.modules["transformers"].__version__,
              "python": platform.python_version(),
              "torch_threads": hf.torch.get_num_threads(), "xla_flags": os.environ.get("XLA_FLAGS"),
              "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
              else None, "model": args.model, "model_summary": summary,
              "overrides": args.overrides, "hf_attn": args.hf_attn,
              "hf_experts_implementation": hf.experts_implementation,
              "lcjax_gmm_order": list(gmm_order), "rounds": args.rounds,
              "calls": args.calls, "logits_max_abs_diff": diff, "tasks": tasks,
              "ratios": {t["task"]: t["median_ratio"] for t in tasks}}
    text = table(result)
    print("\n" + text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    if args.write_benchmarks:
        key = args.device + (f":{args.label}" if args.label else "")
        write_benchmarks(benchmarks_section(result, text), key)
        print(f"updated {BENCHMARKS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
