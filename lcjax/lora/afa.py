"""AFA-LoRA's annealed activation schedule: lam(t) from 1 to 0, then 0 to the end.

The adapter computes B f_t(A x) with f_t(z) = lam(t) * phi(z) + (1 - lam(t)) * z
(lcjax.model.layers.lora_delta): fully nonlinear at lam = 1, plain LoRA at lam = 0, where
W + scale * B A merges exactly. The public description (arXiv 2512.22455, as summarised by third
parties) fixes neither the schedule's shape nor its length, so both are settings
(lcjax.config.AfaConfig); the choice here, with p the annealing progress:

    s0 = start_fraction * steps,  n = anneal_fraction * steps,  p = clip((t - s0) / n, 0, 1)
    linear: lam = 1 - p            cosine: lam = 0.5 * (1 + cos(pi * p))

lam(t) is the value used by the update from step t to t + 1; start + anneal <= 1 (checked by
the config) makes lam(steps) = 0, the value a finished run is saved and merged at.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from lcjax.config import LoraConfig


def afa_lambda(step, lora: LoraConfig, total_steps: int):
    """lam at `step` (a Python int or a traced int32 scalar; float32 scalar out). Plain LoRA
    (afa.activation="none") is 0 throughout."""
    if lora.afa.activation == "none":
        return jnp.zeros((), jnp.float32)
    afa = lora.afa
    start = afa.start_fraction * total_steps
    length = max(afa.anneal_fraction * total_steps, 1e-9)
    p = jnp.clip((jnp.asarray(step, jnp.float32) - start) / length, 0.0, 1.0)
    lam = 1.0 - p if afa.schedule == "linear" else 0.5 * (1.0 + jnp.cos(math.pi * p))
    return jnp.where(p >= 1.0, 0.0, lam)  # exactly 0 once annealed (cos(pi) rounds)


def afa_lambda_at(step: int, lora: LoraConfig, total_steps: int) -> float:
    """afa_lambda as a Python float (exactly 0.0 once annealed)."""
    return float(afa_lambda(step, lora, total_steps))
