"""`--activation-sparsity METHOD:s=S` for `python -m lcjax.serve`: CHESS / CATS / CHESS+ thresholds.

Off by default. When given, the thresholds are calibrated at load time (after `--quant`, on the
model actually served) with lcjax.sparsity.chess on `--activation-sparsity-calib-batches`
batches (the run's training data when serving a training run, else random token ids; the same
source as --quant's calibration) and ride in the variables' "chess" collection, so prefill,
decode, MTP drafting and verification, continuous batching over the paged cache and sharded
serving all apply them. Decode steps run the FFN down projections through the sparse GEMV op.

`--sparse-verify ffn=METHOD[:s=S]` calibrates thresholds the same way (same batches, same
count) and installs them for the MTP verify pass only (sparse_verify.with_verify_thresholds):
prefill, plain decode and drafting stay as they were.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Callable

PREFIX = "lcjax.serve:"


def add_flags(group: argparse._ArgumentGroup) -> None:
    """The two flags, in the caller's argument group."""
    group.add_argument("--activation-sparsity", metavar="METHOD[:s=S]",
                       help="zero small FFN activations with calibrated thresholds: chess (per "
                            "channel), cats (per layer) or chess+ (chess, plus the q_a / o_proj "
                            "inputs; k/v stay dense) at target sparsity S, e.g. chess:s=0.5 "
                            "(lcjax/sparsity/chess.py). Off by default")
    group.add_argument("--activation-sparsity-calib-batches", type=int, default=4, metavar="N",
                       help="calibration batches for --activation-sparsity and --sparse-verify "
                            "ffn=.. (default 4)")


def check_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """parser.error for a bad spec or batch count (before anything loads)."""
    if args.activation_sparsity is None:
        return
    from lcjax.sparsity.chess import parse_spec

    try:
        parse_spec(args.activation_sparsity)
    except ValueError as err:
        parser.error(f"--activation-sparsity {args.activation_sparsity}: {err}")
    if args.activation_sparsity_calib_batches < 1:
        parser.error(f"--activation-sparsity-calib-batches {args.activation_sparsity_calib_batches}: "
                     "must be >= 1")


@dataclasses.dataclass(frozen=True)
class _Calibrates:
    """What calibration_batches asks of a recipe."""

    needs_calibration: bool = True


def apply(args: argparse.Namespace, model: Any, max_model_len: int,
          calibration_batches: Callable) -> Any:
    """`model` (a LoadedModel) with thresholds in its variables (every step's for
    --activation-sparsity, the verify pass's for --sparse-verify ffn=..), or unchanged without.

    `calibration_batches(recipe, model, num_batches, max_model_len) -> (batches, description)`
    is the server's source of calibration data (lcjax.serve.cli.calibration_batches).
    """
    verify = None
    if getattr(args, "sparse_verify", None) is not None:
        from lcjax.sparsity.sparse_verify import parse_settings

        verify = parse_settings(args.sparse_verify).ffn
    if args.activation_sparsity is None and verify in (None, "none"):
        return model
    from lcjax.sparsity import chess
    from lcjax.sparsity.sparse_verify import with_verify_thresholds

    batches, source = calibration_batches(_Calibrates(), model, args.activation_sparsity_calib_batches,
                                          max_model_len)
    batches, variables = list(batches), model.variables
    for spec, where in ((args.activation_sparsity, "every step"), (verify, "verify only")):
        if spec in (None, "none"):
            continue
        method, sparsity = chess.parse_spec(spec)
        print(f"{PREFIX} activation sparsity {method} s={sparsity}, {where} (calibration: "
              f"{source})", flush=True)
        thresholds = chess.calibrate(model.config, variables, batches, sparsity, method)
        print(f"{PREFIX} thresholds on {len(thresholds.flat())} sites", file=sys.stdout, flush=True)
        variables = (chess.with_thresholds(variables, thresholds) if where == "every step"
                     else with_verify_thresholds(variables, thresholds))
    return model._replace(variables=variables)
