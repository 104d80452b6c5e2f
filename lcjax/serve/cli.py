"""`python -m lcjax.serve`: an OpenAI-compatible HTTP server for an lcjax model.

With no model flag it serves the newest checkpoint of the default training run
(`python -m lcjax.train`, run directory runs/stdlib_tiny) if there is one, else a randomly
initialised tiny model (with a warning). Prints the URL and `lcjax.serve: ready` once it takes
requests; Ctrl-C (or SIGTERM) stops accepting, drains running requests and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
from typing import Any, Optional, Sequence

from lcjax.config import Config

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
    model.add_argument("--config", metavar="YAML", action="append",
                       help="model preset or YAML for a randomly initialised model; repeat to layer "
                            "files (default: tiny)")
    model.add_argument("--served-model-name", help="the model id clients use (default: from the source)")
    model.add_argument("--chat-template", metavar="FILE",
                       help="Jinja2 chat template (default: the tokenizer's, else the built-in one)")
    model.add_argument("--quant", metavar="RECIPE", help="weight quantisation recipe (not available yet)")
    model.add_argument("--seed", type=int, default=0, help="random init and unseeded requests")

    engine = p.add_argument_group("engine")
    engine.add_argument("--max-num-seqs", type=int, default=8, help="concurrent requests (default 8)")
    engine.add_argument("--max-model-len", type=int,
                        help="prompt + completion tokens (default: min(512, max_position_embeddings))")
    engine.add_argument("--page-size", type=int, default=16, help="tokens per KV page (default 16)")
    engine.add_argument("--num-pages", type=int, help="KV pages in the pool (default: enough for all seqs)")
    engine.add_argument("--prefill-chunk", type=int, default=64, help="prompt tokens per prefill step")
    engine.add_argument("--num-speculative-tokens", type=int, default=0,
                        help="MTP draft tokens per decode round (0 = off)")
    engine.add_argument("--no-warmup", action="store_true",
                        help="skip compiling the first prefill/decode before printing ready")

    http = p.add_argument_group("HTTP")
    http.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    http.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = a free one)")
    http.add_argument("--api-key", default=os.environ.get("LCJAX_API_KEY"),
                      help="require `Authorization: Bearer KEY` (default: $LCJAX_API_KEY, else none)")
    http.add_argument("--drain-timeout", type=float, default=30.0,
                      help="seconds running requests get to finish on Ctrl-C (default 30)")
    http.add_argument("--log-level", default="info",
                      choices=("critical", "error", "warning", "info", "debug"))
    return p


def default_run_dir() -> pathlib.Path:
    """train.run_dir of `python -m lcjax.train` with no arguments (relative to the cwd)."""
    from lcjax.config_io import load_config, resolve_config_path
    from lcjax.train.__main__ import DEFAULT_CONFIGS

    return pathlib.Path(load_config([resolve_config_path(c) for c in DEFAULT_CONFIGS]).train.run_dir)


def load_model(args: argparse.Namespace) -> tuple[Config, Any, Any, str]:
    """(Config, variables, tokenizer, default served name) for the flags."""
    from lcjax.config_io import load_config, resolve_config_path
    from lcjax.serve import loading

    if args.checkpoint:
        config, variables, tokenizer = loading.load_run(args.checkpoint)
        return config, variables, tokenizer, pathlib.Path(args.checkpoint).absolute().name
    if args.hf_model:
        config, variables, tokenizer = loading.load_hf_model(args.hf_model)
        return config, variables, tokenizer, pathlib.Path(args.hf_model).absolute().name
    if args.config is None:
        run_dir = default_run_dir()
        step = loading.latest_step(run_dir)
        if step is not None:
            print(f"{PREFIX} loading the default training run {run_dir} (step {step})", flush=True)
            config, variables, tokenizer = loading.load_run(run_dir)
            return config, variables, tokenizer, run_dir.absolute().name
        print(f"{PREFIX} no checkpoint in {run_dir} (train one with `python -m lcjax.train`)",
              file=sys.stderr, flush=True)
    names = args.config or ["tiny"]
    print(f"{PREFIX} WARNING: serving a RANDOMLY INITIALISED {' + '.join(names)} model with a byte-level "
          "tokenizer: its output is noise", file=sys.stderr, flush=True)
    config = load_config([resolve_config_path(c) for c in names])
    config, variables, tokenizer = loading.random_model(config, args.seed)
    return config, variables, tokenizer, f"lcjax-random-{pathlib.Path(names[0]).stem}"


def engine_config(args: argparse.Namespace, config: Config):
    from lcjax.serve.engine import EngineConfig

    max_len = args.max_model_len or min(512, config.model.max_position_embeddings)
    return EngineConfig(max_num_seqs=args.max_num_seqs, max_model_len=max_len, page_size=args.page_size,
                        num_pages=args.num_pages, prefill_chunk=args.prefill_chunk,
                        num_speculative_tokens=args.num_speculative_tokens, seed=args.seed)


def warmup(engine) -> None:
    """Compile the smallest prefill and decode shapes so the first request is not a compile."""
    from lcjax.serve.sampling import SamplingParams

    bos = engine.config.model.bos_token_id
    engine.generate([[bos]], SamplingParams(max_tokens=2, ignore_eos=True))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quant:
        parser.error(f"--quant {args.quant}: quantised serving is not available yet")
    if args.config and (args.checkpoint or args.hf_model):
        parser.error("--config picks a randomly initialised model; --checkpoint / --hf-model bring their own")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        from lcjax.serve.api import build_app
        from lcjax.serve.async_engine import AsyncEngine
        from lcjax.serve.chat_template import resolve_chat_template
        from lcjax.serve.engine import Engine
        from lcjax.serve.metrics import ServingMetrics
        from lcjax.serve.server import Server, bind

        sock = bind(args.host, args.port)  # fail fast if the port is taken, before loading
        config, variables, tokenizer, name = load_model(args)
        name = args.served_model_name or name
        template = resolve_chat_template(args.chat_template, tokenizer)
        engine = Engine(config, variables, tokenizer, engine_config(args, config))
        if not args.no_warmup:
            print(f"{PREFIX} compiling (warm-up request)", flush=True)
            warmup(engine)
    except (ValueError, OSError) as err:  # bad flags, files or port: one line, no traceback
        print(f"{PREFIX} error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PREFIX} interrupted while starting", file=sys.stderr)
        return 130
    async_engine = AsyncEngine(engine, ServingMetrics(name))
    app = build_app(async_engine, tokenizer, name, api_key=args.api_key, chat_template=template,
                    max_model_len=engine.engine_config.max_model_len)
    server = Server(app, args.host, model_name=name, async_engine=async_engine, sock=sock,
                    drain_timeout=args.drain_timeout, log_level=args.log_level, announce=True)
    return server.run()
