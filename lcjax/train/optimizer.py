"""AdamW with warmup + cosine/linear decay, clipping, decay masks and width-transfer scaling.

Width transfer (muP-style, for Adam): with width_mult = hidden_size / base_hidden_size, every
hidden matrix (a >= 2-D weight that is not an embedding table) is initialised with std / sqrt(w)
and updated with learning rate / w. Adam's per-entry step is ~lr, so a matrix with fan-in n moves
its output by ~lr * n; dividing by w keeps that, and the relative change per layer, constant as
the model widens. Embedding tables (looked up, not multiplied) and norm scales keep the base
rate. The rule is applied leaf by leaf from parameter paths, so it needs no model change.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from lcjax.config import ModelConfig, OptimizerConfig

_EMBEDDING_LEAVES = ("embedding", "table_")  # token embeddings and N-gram tables


def _is_embedding(path) -> bool:
    name = str(getattr(path[-1], "key", path[-1]))
    return any(name.startswith(prefix) for prefix in _EMBEDDING_LEAVES)


def _is_matrix(path, leaf, scanned: bool) -> bool:
    """A weight that multiplies activations: >= 2 dims beyond the scan axis, not an embedding."""
    under_scan = scanned and any(str(getattr(k, "key", k)) == "layers" for k in path)
    return len(leaf.shape) - int(under_scan) >= 2 and not _is_embedding(path)


def width_mult(opt: OptimizerConfig, model: ModelConfig) -> float:
    return 1.0 if opt.base_hidden_size is None else model.hidden_size / opt.base_hidden_size


def lr_schedule(opt: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to learning_rate, then cosine / linear decay to learning_rate*min_lr_ratio."""
    peak, end = opt.learning_rate, opt.learning_rate * opt.min_lr_ratio
    decay_steps = max(total_steps - opt.warmup_steps, 1)
    if opt.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=opt.min_lr_ratio)
    elif opt.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    warmup = optax.linear_schedule(0.0 if opt.warmup_steps else peak, peak, max(opt.warmup_steps, 1))
    return optax.join_schedules([warmup, decay], [opt.warmup_steps])


def lr_multipliers(params: Any, opt: OptimizerConfig, model: ModelConfig) -> Any:
    """Per-leaf learning-rate factor: 1 / width_mult for hidden matrices, 1 elsewhere."""
    w = width_mult(opt, model)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: 1.0 / w if _is_matrix(p, x, model.scan_layers) else 1.0, params)


def scale_init_for_width(params: Any, opt: OptimizerConfig, model: ModelConfig) -> Any:
    """Rescale a fresh init: hidden matrices by 1 / sqrt(width_mult) (embeddings unchanged)."""
    w = width_mult(opt, model)
    if w == 1.0:
        return params
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x / jnp.sqrt(w).astype(x.dtype) if _is_matrix(p, x, model.scan_layers) else x,
        params)


def decay_mask(params: Any, opt: OptimizerConfig, model: ModelConfig) -> Any:
    """Weight decay on matrices (and embedding tables if decay_embeddings); never on norms."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: _is_matrix(p, x, model.scan_layers) or (opt.decay_embeddings and _is_embedding(p)),
        params)


def _scale_by_tree(multipliers: Any) -> optax.GradientTransformation:
    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u * m, updates, multipliers), state

    return optax.GradientTransformation(init, update)


def make_optimizer(params: Any, opt: OptimizerConfig, model: ModelConfig,
                   total_steps: int) -> optax.GradientTransformation:
    """The full update rule for `params` (an unboxed tree; only its structure and ranks are read)."""
    schedule = lr_schedule(opt, total_steps)
    parts = [optax.clip_by_global_norm(opt.grad_clip)] if opt.grad_clip > 0 else []
    parts += [
        optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps),
        optax.add_decayed_weights(opt.weight_decay, mask=decay_mask(params, opt, model)),
        _scale_by_tree(lr_multipliers(params, opt, model)),
        optax.scale_by_learning_rate(schedule),
    ]
    return optax.chain(*parts)
