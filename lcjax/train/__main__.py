"""`python -m lcjax.train [--config NAME_OR_PATH] [key=value ...]`.

The training loop arrives with the train issue; today this runs the tiny default end to end
(config -> init -> forward) and prints a summary table.
"""

from __future__ import annotations

import argparse
import sys

from lcjax.config_io import load_config, resolve_config_path
from lcjax.summary import forward_summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lcjax.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", help="preset name in configs/models or a YAML path")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. model.num_layers=4")
    args = parser.parse_args(argv)
    config = load_config(resolve_config_path(args.config), args.overrides)
    print(forward_summary(config, batch=args.batch, seq=args.seq))
    return 0


if __name__ == "__main__":
    sys.exit(main())
