"""`python -m lcjax.serve`: an OpenAI-compatible HTTP server for an lcjax model.

With no model flag it serves the newest checkpoint of the default training run
(`python -m lcjax.train`, run directory runs/stdlib_tiny) if there is one, else a randomly
initialised tiny model (with a warning). Before it prints the URL and `lcjax.serve: ready` it
compiles every step shape the engine can run (so no request ever waits for XLA), into jax's
persistent compilation cache (`--compilation-cache`), which makes a second start load instead of
compile. Ctrl-C (or SIGTERM) stops accepting, drains running requests and exits 0.

`--quant RECIPE` quantizes the loaded weights (lcjax.quant.quantize_model) before serving, e.g.
`--quant w8a8` or `--quant fptq_w4a8:group_size=8`. Recipes with static activation scales,
smoothing or clip search calibrate on `--quant-calib-batches` batches: the run's training data
when serving a training run directory (the held-out split stays unseen, as in
scripts/eval_quant.py), else uniform random token ids (FPTQ reports random-token calibration
works; pass a run directory for real data). Weight-only and per-token dynamic recipes need none.

Sharded serving: dotted `key=value` overrides after the flags set the serving mesh and how the
model is split over it, layered on `--config` as in `python -m lcjax.train`: `mesh.tensor=2
mesh.expert=4 parallel.rules=ep_fsdp_tp` runs one engine over 8 of the host's devices, params
(float or `--quant`) placed by the rule table, steps jitted with in/out shardings, the paged
latent cache replicated (lcjax.serve.sharding). The mesh defaults to one device (`mesh.data=1`);
sizes whose product is below the device count use the first devices. With a checkpoint or a
HF model only `mesh.*` and `parallel.*` keys are accepted (the model is the checkpoint's).
`--quantized-tp-comm int8|int6|int4` reduces the o_proj / down_proj partial sums with Flash
Communication's quantized all-reduce (float weights; `parallel.quantized_tp_comm`).

Multi-host serving: with the multi-host flags (or LCJAX_*/JAX_* env vars, as in `python -m
lcjax.train`) every process runs this command; the mesh must cover the devices of all processes
(e.g. `mesh.expert=4 mesh.tensor=-1`). Process 0 serves HTTP and schedules; each step's batch
plan is broadcast to the others, which run the same sharded step (lcjax.serve.multihost). When a
process dies the others exit with one line (status 3) instead of hanging. `--distributed off`
serves a full replica on each host's own devices instead.

Memory plan: `--plan` prints the plan of the model, mesh and `--quant` (lcjax.serve.plan) and
exits without loading weights. Every launch checks it first when one device's memory is known
(`--device-memory`, else a GPU/TPU's bytes_limit): exit 2 with one line when not one
`--max-model-len` sequence fits; without `--num-pages`, each pool gets min(max_num_seqs x
pages per sequence + 1, the plan's num_pages) pages.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
from typing import Any, NamedTuple, Optional, Sequence

from lcjax.config import TP_COMM_MODES, Config
from lcjax.parallel.distributed import add_distributed_flags, initialize_from_flags
from lcjax.serve import chess_flag, launch_plan, retrieval_flags
from lcjax.serve.plan import SERVING_FALLBACK_RULES, SERVING_RULES, rules_named  # noqa: F401
from lcjax.sparsity.sparse_verify import parse_settings

PREFIX = "lcjax.serve:"


def build_parser() -> argparse.ArgumentParser:
    summary, _, details = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(prog="python -m lcjax.serve", description=summary.split(": ", 1)[1],
                                epilog=details)
    model = p.add_argument_group("model (default: the default training run, else random tiny)")
    source = model.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", metavar="RUN_DIR",
                        help="a training run directory (config.yaml, tokenizer.json, checkpoints/)")
    source.add_argument("--hf-model", metavar="DIR", help="a Hugging Face LongCat-Flash directory")
    source.add_argument("--lora", metavar="RUN_DIR",
                        help="a LoRA / AFA-LoRA training run: its frozen base with the adapters "
                             "applied unmerged, at the saved step's AFA coefficient (to serve "
                             "merged weights: `python -m lcjax.lora merge RUN OUT`, then "
                             "--checkpoint OUT)")
    model.add_argument("--config", metavar="YAML", action="append",
                       help="model preset or YAML for a randomly initialised model; repeat to layer "
                            "files (default: tiny)")
    model.add_argument("--served-model-name", help="the model id clients use (default: from the source)")
    model.add_argument("--chat-template", metavar="FILE",
                       help="Jinja2 chat template (default: the tokenizer's, else the built-in one)")
    model.add_argument("--quant", metavar="RECIPE",
                       help="quantize the weights with this lcjax.quant recipe, optionally with "
                            "overrides (NAME:key=value,...); names: " + ", ".join(_recipe_names()))
    model.add_argument("--quant-calib-batches", type=int, default=4, metavar="N",
                       help="calibration batches for recipes that calibrate (default 4)")
    chess_flag.add_flags(model)
    model.add_argument("--seed", type=int, default=0, help="random init and unseeded requests")

    engine = p.add_argument_group("engine")
    engine.add_argument("--max-num-seqs", type=int, default=8, help="concurrent requests (default 8)")
    engine.add_argument("--max-model-len", type=int,
                        help="prompt + completion tokens (default: min(512, max_position_embeddings))")
    engine.add_argument("--page-size", type=int, default=16, help="tokens per KV page (default 16)")
    engine.add_argument("--num-pages", type=int,
                        help="KV pages in the pool (default: enough for all seqs, capped by the "
                             "memory plan when the device memory is known)")
    engine.add_argument("--prefill-chunk", type=int, default=64, help="prompt tokens per prefill step")
    engine.add_argument("--max-prefill-seqs", type=int, default=4,
                        help="requests prefilled together in one step (default 4; more drains a "
                             "burst of arrivals sooner, at one more compiled shape per power of two)")
    engine.add_argument("--num-speculative-tokens", type=int, default=0,
                        help="MTP draft tokens per decode round (0 = off)")
    engine.add_argument("--sparse-verify", nargs="?", const="", metavar="KEY=V,..",
                        help="verify MTP drafts over KV pages retrieved by the first verify token "
                             "(lcjax/sparsity/sparse_verify.py; keys: block_budget, sink_blocks, "
                             "local_blocks, reuse_layers, dense_first, moe_rule, ...; "
                             "ffn=chess:s=0.5: CHESS thresholds calibrated for the verify pass "
                             "only; with --kv-retrieval a2ats the first token's retrieved keys "
                             "are shared instead, and the page keys do not apply; bare flag: "
                             "the defaults). Off by default")
    retrieval_flags.add_flags(engine)
    engine.add_argument("--no-warmup", action="store_true",
                        help="skip compiling every step shape before printing ready (requests "
                             "with a new shape then wait for XLA)")
    engine.add_argument("--compilation-cache", metavar="DIR",
                        help="persistent XLA compilation cache, so a second start loads instead of "
                             "compiling (default: $JAX_COMPILATION_CACHE_DIR, else "
                             "$XDG_CACHE_HOME/lcjax/xla or ~/.cache/lcjax/xla; 'none' = off)")

    http = p.add_argument_group("HTTP")
    http.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    http.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = a free one)")
    http.add_argument("--api-key", default=os.environ.get("LCJAX_API_KEY"),
                      help="require `Authorization: Bearer KEY` (default: $LCJAX_API_KEY, else none)")
    http.add_argument("--drain-timeout", type=float, default=30.0,
                      help="seconds running requests get to finish on Ctrl-C (default 30)")
    http.add_argument("--no-reasoning-parser", dest="reasoning_parser", action="store_false",
                      help="leave <longcat_think> blocks in chat content (default: split them into "
                           "reasoning_content)")
    http.add_argument("--log-level", default="info",
                      choices=("critical", "error", "warning", "info", "debug"))
    par = p.add_argument_group("sharding (over this host's devices)")
    par.add_argument("--quantized-tp-comm", choices=TP_COMM_MODES,
                     help="tensor-parallel all-reduce of o_proj / down_proj partial sums: none "
                          "(exact) or quantized (Flash Communication); sets parallel.quantized_tp_comm")
    launch_plan.add_flags(p.add_argument_group("memory plan (lcjax.serve.launch_plan)"))
    par.add_argument("overrides", nargs="*", metavar="key=value",
                     help="dotted config overrides, e.g. mesh.tensor=2 mesh.expert=4 "
                          "parallel.rules=fsdp_tp (random models: any key, e.g. model.num_layers=1)")
    add_distributed_flags(p)
    p.add_argument("--heartbeat-timeout", type=int, default=10, metavar="SECONDS",
                   help="multi-host: seconds without a heartbeat before jax's coordination "
                        "service declares a process dead (default 10)")
    return p


SHARDING_SECTIONS = ("mesh.", "parallel.")


def serving_settings(args: argparse.Namespace) -> tuple[Any, Any]:
    """(MeshConfig, ParallelConfig) of the flags: the `mesh` / `parallel` sections of the
    `--config` files and the overrides, on a one-device default (`mesh.data=1`). ValueError
    names a bad key or value."""
    import yaml

    from lcjax.config_io import load_config, resolve_config_path

    files = [resolve_config_path(c) for c in (args.config or [])]
    sets_data = any("data" in ((yaml.safe_load(f.read_text()) or {}).get("mesh") or {}) for f in files)
    overrides = [o for o in getattr(args, "overrides", []) if o.startswith(SHARDING_SECTIONS)]
    if args.quantized_tp_comm is not None:
        overrides.append(f"parallel.quantized_tp_comm={args.quantized_tp_comm}")
    defaults = ([] if sets_data else ["mesh.data=1"]) + (
        [] if rules_named(files, overrides) else [f"parallel.rules={SERVING_RULES}"])
    config = load_config(files, defaults + overrides)
    return config.mesh, config.parallel


def fit_rules(args: argparse.Namespace, mesh_cfg, parallel) -> Any:
    """`parallel` with the rules the server picks (plan.serving_plan): the weight-stationary
    default, or the FSDP split when the device memory is known and the default leaves no room
    for a sequence. Rules the flags or files name are kept (memory_check then reports a misfit)."""
    import dataclasses

    from lcjax.config_io import resolve_config_path
    from lcjax.serve.launch_plan import device_memory, launch_plan

    files = [resolve_config_path(c) for c in (args.config or [])]
    device_bytes = device_memory(args.device_memory)
    if rules_named(files, args.overrides) or device_bytes is None:
        return parallel
    plan, _ = launch_plan(args, mesh_cfg, parallel, device_bytes, rules_given=False)
    if plan.rules == parallel.rules:
        return parallel
    print(f"{PREFIX} weights replicated over fsdp x expert ({parallel.rules}) leave no room for a "
          f"sequence; splitting them ({plan.rules})", flush=True)
    return dataclasses.replace(parallel, rules=plan.rules)


def _recipe_names() -> list[str]:
    from lcjax.quant.recipes import RECIPES

    return sorted(RECIPES)


def default_run_dir() -> pathlib.Path:
    """train.run_dir of `python -m lcjax.train` with no arguments (relative to the cwd)."""
    from lcjax.config_io import load_config, resolve_config_path
    from lcjax.train.__main__ import DEFAULT_CONFIGS

    return pathlib.Path(load_config([resolve_config_path(c) for c in DEFAULT_CONFIGS]).train.run_dir)


class LoadedModel(NamedTuple):
    config: Config
    variables: Any  # {"params", "router_bias"}
    tokenizer: Any
    name: str  # the default served model name
    run_dir: Optional[pathlib.Path] = None  # the training run it came from, if any


def load_model(args: argparse.Namespace) -> LoadedModel:
    """The model, tokenizer and default served name for the flags."""
    from lcjax.config_io import load_config, resolve_config_path
    from lcjax.serve import loading

    if args.checkpoint:
        run_dir = pathlib.Path(args.checkpoint).absolute()
        return LoadedModel(*loading.load_run(run_dir), run_dir.name, run_dir)
    if getattr(args, "lora", None):
        from lcjax.lora.merge import load_unmerged_run

        run_dir = pathlib.Path(args.lora).absolute()
        config, variables, tokenizer, lam = load_unmerged_run(run_dir)
        print(f"{PREFIX} serving {run_dir.name}: base + unmerged rank-{config.lora.rank} adapters "
              f"(AFA lam = {lam:.4g})", flush=True)
        return LoadedModel(config, variables, tokenizer, run_dir.name, run_dir)
    if args.hf_model:
        return LoadedModel(*loading.load_hf_model(args.hf_model), pathlib.Path(args.hf_model).absolute().name)
    if args.config is None:
        run_dir = default_run_dir()
        step = loading.latest_step(run_dir)
        if step is not None:
            print(f"{PREFIX} loading the default training run {run_dir} (step {step})", flush=True)
            return LoadedModel(*loading.load_run(run_dir), run_dir.absolute().name, run_dir.absolute())
        print(f"{PREFIX} no checkpoint in {run_dir} (train one with `python -m lcjax.train`)",
              file=sys.stderr, flush=True)
    names = args.config or ["tiny"]
    print(f"{PREFIX} WARNING: serving a RANDOMLY INITIALISED {' + '.join(names)} model with a byte-level "
          "tokenizer: its output is noise", file=sys.stderr, flush=True)
    config = load_config([resolve_config_path(c) for c in names], getattr(args, "overrides", []))
    return LoadedModel(*loading.random_model(config, args.seed), f"lcjax-random-{pathlib.Path(names[0]).stem}")


def calibration_batches(recipe, model: LoadedModel, num_batches: int, max_model_len: int):
    """(batches, description) for `recipe`: None when it does not calibrate; the run's training
    batches when the model came from a training run whose data still loads; else random ids."""
    if not recipe.needs_calibration:
        return None, "none needed"
    if model.run_dir is not None:
        from lcjax.data import make_iterator

        try:
            iterator = make_iterator(model.config.data, model.tokenizer, "train")
            batches = [next(iterator) for _ in range(num_batches)]
            return batches, f"{num_batches} training batches of {model.run_dir.name}"
        except (OSError, ValueError, StopIteration) as err:  # data moved or gone since training
            print(f"{PREFIX} WARNING: the run's training data does not load ({err}); calibrating "
                  "on random token ids", file=sys.stderr, flush=True)
    from lcjax.quant.calibrate import random_token_batches

    seq = min(128, max_model_len)
    batches = random_token_batches(model.config, num_batches, 4, seq, seed=0)
    return batches, f"{num_batches} batches of random token ids [4, {seq}]"


def quantize(args: argparse.Namespace, model: LoadedModel, max_model_len: int) -> LoadedModel:
    """`model` with its weights quantized by `--quant` (ValueError naming layer and setting)."""
    from lcjax.quant import quantize_model
    from lcjax.quant.recipes import get_recipe

    recipe = get_recipe(args.quant)
    calib, source = calibration_batches(recipe, model, args.quant_calib_batches, max_model_len)
    print(f"{PREFIX} quantizing with {recipe.name} (calibration: {source})", flush=True)
    try:
        variables, report = quantize_model(model.variables, model.config, recipe, calib, return_report=True)
    except ValueError as err:
        if "group_size" not in str(err):
            raise
        raise ValueError(f"{err} (pick a group size dividing every contraction dimension: "
                         f"--quant {recipe.name.split(':')[0]}:group_size=G)") from None
    print(f"{PREFIX} quantized {len(report)} weights; router, norms, embeddings and lm_head stay float",
          flush=True)
    return model._replace(variables=variables)


def engine_config(args: argparse.Namespace, config: Config, planned_pages: Optional[int] = None):
    """EngineConfig of the flags; `planned_pages` (the memory plan's bound) when no --num-pages."""
    from lcjax.serve.engine import EngineConfig

    max_len = args.max_model_len or min(512, config.model.max_position_embeddings)
    return EngineConfig(max_num_seqs=args.max_num_seqs, max_model_len=max_len, page_size=args.page_size,
                        num_pages=args.num_pages or planned_pages, prefill_chunk=args.prefill_chunk,
                        max_prefill_seqs=args.max_prefill_seqs,
                        num_speculative_tokens=args.num_speculative_tokens, seed=args.seed,
                        sparse_verify=None if getattr(args, "sparse_verify", None) is None
                        else parse_settings(args.sparse_verify))


def compilation_cache_dir(flag: Optional[str]) -> Optional[pathlib.Path]:
    """The persistent compilation cache folder for `--compilation-cache` (None = off)."""
    if flag is not None:
        return None if flag.lower() == "none" else pathlib.Path(flag).expanduser()
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return pathlib.Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "lcjax" / "xla"


def enable_compilation_cache(directory: Optional[pathlib.Path]) -> None:
    """Point jax's persistent compilation cache at `directory` (None: leave it off). Every
    compile is cached (min compile time 0 unless JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS
    says otherwise): the step shapes are what a start spends its time on."""
    import jax

    if directory is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"--compilation-cache {directory}: cannot create the folder ({err.strerror}); "
                      "pass another folder or 'none'") from None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    min_secs = float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", 0.0))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_secs)


