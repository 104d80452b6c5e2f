"""Pure train / eval steps: (state, batch) -> (state, metrics).

With LoRA (lora.rank > 0) the gradient is taken with respect to the adapters only.
Loss = masked next-token cross-entropy + z_loss * mean(logsumexp^2) + mtp_weight * MTP loss
(the MTP head at position t predicts token t+2: the target of position t+1 in the same document).
After the optimizer update the MoE correction biases take one aux-loss-free step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from lcjax.config import Config
from lcjax.lora.adapters import attach
from lcjax.lora.afa import afa_lambda
from lcjax.model import BIAS_COLLECTION, LongCatModel, update_router_bias
from lcjax.model.layers import LORA_COLLECTION, LORA_DROPOUT_RNG
from lcjax.train.state import TrainState

Batch = dict  # inputs, targets, segment_ids, positions [B, S] int32; loss_mask [B, S] float32;
#               optional stop [B, 1] int32 (the training loop's stop flags, see loop.py)


def _masked_xent(logits, targets, mask):
    """Sum of token cross-entropies where mask=1, the sum of mask, and sum of lse^2 (float32)."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((lse - target_logit) * mask), jnp.sum(mask), jnp.sum(lse * lse * mask)


def mtp_targets(batch: Batch):
    """Targets two tokens ahead and their mask (position t+1 must be real and in t's document)."""
    targets = jnp.concatenate([batch["targets"][:, 1:], jnp.zeros_like(batch["targets"][:, :1])], 1)
    nxt_mask = jnp.concatenate([batch["loss_mask"][:, 1:], jnp.zeros_like(batch["loss_mask"][:, :1])], 1)
    seg = batch["segment_ids"]
    same = jnp.concatenate([seg[:, 1:] == seg[:, :-1], jnp.zeros_like(seg[:, :1], bool)], 1)
    return targets, batch["loss_mask"] * nxt_mask * same


def loss_fn(params: Any, router_bias: Any, batch: Batch, config: Config, adapters: Any = None,
            lam=0.0, dropout_rng=None):
    """Scalar loss and its parts; also the per-layer expert counts for the bias update.

    With LoRA `adapters` (lcjax.lora) the model adds them at AFA coefficient `lam` ([] float32,
    a traced value: no recompiles as it anneals); `dropout_rng` turns on adapter dropout."""
    variables = {"params": params, BIAS_COLLECTION: router_bias}
    rngs = {}
    if adapters is not None:
        variables[LORA_COLLECTION] = attach(adapters, config.lora, lam, config.model.scan_layers)
        if dropout_rng is not None and config.lora.dropout > 0:
            rngs[LORA_DROPOUT_RNG] = dropout_rng
    logits, aux = LongCatModel(config.model).apply(
        variables, batch["inputs"], batch["segment_ids"], batch["positions"], return_aux=True,
        rngs=rngs)
    ce_sum, n_tokens, z_sum = _masked_xent(logits, batch["targets"], batch["loss_mask"])
    denom = jnp.maximum(n_tokens, 1.0)
    ce, z = ce_sum / denom, z_sum / denom
    loss = ce + config.train.z_loss * z
    metrics = {"ce": ce, "z_loss": z, "tokens": n_tokens}
    if aux.mtp_logits is not None and config.train.mtp_loss_weight > 0:
        targets2, mask2 = mtp_targets(batch)
        mtp_sum, mtp_n, _ = _masked_xent(aux.mtp_logits, targets2, mask2)
        mtp = mtp_sum / jnp.maximum(mtp_n, 1.0)
        loss = loss + config.train.mtp_loss_weight * mtp
        metrics["mtp_ce"] = mtp
    counts = aux.routing.tokens_per_expert  # [L, E+Z]
    routed = counts[:, : config.model.moe.num_experts]
    metrics["zero_share"] = jnp.mean(aux.routing.zero_share)
    metrics["expert_load_max_over_mean"] = jnp.mean(
        jnp.max(routed, -1) / jnp.maximum(jnp.mean(routed, -1), 1e-9))
    metrics["loss"] = loss
    return loss, (metrics, counts)


def _bias_tree_update(router_bias: Any, counts, config: Config) -> Any:
    """Apply update_router_bias to the scanned ([L, E+Z]) or unrolled (layers_i) bias tree."""
    moe, budget = config.model.moe, config.train.expected_ffn_topk
    if config.model.scan_layers:
        return update_router_bias(router_bias, {"layers": {"moe": {"e_score_correction_bias": counts}}},
                                  moe, budget)
    count_tree = {f"layers_{i}": {"moe": {"e_score_correction_bias": counts[i]}}
                  for i in range(config.model.num_layers)}
    return update_router_bias(router_bias, count_tree, moe, budget)


def train_step(state: TrainState, batch: Batch, *, config: Config,
               tx: optax.GradientTransformation) -> tuple[TrainState, dict]:
    """One optimizer step; metrics are device scalars (read them a step later).

    With LoRA (state.lora set) only the adapters get gradients and updates; the base params
    pass through unchanged, and `afa_lambda` (the AFA coefficient of this step) is logged."""
    if state.lora is not None:
        lam = afa_lambda(state.step, config.lora, config.train.steps)
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        grad_fn = jax.value_and_grad(
            lambda ad: loss_fn(state.params, state.router_bias, batch, config, ad, lam, key),
            has_aux=True)
        (_, (metrics, counts)), grads = grad_fn(state.lora)
        updates, opt_state = tx.update(grads, state.opt_state, state.lora)
        params, adapters = state.params, optax.apply_updates(state.lora, updates)
        metrics["afa_lambda"] = lam
    else:
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, (metrics, counts)), grads = grad_fn(state.params, state.router_bias, batch, config)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params, adapters = optax.apply_updates(state.params, updates), None
    bias = state.router_bias
    # The router bias belongs to the base: a LoRA run keeps it frozen with the base weights, so
    # the served base (and a draft head tuned alone) routes exactly as before.
    if config.train.update_router_bias and not config.lora.enabled:
        bias = _bias_tree_update(bias, counts, config)
    metrics["grad_norm"] = optax.tree.norm(grads)
    # Finite iff the new params and Adam moments are (they are finite before the step): the
    # loop reads this before any save, so a NaN from the optimizer itself is never checkpointed.
    metrics["update_norm"] = optax.tree.norm(updates)
    if "stop" in batch:  # [B, 1] per-process stop flags -> one value every process reads
        metrics["stop_requested"] = jnp.max(batch["stop"])
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, router_bias=bias,
                        lora=adapters)
    return new, metrics


def eval_step(state: TrainState, batch: Batch, *, config: Config) -> dict:
    """Held-out cross-entropy sums for one batch (summed across batches by the caller)."""
    lam = 0.0 if state.lora is None else afa_lambda(state.step, config.lora, config.train.steps)
    _, (metrics, _) = loss_fn(state.params, state.router_bias, batch, config, state.lora, lam)
    out = {"ce_sum": metrics["ce"] * metrics["tokens"], "tokens": metrics["tokens"]}
    if "target_bytes" in batch:  # [B, S] utf-8 bytes of each target token: for bits per byte
        out["bytes"] = jnp.sum(batch["target_bytes"] * batch["loss_mask"])
    return out
