"""Bytes of the serving KV cache in the memory plan, by where they live: device or host memory.

What `serve.kv_cache.init_serve_cache` (+ `sparsity.a2ats_cache.attach`) allocates, counted from
the model config alone. Per max_model_len sequence (`pages` = ceil((max_model_len + speculative
tokens) / page_size)):
  page pools   pages x page_size x (C+R) in the compute dtype, one pool per full-attention
               sublayer and one for the MTP layer;
  page bounds  pages x 2 x (C+R) in the compute dtype per full-attention sublayer, when the
               engine keeps per-page key bounds (`engine_state.page_bounds_needed`: sparse
               verification);
  A²ATS codes  pages x page_size codes per full-attention sublayer (`a2ats.code_dtype`), with
               --kv-retrieval a2ats;
  rings        a LoZA ring of cache_tokens slots (+ int32 positions) per sparse sublayer, and
               the n-gram history (per engine slot: one slot per sequence);
plus one reserved page of every pool, and (A²ATS) the float32 codebooks, once: per full sublayer
[K, C+R] centroids twice and the [C+R, C+R] transform.

Host offload (`--a2ats offload=host`) moves the full-attention sublayers' pools (and their
reserved pages) to pinned host memory; the codes, codebooks, bounds, the MTP pool (no codebook)
and the rings stay on the device, and each step's gathered rows are a fixed-size buffer counted
in the plan's headroom. Sizes here are per device copy of the cache (the engine keeps a full
copy per device; the plan multiplies host bytes by the devices one host holds).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from typing import Any, Optional

import jax.numpy as jnp

from lcjax.sparsity.a2ats import code_dtype

# Default host budget: half the machine's RAM. Offloaded pages are pinned (page-locked, never
# swapped), so over-committing them starves the OS, checkpoint loading and the page cache and
# ends in the OOM killer; fewer pages only make requests wait. --host-memory raises it.
HOST_MEMORY_FRACTION = 0.5
CODEBOOK_ITEMSIZE = 4  # float32, as a2ats.build_codebook stores centroids and transform


@dataclasses.dataclass(frozen=True)
class KVBytes:
    """Cache bytes of one device's copy: per max_model_len sequence and fixed, device vs host."""

    device_per_sequence: int  # pools kept on the device, codes, bounds, rings, history
    device_reserved: int  # reserved page 0 of every device pool (codes and bounds included)
    host_per_sequence: int = 0  # offloaded pools (A²ATS offload=host)
    host_reserved: int = 0  # reserved page 0 of every offloaded pool
    codebook_bytes: int = 0  # A²ATS codebooks, once per device
    bounds_per_sequence: int = 0  # page key bounds, part of device_per_sequence


def kv_bytes(model: Any, max_model_len: int, page_size: int, num_speculative_tokens: int = 0, *,
             retrieval: Any = None, page_bounds: bool = False) -> KVBytes:
    """KVBytes of serving `model` (a ModelConfig); `retrieval` is an A2ATSConfig (A²ATS codes,
    codebooks and, with offload='host', pools in host memory) or None; `page_bounds` counts the
    per-page key bounds of every full-attention sublayer."""
    itemsize = jnp.dtype(model.dtype).itemsize
    width = model.mla.kv_lora_rank + model.mla.qk_rope_head_dim
    full = sum(not s for s in model.sparse_layers)
    mtp = 1 if model.mtp_layers else 0
    pages = math.ceil((max_model_len + num_speculative_tokens) / page_size)
    pool_page = page_size * width * itemsize
    bounds_page = full * 2 * width * itemsize if page_bounds else 0
    codes_page, books = 0, 0
    if retrieval is not None:
        codes_page = full * page_size * jnp.dtype(code_dtype(retrieval.codebook_size)).itemsize
        books = full * (2 * retrieval.codebook_size * width + width * width) * CODEBOOK_ITEMSIZE
    offload = retrieval is not None and retrieval.offload == "host"
    device_page = (mtp + (0 if offload else full)) * pool_page + codes_page + bounds_page
    host_page = full * pool_page if offload else 0
    rings = sum(model.sparse_layers) * model.loza.cache_tokens * (width * itemsize + 4)
    history = 4 * (model.ngram.neighbor_num - 1 if model.ngram.enabled else 0)
    return KVBytes(device_per_sequence=pages * device_page + rings + history,
                   device_reserved=device_page, host_per_sequence=pages * host_page,
                   host_reserved=host_page, codebook_bytes=books,
                   bounds_per_sequence=pages * bounds_page)


def default_host_memory() -> Optional[int]:
    """HOST_MEMORY_FRACTION of this machine's physical RAM (None where sysconf cannot tell)."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return int(total * HOST_MEMORY_FRACTION) if total > 0 else None


def add_kv_flags(parser) -> None:
    """Where the KV cache lives: --kv-retrieval / --a2ats (as `python -m lcjax.serve`),
    --sparse-verify (page bounds) and --host-memory."""
    parser.add_argument("--kv-retrieval", choices=("none", "a2ats"), default="none",
                        help="a2ats: count A²ATS codes and codebooks (lcjax/serve/plan_kv.py)")
    parser.add_argument("--a2ats", default="", metavar="KEY=V,..",
                        help="A2ATSConfig fields, e.g. offload=host,codebook_size=4096")
    parser.add_argument("--sparse-verify", nargs="?", const="", metavar="KEY=V,..",
                        help="count the page key bounds sparse verification keeps")
    add_host_memory_flag(parser)


def add_host_memory_flag(parser) -> None:
    parser.add_argument("--host-memory", metavar="SIZE",
                        help="host memory for A²ATS-offloaded KV pages (2TB, 512GiB); default "
                             "half this machine's RAM (pinned pages never swap)")


def kv_settings(args: argparse.Namespace) -> dict:
    """memory_plan keyword arguments (retrieval, page_bounds, host_bytes) of the KV flags."""
    from lcjax.serve.engine_state import page_bounds_needed
    from lcjax.serve.plan import parse_size
    from lcjax.serve.retrieval_flags import a2ats_config
    from lcjax.sparsity.sparse_verify import parse_settings

    retrieval = None
    if getattr(args, "kv_retrieval", "none") == "a2ats":
        retrieval = a2ats_config(getattr(args, "a2ats", ""))
    spec = getattr(args, "sparse_verify", None)
    verify = None if spec is None else parse_settings(spec)
    host = None
    if retrieval is not None and retrieval.offload == "host":
        flag = getattr(args, "host_memory", None)
        host = parse_size(flag, "host memory") if flag is not None else default_host_memory()
    return dict(retrieval=retrieval, page_bounds=page_bounds_needed(verify, retrieval is not None),
                host_bytes=host)
