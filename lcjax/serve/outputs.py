"""What the engine hands back: per-request outputs (incremental) and engine-wide statistics."""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass
class TokenLogprob:
    """Log-probability of one generated token under the model, and the top alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first; empty if not requested


@dataclasses.dataclass
class RequestOutput:
    """State of one request after an engine step.

    `new_token_ids` / `delta_text` hold only what this step added (for streaming);
    `token_ids` / `text` hold everything generated so far. Stop strings are already cut from
    `text` (the stop string itself is not included, as in vLLM/OpenAI).
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    new_token_ids: list[int]
    text: str
    delta_text: str
    finished: bool = False
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort" | "error" once finished
    logprobs: Optional[list[TokenLogprob]] = None  # for new_token_ids, if requested
    stop_reason: Optional[object] = None  # the stop string or token id that ended the request
    first_token_time: Optional[float] = None  # time.monotonic() of the first generated token
    arrival_time: float = 0.0  # time.monotonic() when the request was added
    num_draft_tokens: int = 0  # speculative decoding: draft tokens proposed for this request
    num_accepted_tokens: int = 0  # ... and accepted
    error: Optional[str] = None  # why a request finished with finish_reason "error"

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids)


@dataclasses.dataclass
class EngineStats:
    """A snapshot for /metrics and logs."""

    num_waiting: int
    num_running: int
    free_pages: int
    total_pages: int
    num_compilations: int  # distinct jitted (function, bucket) shapes compiled so far
    generated_tokens_total: int
    prompt_tokens_total: int
    draft_tokens_total: int = 0
    accepted_tokens_total: int = 0
    spec_rounds_total: int = 0  # speculative rounds, one per request per round
