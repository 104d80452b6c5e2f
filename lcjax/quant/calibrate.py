"""Calibration: run the float model on a few batches, keep each weight input's statistics.

The model records (lcjax.quant.observe) before every quantizable matmul; this module runs the
jitted forward (with the MTP head) with those collections mutable and reduces over batches:
per input channel max|x| (max), rows seen (sum) and optionally the Gram matrix Σ x xᵀ (sum).
Statistics are keyed by the weight's parameter path, with the same leading axes as the weight
(the scanned layer axis L, the expert axis E): absmax [*batch, K], count [*batch],
gram [*batch, K, K].
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lcjax.config import Config, ModelConfig
from lcjax.model.model import LongCatModel, model_config
from lcjax.quant import observe

Path = tuple[str, ...]


def _as_inputs(batch: Any) -> tuple:
    """(input_ids, segment_ids or None, positions or None) of a trainer batch dict or an id array."""
    if isinstance(batch, dict):
        if "inputs" not in batch:
            raise ValueError(f"calibration batch keys {sorted(batch)} lack 'inputs' (token ids [B, S])")
        return (jnp.asarray(batch["inputs"]), None if batch.get("segment_ids") is None else
                jnp.asarray(batch["segment_ids"]),
                None if batch.get("positions") is None else jnp.asarray(batch["positions"]))
    return jnp.asarray(batch), None, None


def _flatten_sown(tree: Any) -> dict[Path, Any]:
    """{param path: value}; sow stores a 1-tuple under each name."""
    flat = traverse_util.flatten_dict(tree, is_leaf=lambda _, v: isinstance(v, tuple))
    return {path: value[0] for path, value in flat.items()}


@functools.lru_cache(maxsize=None)
def _observed_forward(cfg: ModelConfig, gram: bool):
    """The jitted forward returning the observer collections (one compile per config)."""
    mutable = [observe.STATS] + ([observe.GRAM] if gram else [])

    @jax.jit
    def run(variables, ids, segment_ids, positions):
        _, state = LongCatModel(cfg).apply(variables, ids, segment_ids, positions,
                                           return_aux=True, mutable=mutable)
        return state
    return run


def calibrate(config: Union[Config, ModelConfig], variables: dict, batches: Iterable[Any], *,
              gram: bool = False) -> dict[Path, dict]:
    """Per quantizable weight path: {"absmax", "count"(, "gram")} over all `batches`.

    Args:
      config: the run Config or ModelConfig.
      variables: {"params", "router_bias"} of the float model.
      batches: trainer batch dicts (inputs, segment_ids, positions) or int token arrays [B, S].
      gram: also accumulate Σ x xᵀ per input (K² floats each; for clip search).
    """
    cfg = model_config(config)
    run = _observed_forward(cfg, gram)
    out: dict[Path, dict] = {}
    seen = 0
    for batch in batches:
        state = run(variables, *_as_inputs(batch))
        seen += 1
        stats = _flatten_sown(state[observe.STATS])
        grams = _flatten_sown(state[observe.GRAM]) if gram else {}
        for path, st in stats.items():
            new = {"absmax": np.asarray(st["absmax"], np.float32),
                   "count": np.asarray(st["count"], np.float32)}
            if path in grams:
                new["gram"] = np.asarray(grams[path], np.float64)
            old = out.get(path)
            if old is None:
                out[path] = new
                continue
            old["absmax"] = np.maximum(old["absmax"], new["absmax"])
            old["count"] = old["count"] + new["count"]
            if "gram" in new:
                old["gram"] = old["gram"] + new["gram"]
    if not seen:
        raise ValueError("calibrate: no calibration batches were given")
    return out


def random_token_batches(config: Union[Config, ModelConfig], num_batches: int, batch: int,
                         seq: int, seed: int = 0) -> list[np.ndarray]:
    """Uniform random token ids [batch, seq] (FPTQ reports random-token calibration often works)."""
    cfg = model_config(config)
    rng = np.random.default_rng(seed)
    return [rng.integers(3, cfg.vocab_size, (batch, seq), dtype=np.int32) for _ in range(num_batches)]
