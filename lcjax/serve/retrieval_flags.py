"""`--kv-retrieval a2ats` and `--ngram-offload host` for `python -m lcjax.serve`. Both off by default.

--kv-retrieval a2ats: decode attends, in every full-attention sublayer, the sinks, the local
window and the keys A²ATS retrieves by vector-quantized scores (lcjax/sparsity/a2ats.py). The
codebooks come from `--a2ats-codebook FILE` (saved by A2ATSIndex.save) or are calibrated at
startup on `--a2ats-calib-batches` batches (the run's training data, else random ids: the same
source as --quant's calibration). `--a2ats KEY=V,..` sets A2ATSConfig fields (topk_fraction,
codebook_size, sink_tokens, local_window, wrope_position, offload=host, ...). With
`--sparse-verify` the verify pass attends one key set, retrieved for its first token and shared by
the drafts and the next sublayers (lcjax/sparsity/sparse_verify_retrieval.py); the Quest page keys
(block_budget, sink_blocks, local_blocks, head_reduce) do not apply then and are refused.

--ngram-offload host: the Flash-Lite hashed N-gram tables live in host memory; each step moves
only the rows its tokens hash to (lcjax/sparsity/host_offload.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Callable

PREFIX = "lcjax.serve:"


def add_flags(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--kv-retrieval", choices=("none", "a2ats"), default="none",
                       help="decode attention over retrieved keys: a2ats (vector-quantized key "
                            "retrieval, lcjax/sparsity/a2ats.py); default none (exact)")
    group.add_argument("--a2ats", default="", metavar="KEY=V,..",
                       help="A2ATSConfig fields, e.g. topk_fraction=0.03,offload=host")
    group.add_argument("--a2ats-codebook", metavar="FILE",
                       help="codebooks saved by A2ATSIndex.save (default: calibrate at startup)")
    group.add_argument("--a2ats-calib-batches", type=int, default=4, metavar="N",
                       help="calibration batches when no --a2ats-codebook is given (default 4)")
    group.add_argument("--ngram-offload", choices=("none", "host"), default="none",
                       help="keep the hashed N-gram tables in host memory (default none)")


def a2ats_config(spec: str):
    """A2ATSConfig from 'key=value,..' (values parsed as int, float, bool or string)."""
    from lcjax.sparsity.a2ats import A2ATSConfig

    fields = {f.name: f.type for f in dataclasses.fields(A2ATSConfig)}
    values: dict[str, Any] = {}
    for item in filter(None, spec.split(",")):
        key, sep, raw = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"{item!r} is not KEY=VALUE with KEY one of {sorted(fields)}")
        kind = type(getattr(A2ATSConfig(), key))
        values[key] = raw.lower() in ("1", "true", "yes") if kind is bool else kind(raw)
    return A2ATSConfig(**values)


def check_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """parser.error for bad settings (before anything loads)."""
    try:
        a2ats_config(args.a2ats)
    except (ValueError, TypeError) as err:
        parser.error(f"--a2ats {args.a2ats!r}: {err}")
    if args.a2ats_calib_batches < 1:
        parser.error(f"--a2ats-calib-batches {args.a2ats_calib_batches}: must be >= 1")
    if args.kv_retrieval == "none" and (args.a2ats or args.a2ats_codebook):
        parser.error("--a2ats / --a2ats-codebook need --kv-retrieval a2ats")
    verify = getattr(args, "sparse_verify", None)
    if args.kv_retrieval == "a2ats" and verify:
        from lcjax.sparsity.sparse_verify_retrieval import PAGE_ONLY_KEYS

        for item in filter(None, (s.strip() for s in verify.split(","))):
            if item.partition("=")[0].strip() in PAGE_ONLY_KEYS:
                parser.error(f"--sparse-verify {item}: a page setting, which does not apply with "
                             "--kv-retrieval a2ats (the --a2ats topk_fraction, "
                             "max_gather_fraction, sink_tokens and local_window size the keys "
                             "the verify pass attends)")


@dataclasses.dataclass(frozen=True)
class _Calibrates:
    needs_calibration: bool = True


def apply(args: argparse.Namespace, model: Any, max_model_len: int,
          calibration_batches: Callable) -> tuple[Any, dict]:
    """(model with N-gram tables offloaded if asked, Engine keyword arguments)."""
    kwargs: dict = {}
    cfg = model.config.model
    if args.ngram_offload == "host":
        from lcjax.sparsity.host_offload import device_bytes, offload_ngram_tables

        before = device_bytes(model.variables)
        model = model._replace(variables=offload_ngram_tables(model.variables))
        print(f"{PREFIX} N-gram tables in host memory: weights on the device "
              f"{before / 2**20:.1f} -> {device_bytes(model.variables) / 2**20:.1f} MiB", flush=True)
    if args.kv_retrieval == "a2ats":
        from lcjax.sparsity import a2ats_calibrate

        a2 = a2ats_config(args.a2ats)
        if args.a2ats_codebook:
            overrides = {f.name: getattr(a2, f.name) for f in dataclasses.fields(a2)
                         if f"{f.name}=" in args.a2ats}
            index = a2ats_calibrate.load_index(args.a2ats_codebook, cfg, **overrides)
            source = args.a2ats_codebook
        else:
            batches, source = calibration_batches(_Calibrates(), model, args.a2ats_calib_batches,
                                                  max_model_len)
            prompts = [b["inputs"] if isinstance(b, dict) else b for b in batches]
            index = a2ats_calibrate.calibrate(cfg, model.variables, prompts, a2)
        print(f"{PREFIX} A²ATS retrieval: top {index.config.topk_fraction:.0%} per head, "
              f"{index.config.codebook_size} centroids, offload {index.config.offload} "
              f"(codebooks: {source})", file=sys.stdout, flush=True)
        kwargs["kv_retrieval"] = index
    return model, kwargs
