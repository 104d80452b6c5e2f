"""Sharded serving on host devices: Flash Communication's quantized TP all-reduce vs exact.

    python scripts/bench_serve_sharded.py                        # runs/stdlib_tiny, else random tiny
    python scripts/bench_serve_sharded.py --run-dir runs/x --mesh tensor=4 expert=2 --json out.json

One engine (lcjax.serve.Engine) on a mesh of `--devices` host CPU devices (forced with
XLA_FLAGS before jax starts; on a GPU/TPU host the real devices are used) serves the same
greedy batch with exact TP reductions and with each `--modes` quantized one
(`parallel.quantized_tp_comm`, `--group-size` elements per scale). Reported per mode:

- greedy agreement: generated tokens equal to the exact run's, position by position;
- mean |logprob| deviation: |chosen-token logprob - exact run's| over the positions before each
  request's first disagreement (the same context in both runs);
- bytes one device sends per decode step (rows = `--num-seqs`), from the compiled HLO
  (lcjax.parallel.collective_bytes);
- decode tokens/s with every row decoding; plus the one-device engine's (`tensor 1`).

Small models need small groups: each reduction is padded to devices x group_size elements, so
a tiny model's [rows, 48] partial sums with 128-element groups would send more bytes quantized
than exact. Host CPU devices share the machine's cores, so the 8-device decode rate shows the
sharded step's overheads, not a speed-up. Prints a table; writes `--json`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", help="training run directory (default: runs/stdlib_tiny if it has "
                                     "a checkpoint, else a random tiny model)")
    p.add_argument("--devices", type=int, default=8, help="host CPU devices to force (default 8)")
    p.add_argument("--mesh", nargs="+", default=["tensor=8"], metavar="AXIS=N",
                   help="serving mesh axes (default tensor=8)")
    p.add_argument("--rules", default="ep_tp",
                   help="parallel.rules (default ep_tp, the server's weight-stationary table)")
    p.add_argument("--modes", nargs="+", default=["int8", "int6", "int4"])
    p.add_argument("--group-size", type=int, default=16, help="parallel.comm_group_size (default 16)")
    p.add_argument("--num-seqs", type=int, default=8, help="concurrent requests = decode rows")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--decode-steps", type=int, default=16, help="timed decode steps (default 16)")
    p.add_argument("--json", default="bench_serve_sharded.json", help="output file")
    p.add_argument("--ep", action="store_true",
                   help="instead: expert dispatch at decode shapes (all-to-all dropless and with "
                        "--capacity vs GSPMD) on --ep-mesh, decode rows --ep-rows")
    p.add_argument("--ep-mesh", nargs="+", default=["expert=8"], metavar="AXIS=N")
    p.add_argument("--ep-rows", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    p.add_argument("--capacity", type=float, default=1.0,
                   help="parallel.expert_capacity_factor of the capped all-to-all (default 1)")
    return p.parse_args(argv)


def load(run_dir):
    """(config, variables, tokenizer, description)."""
    from lcjax.config_io import load_config, resolve_config_path
    from lcjax.serve import loading

    path = pathlib.Path(run_dir or "runs/stdlib_tiny")
    if run_dir is not None or loading.latest_step(path) is not None:
        return (*loading.load_run(path), str(path))
    return (*loading.random_model(load_config(resolve_config_path("tiny")), 0), "random tiny")


def serve(model, args, mesh=None, parallel=None):
    """(token ids per request, chosen logprobs per request, decode tokens/s, engine)."""
    import numpy as np

    from lcjax.serve.engine import Engine, EngineConfig
    from lcjax.serve.sampling import SamplingParams

    config, variables, tokenizer = model[:3]
    ec = EngineConfig(max_num_seqs=args.num_seqs, max_model_len=args.prompt_len + args.max_tokens + 8,
                      page_size=16, prefill_chunk=args.prompt_len, max_prefill_seqs=args.num_seqs)
    kw = {} if mesh is None else dict(mesh=mesh, parallel=parallel)
    eng = Engine(config, variables, tokenizer, ec, **kw)
    vocab = eng.model_cfg.vocab_size
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, vocab, args.prompt_len).tolist() for _ in range(args.num_seqs)]
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, logprobs=0)
    outs = eng.generate(prompts, sp)
    tokens = [o.token_ids for o in outs]
    logprobs = [[lp.logprob for lp in o.logprobs] for o in outs]
    # Decode rate: a second batch, timed once every row decodes (compiled shapes are reused).
    long = SamplingParams(temperature=0.0, max_tokens=args.decode_steps + 4, ignore_eos=True)
    for p in prompts:
        eng.add_request(p, long)
    while any(not r.decoding or not r.output for r in eng._running) or eng._waiting:
        eng.step()
    start, produced = time.perf_counter(), 0
    for _ in range(args.decode_steps):
        produced += sum(len(o.new_token_ids) for o in eng.step())
    rate = produced / (time.perf_counter() - start)
    while eng.has_unfinished():
        eng.step()
    return tokens, logprobs, rate, eng


def compare(tokens, logprobs, ref_tokens, ref_logprobs):
    """(greedy agreement, mean |logprob - exact| before each request's first disagreement)."""
    same = total = 0
    devs = []
    for t, lp, rt, rlp in zip(tokens, logprobs, ref_tokens, ref_logprobs):
        diverged = False
        for a, b, la, lb in zip(t, rt, lp, rlp):
            total += 1
            same += a == b
            if not diverged:
                devs.append(abs(la - lb))
            diverged = diverged or a != b
    return same / max(total, 1), sum(devs) / max(len(devs), 1)


def step_time(eng, rows: int, repeats: int) -> tuple[float, float]:
    """(seconds per decode step over `rows` rows of random tokens, bytes one device sends)."""
    import jax
    import numpy as np

    from lcjax.parallel import collective_bytes
    from lcjax.serve.sharding import compiled_decode_text

    tokens = np.random.default_rng(rows).integers(3, eng.model_cfg.vocab_size, (rows, 1)).astype(np.int32)
    inp = eng._inputs([], rows, tokens, [], [], [])
    sent = collective_bytes(compiled_decode_text(eng, rows))["total"]
    jax.block_until_ready(eng._decode(eng.variables, eng.state, inp))  # compile
    start = time.perf_counter()
    for _ in range(repeats):
        out = eng._decode(eng.variables, eng.state, inp)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats, sent


def bench_ep(args, model) -> list[dict]:
    """Decode step time and bytes per expert dispatch and decode row count."""
    from lcjax.config import MeshConfig, ParallelConfig
    from lcjax.serve.engine import Engine, EngineConfig
    from lcjax.serve.sharding import serving_mesh

    config, variables, tokenizer = model[:3]
    sizes = dict(item.split("=") for item in args.ep_mesh)
    mesh = serving_mesh(MeshConfig(data=1, **{k: int(v) for k, v in sizes.items()}))
    ec = EngineConfig(max_num_seqs=max(args.ep_rows), max_model_len=64, page_size=16)
    modes = {"gspmd": ParallelConfig(expert_dispatch="gspmd", rules=args.rules),
             "all_to_all dropless": ParallelConfig(expert_dispatch="all_to_all", rules=args.rules),
             f"all_to_all c={args.capacity:g}": ParallelConfig(
                 expert_dispatch="all_to_all", expert_capacity_factor=args.capacity, rules=args.rules)}
    rows_out = []
    for name, parallel in modes.items():
        eng = Engine(config, variables, tokenizer, ec, mesh=mesh, parallel=parallel)
        for rows in args.ep_rows:
            try:
                seconds, sent = step_time(eng, rows, args.decode_steps)
            except ValueError as err:  # rows not split over `expert`: all-to-all cannot run
                print(f"  {name} rows {rows}: n/a ({str(err)[:60]}...)", flush=True)
                continue
            rows_out.append(dict(dispatch=name, rows=rows, ms=seconds * 1e3, bytes=sent))
            print(f"  {name} rows {rows}: {seconds * 1e3:.2f} ms", flush=True)
    print(f"\nmesh {dict(mesh.shape)}\n{'dispatch':<24}{'rows':>6}{'ms/step':>10}{'bytes/step':>12}")
    for r in rows_out:
        print(f"{r['dispatch']:<24}{r['rows']:>6}{r['ms']:>10.2f}{r['bytes']:>12.0f}")
    return rows_out


def main(argv=None) -> int:
    args = parse_args(argv)
    flag = f"--xla_force_host_platform_device_count={args.devices}"
    if "jax" not in sys.modules and flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    import jax

    if args.ep:
        model = load(args.run_dir)
        rows = bench_ep(args, model)
        pathlib.Path(args.json).write_text(json.dumps(dict(
            model=model[3], devices=jax.device_count(), backend=jax.default_backend(),
            args=vars(args), rows=rows), indent=1))
        print(f"\nwrote {args.json}")
        return 0

    from lcjax.config import MeshConfig, ParallelConfig
    from lcjax.parallel import collective_bytes
    from lcjax.serve.sharding import compiled_decode_text, serving_mesh

    sizes = dict(item.split("=") for item in args.mesh)
    mesh = serving_mesh(MeshConfig(data=1, **{k: int(v) for k, v in sizes.items()}))
    model = load(args.run_dir)
    print(f"model: {model[3]}; mesh {dict(mesh.shape)} over {mesh.size} of {jax.device_count()} "
          f"{jax.default_backend()} devices; {args.num_seqs} greedy requests of {args.prompt_len} "
          f"+ {args.max_tokens} tokens; comm group size {args.group_size}", flush=True)
    rows = []
    _, _, rate1, _ = serve(model, args)
    rows.append(dict(mode="tensor 1 (one device)", agreement=None, logprob_dev=None, bytes=0.0,
                     decode_tok_s=rate1))
    ref = None
    for mode in ["none", *args.modes]:
        parallel = ParallelConfig(quantized_tp_comm=mode, comm_group_size=args.group_size,
                                  rules=args.rules)
        tokens, logprobs, rate, eng = serve(model, args, mesh, parallel)
        sent = collective_bytes(compiled_decode_text(eng, rows=args.num_seqs))
        if ref is None:
            ref = tokens, logprobs
        agree, dev = compare(tokens, logprobs, *ref)
        rows.append(dict(mode=f"{mode} ({'exact' if mode == 'none' else 'quantized'})", agreement=agree,
                         logprob_dev=dev, bytes=sent["total"], bytes_by_kind=sent, decode_tok_s=rate))
        print(f"  done {mode}", flush=True)
    print(f"\n{'TP comm':<24}{'greedy agree':>14}{'mean |dlogp|':>14}{'bytes/step':>12}{'decode tok/s':>14}")
    for r in rows:
        agree = "-" if r["agreement"] is None else f"{r['agreement']:.3f}"
        dev = "-" if r["logprob_dev"] is None else f"{r['logprob_dev']:.2e}"
        print(f"{r['mode']:<24}{agree:>14}{dev:>14}{r['bytes']:>12.0f}{r['decode_tok_s']:>14.1f}")
    result = dict(model=model[3], mesh=dict(mesh.shape), devices=jax.device_count(),
                  backend=jax.default_backend(), args=vars(args), rows=rows)
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