def warmup(engine) -> None:
    """Compile every step shape the engine can run (`Engine.warmup`), so no request waits for
    XLA once the server is ready; prints a line per shape and the total time."""
    import time

    start = time.perf_counter()

    def progress(i, total, shape):
        what = f"{shape[1]} rows x {shape[2]} tokens" if shape[0] == "prefill" else f"{shape[1]} rows"
        print(f"{PREFIX} compiling step shape {i + 1}/{total}: {shape[0]} {what}", flush=True)

    total = len(engine.compile_plan())
    engine.warmup(progress)
    print(f"{PREFIX} compiled {total} step shapes in {time.perf_counter() - start:.1f} s",
          flush=True)


def sharded(mesh_cfg, parallel) -> dict:
    """Engine keyword arguments for the serving mesh ({} on one device); prints the layout."""
    import jax

    from lcjax.serve.sharding import serving_mesh

    mesh = serving_mesh(mesh_cfg)
    if jax.process_count() > 1:
        from lcjax.serve.multihost import check_mesh

        check_mesh(mesh)
    if mesh.size == 1:
        if parallel.quantized_tp_comm != "none":
            print(f"{PREFIX} WARNING: --quantized-tp-comm {parallel.quantized_tp_comm} has no "
                  "effect on one device (set mesh.tensor > 1)", file=sys.stderr, flush=True)
        return {}
    axes = " x ".join(f"{a}={n}" for a, n in mesh.shape.items() if n > 1)
    hosts = f" of {jax.process_count()} processes" if jax.process_count() > 1 else ""
    print(f"{PREFIX} sharding over {mesh.size} of {jax.device_count()} devices{hosts}: {axes} (rules "
          f"{parallel.rules}, expert dispatch {parallel.expert_dispatch}, TP comm "
          f"{parallel.quantized_tp_comm})", flush=True)
    return dict(mesh=mesh, parallel=parallel)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:  # first: jax.distributed must start before anything touches a device
        initialize_from_flags(args, heartbeat_timeout_seconds=args.heartbeat_timeout)
    except ValueError as err:
        parser.error(str(err))
    if args.quant is not None:
        from lcjax.quant.recipes import get_recipe

        try:
            get_recipe(args.quant)
        except ValueError as err:
            parser.error(f"--quant {args.quant}: {err}")
    if args.quant_calib_batches < 1:
        parser.error(f"--quant-calib-batches {args.quant_calib_batches}: must be >= 1")
    chess_flag.check_flags(args, parser)
    retrieval_flags.check_flags(args, parser)
    if args.sparse_verify is not None:
        try:
            parse_settings(args.sparse_verify).check(args.num_speculative_tokens + 1, args.page_size)
        except ValueError as err:
            parser.error(f"--sparse-verify {args.sparse_verify!r}: {err}")
        if args.num_speculative_tokens < 1:
            parser.error("--sparse-verify verifies MTP drafts: it needs --num-speculative-tokens >= 1")
    if args.config and (args.checkpoint or args.hf_model or args.lora):
        parser.error("--config picks a randomly initialised model; --checkpoint / --hf-model / "
                     "--lora bring their own")
    foreign = [o for o in args.overrides if not o.startswith(SHARDING_SECTIONS)]
    if foreign and (args.checkpoint or args.hf_model or args.lora):
        parser.error(f"override {foreign[0]!r}: with --checkpoint / --hf-model / --lora only mesh.* "
                     "and parallel.* keys apply (the model is the checkpoint's)")
    try:
        mesh_cfg, parallel = serving_settings(args)
    except ValueError as err:
        parser.error(str(err))
    try:
        parallel = fit_rules(args, mesh_cfg, parallel)
        planned_pages = memory_check(args, mesh_cfg, parallel)
    except ValueError as err:  # a bad --device-memory, or a plan that does not fit
        print(f"{PREFIX} error: {err}", file=sys.stderr)
        return 2
    if args.plan:
        return 0
    try:
        enable_compilation_cache(compilation_cache_dir(args.compilation_cache))
    except OSError as err:
        print(f"{PREFIX} error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        from lcjax.serve.api import build_app
        from lcjax.serve.async_engine import AsyncEngine
        from lcjax.serve.chat_template import resolve_chat_template
        from lcjax.serve.engine import Engine
        from lcjax.serve.metrics import ServingMetrics
        from lcjax.serve.server import Server, bind

        import jax

        leader = jax.process_index() == 0
        # Process 0 serves HTTP: fail fast if the port is taken, before loading.
        sock = bind(args.host, args.port) if leader else None
        model = load_model(args)
        ec = engine_config(args, model.config, planned_pages)
        if args.quant is not None:
            model = quantize(args, model, ec.max_model_len)
        model = chess_flag.apply(args, model, ec.max_model_len, calibration_batches)
        model, retrieval = retrieval_flags.apply(args, model, ec.max_model_len, calibration_batches)
        config, variables, tokenizer = model.config, model.variables, model.tokenizer
        name = args.served_model_name or model.name
        template = resolve_chat_template(args.chat_template, tokenizer)
        engine = Engine(config, variables, tokenizer, ec, **sharded(mesh_cfg, parallel), **retrieval)
        if engine.parallelism is not None:
            from lcjax.serve.sharding import per_device_bytes

            print(f"{PREFIX} weights: {per_device_bytes(engine.variables) / 2**20:.1f} MiB per device",
                  flush=True)
        if jax.process_count() > 1:
            from lcjax.serve import multihost

            if not leader:
                return multihost.follow(engine)
            engine = multihost.Leader(engine)
        if not args.no_warmup:
            warmup(engine)
    except (ValueError, OSError) as err:  # bad flags, files or port: one line, no traceback
        print(f"{PREFIX} error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PREFIX} interrupted while starting", file=sys.stderr)
        return 130
    async_engine = AsyncEngine(engine, ServingMetrics(name))
    app = build_app(async_engine, tokenizer, name, api_key=args.api_key, chat_template=template,
                    max_model_len=engine.engine_config.max_model_len,
                    reasoning_parser=args.reasoning_parser)
    server = Server(app, args.host, model_name=name, async_engine=async_engine, sock=sock,
                    drain_timeout=args.drain_timeout, log_level=args.log_level, announce=True)
    try:
        return server.run()
    finally:
        if hasattr(engine, "stop_followers"):
            engine.stop_followers()


def memory_check(args: argparse.Namespace, mesh_cfg, parallel) -> Optional[int]:
    """The memory plan before loading (lcjax.serve.launch_plan): printed with `--plan`; checked
    when the device memory is known (ValueError when it does not fit). Returns the planned page
    count for a launch without --num-pages (None: no bound known)."""
    from lcjax.serve.plan import check_fits, format_plan

    device_bytes = launch_plan.device_memory(args.device_memory)
    if device_bytes is None and not args.plan:
        return None
    plan, title = launch_plan.launch_plan(args, mesh_cfg, parallel, device_bytes)
    if args.plan:
        print(format_plan(plan, title), flush=True)
    check_fits(plan)
    pages = launch_plan.planned_num_pages(plan, args.max_num_seqs)
    if pages is not None and not args.plan and args.num_pages is None:
        print(f"{PREFIX} {launch_plan.plan_message(plan, pages, args.max_num_seqs)}", flush=True)
    return pages
