"""`python -m lcjax.train [--config FILE_OR_PRESET ...] [key=value ...]`.

With no arguments: trains the tiny model on the Python standard library's sources
(configs/models/tiny.yaml + configs/train/stdlib_tiny.yaml), a few minutes on a laptop CPU.
Resumes from the newest checkpoint in train.run_dir when one exists.

Multi-host: start one process per host with --coordinator-address/--num-processes/--process-id
(or LCJAX_*/JAX_* env vars, or --distributed auto on TPU pods, SLURM, Open MPI); process 0
prints, logs and writes the run files, every process reads its rows and joins each checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from lcjax.config_io import load_config, resolve_config_path
from lcjax.parallel.distributed import add_distributed_flags, initialize_from_flags

DEFAULT_CONFIGS = ("tiny", "configs/train/stdlib_tiny.yaml")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lcjax.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=None,
                        help="preset name in configs/models or a YAML path; repeat to layer files "
                             f"(default: {' + '.join(DEFAULT_CONFIGS)})")
    parser.add_argument("--summary-only", action="store_true",
                        help="print the model summary (params, one forward) and exit")
    add_distributed_flags(parser)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=50")
    args = parser.parse_args(argv)
    try:  # first: jax.distributed must start before anything touches a device
        initialize_from_flags(args)
    except ValueError as err:
        parser.error(str(err))
    paths = [resolve_config_path(c) for c in (args.config or DEFAULT_CONFIGS)]
    config = load_config(paths, args.overrides)
    if args.summary_only:
        from lcjax.summary import forward_summary
        print(forward_summary(config))
        return 0
    from lcjax.parallel import is_primary
    from lcjax.train.loop import NonFiniteLoss, train
    primary = is_primary()
    if primary:
        print(f"run directory: {config.train.run_dir}")
    try:
        summary = train(config)
    except NonFiniteLoss as err:
        if primary:
            print(f"stopped: {err}", file=sys.stderr)
        return 1
    if primary:
        print(summary.table())
    return 130 if summary.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
