"""`python -m lcjax.convert`: HF <-> lcjax checkpoint conversion and the parity report.

    python -m lcjax.convert hf-to-lcjax SRC DST [-o model.param_dtype=bfloat16 ...]
    python -m lcjax.convert lcjax-to-hf SRC DST [--max-shard-size 5GB] [--dtype bfloat16]
    python -m lcjax.convert compare SRC [--batch 2 --seq-len 32 --seed 0]

Conversions stream tensor by tensor, write into a temporary directory beside DST and rename it
on success; each prints the time and the peak RSS of the process. lcjax-to-hf also takes a
training run directory (its newest checkpoint). A failure prints one line
`python -m lcjax.convert <command>: error: ...` and exits 2 (LCJAX_TRACEBACK=1: the traceback).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from typing import Optional, Sequence

from lcjax.cli import run_main
from lcjax.config import Config
from lcjax.config_io import dump_config, load_config
from lcjax.convert import hf, orbax_io
from lcjax.convert.safetensors_io import parse_size



def _with_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """Apply dotted `key=value` overrides through the YAML loader (same validation and errors)."""
    if not overrides:
        return config
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        dump_config(config, f.name)
        return load_config(f.name, overrides)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lcjax.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    to_lcjax = sub.add_parser("hf-to-lcjax", help="HF directory -> lcjax checkpoint (orbax)")
    to_lcjax.add_argument("src")
    to_lcjax.add_argument("dst")
    to_lcjax.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                          help="config override applied to the config derived from config.json")
    to_lcjax.add_argument("--chunk-size", default="1GB", help="leaves buffered per orbax write")
    to_lcjax.add_argument("--overwrite", action="store_true")
    to_hf = sub.add_parser("lcjax-to-hf", help="lcjax checkpoint -> HF directory (safetensors)")
    to_hf.add_argument("src", help="a converted directory (config.yaml + variables/) or a training "
                                    "run directory (config.yaml + checkpoints/<step>/: the newest)")
    to_hf.add_argument("dst")
    to_hf.add_argument("--max-shard-size", default="5GB")
    to_hf.add_argument("--dtype", default=None, help="cast floating tensors, e.g. bfloat16")
    to_hf.add_argument("--zero-expert-stubs", choices=("auto", "yes", "no"), default="auto",
                       help="zero gate/up tensors for the zero experts, which some transformers 5 "
                            "releases need; auto: whatever the installed transformers loads")
    to_hf.add_argument("--no-zero-expert-stubs", dest="zero_expert_stubs", action="store_const",
                       const="no", help="same as --zero-expert-stubs no (pure Hub layout)")
    to_hf.add_argument("--overwrite", action="store_true")
    compare = sub.add_parser("compare", help="per-layer lcjax vs transformers report")
    compare.add_argument("src")
    compare.add_argument("--batch", type=int, default=2)
    compare.add_argument("--seq-len", type=int, default=32)
    compare.add_argument("--seed", type=int, default=0)
    return parser


def _run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.command == "hf-to-lcjax":
        config = _with_overrides(hf.config_from_checkpoint(args.src), args.override)
        hf.hf_to_lcjax(args.src, args.dst, config, overwrite=args.overwrite,
                       chunk_bytes=parse_size(args.chunk_size))
    elif args.command == "lcjax-to-hf":
        source = orbax_io.locate_checkpoint(args.src)
        if source.step is not None:
            print(f"{args.command}: training checkpoint {source.root} (step {source.step})")
        stubs = {"auto": None, "yes": True, "no": False}[args.zero_expert_stubs]
        hf.lcjax_to_hf(args.src, args.dst, max_shard_size=args.max_shard_size, dtype=args.dtype,
                       zero_expert_stubs=stubs, overwrite=args.overwrite)
    else:
        from lcjax.convert.compare import compare_with_transformers, format_rows

        rows = compare_with_transformers(args.src, batch=args.batch, seq_len=args.seq_len,
                                         seed=args.seed)
        print(format_rows(rows))
        model = hf.config_from_checkpoint(args.src).model
        if any(model.sparse_layers) and args.seq_len > model.loza.window_tokens:
            print(f"note: transformers has no LoZA sparse attention; beyond "
                  f"{model.loza.window_tokens} tokens its sparse sublayers differ by design")
        return 0
    print(f"{args.command}: wrote {args.dst} in {time.perf_counter() - start:.1f} s; "
          f"peak RSS {_peak_rss_mib():.0f} MiB")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; returns the exit status (2 for bad arguments or a failed conversion).

    A failure prints one line `<prog> <command>: error: <message>` on stderr; set the
    environment variable LCJAX_TRACEBACK=1 to get the whole traceback instead.
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed usage and the error
        return e.code if isinstance(e.code, int) else 2
    return run_main(f"{parser.prog} {args.command}", lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
