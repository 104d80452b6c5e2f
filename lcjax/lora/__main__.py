"""`python -m lcjax.lora merge RUN OUT`: fold a LoRA run's adapters into a normal run directory."""

from __future__ import annotations

import argparse
import sys

from lcjax.cli import run_main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lcjax.lora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="W + (alpha / r) B A into the base weights")
    merge.add_argument("run", help="a LoRA training run directory (lcjax.train with lora.rank > 0)")
    merge.add_argument("out", help="the new run directory to write (must not exist)")
    merge.add_argument("--traceback", action="store_true", help="show the full stack on errors")
    args = parser.parse_args(argv)

    def work() -> int:
        from lcjax.lora.merge import merge as merge_run

        path = merge_run(args.run, args.out)
        print(f"merged {args.run} -> {path}")
        return 0

    return run_main("python -m lcjax.lora", work, traceback=args.traceback)


if __name__ == "__main__":
    sys.exit(main())
