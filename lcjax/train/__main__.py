"""`python -m lcjax.train [--config FILE_OR_PRESET ...] [key=value ...]`.

With no arguments: trains the tiny model on the Python standard library's sources
(configs/models/tiny.yaml + configs/train/stdlib_tiny.yaml), under 4 minutes on 2 CPU cores.
Resumes from the newest checkpoint in train.run_dir when one exists.

Multi-host: start one process per host with --coordinator-address/--num-processes/--process-id
(or LCJAX_*/JAX_* env vars, or --distributed auto on TPU pods, SLURM, Open MPI); process 0
prints, logs and writes the run files, every process reads its rows and joins each checkpoint.

SIGINT / SIGTERM stop at the next step boundary with a checkpoint (exit 130 / 143; a second
signal exits at once); errors print one line `lcjax.train: error: ...` and exit 2 (`--traceback`
or LCJAX_TRACEBACK=1 shows the stack).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from lcjax.cli import run_main
from lcjax.config_io import load_config, resolve_config_path
from lcjax.parallel.distributed import add_distributed_flags, initialize_from_flags

DEFAULT_CONFIGS = ("tiny", "configs/train/stdlib_tiny.yaml")


def _exit_on_signal(signum, frame) -> None:
    """Outside the training loop (set-up, the samples after it) nothing needs saving: a signal
    ends the process at once."""
    del frame
    print(f"lcjax.train: {signal.Signals(signum).name}: exiting (no training step in progress)",
          file=sys.stderr)
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is threading.main_thread():  # train() installs its own
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _exit_on_signal)
    parser = argparse.ArgumentParser(prog="python -m lcjax.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=None,
                        help="preset name in configs/models or a YAML path; repeat to layer files "
                             f"(default: {' + '.join(DEFAULT_CONFIGS)})")
    parser.add_argument("--summary-only", action="store_true",
                        help="print the model summary (params, one forward) and exit")
    add_distributed_flags(parser)
    parser.add_argument("--no-samples", action="store_true",
                        help="skip the completions of fixed Python prompts printed after training")
    parser.add_argument("--traceback", action="store_true",
                        help="on an error, show the Python stack instead of one line")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=50")
    args = parser.parse_args(argv)
    try:  # first: jax.distributed must start before anything touches a device
        initialize_from_flags(args)
    except ValueError as err:
        parser.error(str(err))
    where = {"run_dir": None}

    def context(err: BaseException) -> str:
        """File-system errors under the run directory name train.run_dir."""
        run_dir = where["run_dir"]
        if run_dir is None or not isinstance(err, OSError):
            return ""
        inside = not err.filename or os.path.abspath(str(err.filename)).startswith(
            os.path.abspath(run_dir))
        return f"train.run_dir={run_dir!r}: " if inside else ""

    def body() -> int:
        paths = [resolve_config_path(c) for c in (args.config or DEFAULT_CONFIGS)]
        config = load_config(paths, args.overrides)
        where["run_dir"] = config.train.run_dir
        if args.summary_only:
            from lcjax.summary import forward_summary
            print(forward_summary(config))
            return 0
        from lcjax.parallel import is_primary
        from lcjax.train.loop import train
        primary = is_primary()
        if primary:
            print(f"run directory: {config.train.run_dir}", flush=True)
        summary = train(config)
        if primary:
            print(summary.table())
            import jax
            # One process only: with several, the others would reach the shutdown barrier
            # while process 0 still samples, and the coordination service aborts them.
            if (not args.no_samples and not summary.interrupted and summary.checkpoint
                    and jax.process_count() == 1):
                from lcjax.train.samples import print_completions
                print_completions(summary.run_dir)
        return summary.exit_code

    from lcjax.train.loop import NonFiniteLoss
    return run_main("lcjax.train", body, args.traceback,
                    user_errors=(ValueError, OSError, NonFiniteLoss), context=context)


if __name__ == "__main__":
    sys.exit(main())
