"""The GRPO objective with LongCat-Flash-Thinking's changes (no KL term, G*T_max token
normalisation, triplet clipping, truncated importance sampling, online filtering).

Per generated token t of sequence i with group-normalised advantage A_i:

    r      = pi_theta / pi_old                   (pi_old: the learner's policy at the step's start)
    w      = min(pi_old / pi_rollout, C)          (stop-gradient; pi_rollout: the engine's logprob
                                                   of the sampled token under the version that
                                                   generated the trajectory)
    A >= 0:  obj = min(r A, clip(r, 1 - eps_neg_low, 1 + eps_pos_high) A)
    A <  0:  obj = max(min(r A, clip(r, 1 - eps_neg_low, 1 + eps_pos_high) A), (1 + eps_neg_high) A)
    loss   = - sum_{i,t} mask * w * obj / (num_sequences * T_max)

The lower clip only binds for negative advantages and the upper one only for positive ones (the
outer min picks the pessimistic side), so the two ranges are set separately; the dual clip
bounds how much a negative-advantage token with a huge ratio (stale sample, routing drift) can
push. Normalising by the number of sequences times the global maximum generation length T_max
(not by each sequence's length) keeps every token's weight the same whatever the lengths are.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from lcjax.config_checks import check as _check
from lcjax.config_checks import finite as _finite


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Clipping ranges, the importance-weight cap and the group filter."""

    eps_neg_low: float = 0.2  # lower ratio clip 1 - eps (binds for A < 0)
    eps_pos_high: float = 0.28  # upper ratio clip 1 + eps (binds for A > 0)
    eps_neg_high: float = 2.0  # dual clip: A < 0 tokens contribute at least (1 + eps) A
    is_cap: float = 2.0  # C in min(pi_old / pi_rollout, C)
    filter_equal_groups: bool = True  # drop groups whose rewards are all equal (no signal)
    adv_eps: float = 1e-6  # added to the group std

    def __post_init__(self):
        for key in ("eps_neg_low", "eps_pos_high", "eps_neg_high", "is_cap", "adv_eps"):
            value = getattr(self, key)
            _check(_finite(value) and value > 0, f"objective.{key}", value, "a finite number > 0")
        _check(self.eps_neg_low < 1, "objective.eps_neg_low", self.eps_neg_low, "< 1")
        _check(self.eps_neg_high > self.eps_pos_high, "objective.eps_neg_high", self.eps_neg_high,
               f"> objective.eps_pos_high={self.eps_pos_high} (the dual clip sits above the clip)")


def group_advantages(rewards, eps: float = 1e-6) -> np.ndarray:
    """(r - mean over the group) / (std over the group + eps), float32 [N, G] from rewards [N, G]
    (array-like; validated here, so a wrong rank is a ValueError)."""
    rewards = np.asarray(rewards, np.float64)
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [groups, group_size]; got shape {rewards.shape}")
    centred = rewards - rewards.mean(axis=1, keepdims=True)
    return (centred / (rewards.std(axis=1, keepdims=True) + eps)).astype(np.float32)


def informative(rewards) -> bool:
    """A group teaches something only if its rewards differ (all-0 / all-1 groups are filtered)."""
    rewards = np.asarray(rewards, np.float64)
    return bool(rewards.size and rewards.max() > rewards.min())


def _per_token(advantages, like):
    """Advantages [B] (one per sequence) or [B, T] (per token, packed rows) as [B, T]."""
    return jnp.broadcast_to(advantages[:, None] if advantages.ndim == 1 else advantages, like.shape)


def token_objective(logp: Float[Array, "B T"], logp_old: Float[Array, "B T"],
                    advantages: Float[Array, "B *T"], cfg: ObjectiveConfig) -> Float[Array, "B T"]:
    """The clipped surrogate obj per token (before the importance weight and the mask)."""
    ratio = jnp.exp(logp - logp_old)
    adv = _per_token(advantages, ratio)
    clipped = jnp.clip(ratio, 1.0 - cfg.eps_neg_low, 1.0 + cfg.eps_pos_high)
    obj = jnp.minimum(ratio * adv, clipped * adv)
    dual = jnp.maximum(obj, (1.0 + cfg.eps_neg_high) * adv)
    return jnp.where(adv < 0, dual, obj)


def grpo_loss(logp: Float[Array, "B T"], logp_old: Float[Array, "B T"],
              logp_rollout: Float[Array, "B T"], advantages: Float[Array, "B *T"],
              mask: Float[Array, "B T"], num_sequences, t_max: int, cfg: ObjectiveConfig):
    """(loss scalar, metrics). `num_sequences` counts the sequences (padding has mask 0);
    advantages are per sequence [B] or per token [B, T] (packed rows); all log-probs are of
    the sampled tokens, float32."""
    logp, logp_old, logp_rollout = (x.astype(jnp.float32) for x in (logp, logp_old, logp_rollout))
    weight = jax.lax.stop_gradient(jnp.minimum(jnp.exp(logp_old - logp_rollout), cfg.is_cap))
    obj = token_objective(logp, jax.lax.stop_gradient(logp_old), advantages, cfg)
    denom = jnp.maximum(jnp.asarray(num_sequences, jnp.float32), 1.0) * t_max
    loss = -jnp.sum(mask * weight * obj) / denom
    ratio = jnp.exp(logp - logp_old)
    adv = _per_token(advantages, ratio)
    clipped = ((adv > 0) & (ratio > 1 + cfg.eps_pos_high)) | ((adv < 0) & (ratio < 1 - cfg.eps_neg_low))
    n = jnp.maximum(jnp.sum(mask), 1.0)
    metrics = {"clip_fraction": jnp.sum(mask * clipped) / n,
               "dual_clip_fraction": jnp.sum(mask * ((adv < 0) & (ratio > 1 + cfg.eps_neg_high))) / n,
               "is_weight_mean": jnp.sum(mask * weight) / n,
               "is_capped_fraction": jnp.sum(mask * (jnp.exp(logp_old - logp_rollout) > cfg.is_cap)) / n}
    return loss, metrics
