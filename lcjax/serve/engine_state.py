"""The engine's configuration, per-request scheduling state and shape buckets."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import numpy as np

from lcjax.serve.sampling import SamplingParams
from lcjax.sparsity.sparse_verify import VERIFY_COLLECTION, SparseVerifyConfig

LogitsProcessor = Callable[[list[int]], Optional[np.ndarray]]  # generated ids -> [V] bias or None



@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Serving capacity and scheduling knobs."""

    max_num_seqs: int = 8  # concurrent requests (engine slots)
    max_model_len: int = 512  # prompt + generated tokens per request
    page_size: int = 16  # tokens per KV page
    num_pages: Optional[int] = None  # pool size; default: every slot can hold max_model_len
    prefill_chunk: int = 64  # most prompt tokens one request feeds per step
    max_prefill_seqs: int = 4  # requests prefilled together in one step
    num_speculative_tokens: int = 0  # k MTP drafts per round; 0 = plain decoding
    seed: int = 0  # seeds requests that bring none
    attention_impl: Optional[str] = None  # paged decode backend; None = platform default
    # MTP verify over retrieved pages (lcjax/sparsity/sparse_verify.py); None = dense verify
    sparse_verify: Optional[SparseVerifyConfig] = None

    def __post_init__(self):
        for name in ("max_num_seqs", "max_model_len", "page_size", "prefill_chunk",
                     "max_prefill_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"engine {name}={getattr(self, name)} must be >= 1")
        if self.num_speculative_tokens < 0:
            raise ValueError(f"num_speculative_tokens={self.num_speculative_tokens} must be >= 0")
        if self.num_pages is not None and self.num_pages < 2:
            raise ValueError(f"num_pages={self.num_pages} must be >= 2")

    @property
    def pages_per_seq(self) -> int:
        """Block-table width: pages one request may hold."""
        return math.ceil((self.max_model_len + self.num_speculative_tokens) / self.page_size)


def page_bounds_needed(sparse_verify: Optional[SparseVerifyConfig], kv_retrieval: bool) -> bool:
    """Whether the engine keeps per-page key bounds beside the paged cache (Quest scoring of
    sparse verification); the memory plan counts them by the same rule. Under A²ATS retrieval
    sparse verification picks keys from their codes instead, so no bounds are kept."""
    return sparse_verify is not None and not kv_retrieval


def cache_placement(sparse_verify: Optional[SparseVerifyConfig], kv_retrieval) -> dict:
    """runner.init_engine_state's cache flags for an engine: page bounds by `page_bounds_needed`,
    and the full sublayers' pools built in host memory when `kv_retrieval` (an A2ATSIndex)
    offloads them, so a large pool never passes through the device on its way to the host."""
    offload = kv_retrieval is not None and kv_retrieval.config.offload == "host"
    return dict(page_bounds=page_bounds_needed(sparse_verify, kv_retrieval is not None),
                host_pools=offload)


@dataclasses.dataclass
class RequestState:
    """One request's scheduling state inside the engine (slot, pages, progress, output)."""

    id: str
    prompt: list[int]
    params: SamplingParams
    seed: int
    arrival: float
    slot: int = -1
    pages: list[int] = dataclasses.field(default_factory=list)
    prefilled: int = 0  # prompt tokens consumed so far
    output: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    emitted_text: int = 0  # characters of `text` already streamed
    first_token_time: Optional[float] = None
    draft_tokens: int = 0
    accepted_tokens: int = 0
    logits_processor: Optional[LogitsProcessor] = None
    bias: Optional[np.ndarray] = None  # [V] float32 from the processor for the next token

    @property
    def length(self) -> int:
        """Tokens the main model has consumed (the last sampled token is not yet consumed)."""
        return self.prefilled + max(len(self.output) - 1, 0)

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.prompt)


def buckets(limit: int, start: int = 1) -> list[int]:
    """Powers of two from `start` below `limit`, then `limit`: the padded sizes steps compile for."""
    out, b = [], start
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


def bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `n`."""
    return next(b for b in buckets if b >= n)


def check_engine_config(cfg, ec: EngineConfig, variables: Optional[dict] = None) -> None:
    """ValueError naming the engine setting the model (a ModelConfig) or `variables` cannot serve."""
    if ec.max_model_len > cfg.max_position_embeddings:
        raise ValueError(f"max_model_len={ec.max_model_len} exceeds the model's "
                         f"max_position_embeddings={cfg.max_position_embeddings}")
    k = ec.num_speculative_tokens
    if k and not cfg.mtp_layers:
        raise ValueError(f"num_speculative_tokens={k} needs an MTP head (model.mtp_layers=0)")
    if k and any(cfg.sparse_layers) and k > cfg.loza.block_size:
        raise ValueError(f"num_speculative_tokens={k} exceeds loza.block_size="
                         f"{cfg.loza.block_size}, the rejected tokens a sparse ring can absorb")
    if ec.sparse_verify is not None:
        ec.sparse_verify.check(k + 1, ec.page_size)
        if (ec.sparse_verify.ffn != "none" and variables is not None
                and VERIFY_COLLECTION not in variables):
            raise ValueError(f"sparse_verify.ffn={ec.sparse_verify.ffn!r} needs verify thresholds in "
                             "the variables: sparse_verify.with_verify_thresholds(variables, "
                             "chess.calibrate(...))")


def find_stop(text: str, stops: Sequence[str], start: int) -> Optional[tuple[int, str]]:
    """Earliest stop string in text that ends after `start` (already streamed text was checked
    before); returns (cut position, the stop string)."""
    best = None
    for s in stops:
        i = text.find(s, max(0, start - len(s) + 1))
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best
