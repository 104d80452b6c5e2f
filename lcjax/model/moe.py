"""ScMoE feed-forward: fp32 softmax router with correction bias, zero (identity) experts, experts.

Router (HF LongcatFlashTopkRouter): p = softmax(x @ W) over routed + zero experts in float32;
top-k chosen on p + e_score_correction_bias (selection only); weights are the unbiased p, not
renormalised, times routed_scaling_factor. Zero experts return weight * x and are resolved
before dispatch, so only routed slots reach the expert GEMMs.

Quantized expert weights (lcjax.ops.qtensor.QTensor [E, K, N]) run through the grouped quantized
matmul in the ragged dispatch; the dense dispatch is the float oracle and refuses them. The
router stays in float.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from lcjax.config import ModelConfig, MoEConfig
from lcjax.model.layers import LORA_COLLECTION, acc_dtype, declare, dtype_of, lora_expert_delta
from lcjax.ops import activation_sparsity, observe, quantized_matmul
from lcjax.ops.grouped_matmul import grouped_matmul
from lcjax.ops.qtensor import QTensor
from lcjax.parallel import context as parallel_context
from lcjax.parallel import expert_parallel

BIAS_COLLECTION = "router_bias"


@flax.struct.dataclass
class RoutingStats:
    """Per-layer routing statistics over the (unmasked) tokens of a batch.

    Pytree fields are typed `Any` (shapes in comments): jax transforms rebuild this class with
    stacked, sharding or abstract leaves, which a runtime shape check would reject.
    """

    tokens_per_expert: Any  # [..., E+Z] float32: slots routed to each router output
    zero_share: Any  # [...] float32: fraction of top-k slots that went to zero experts


def route(logits: Float[Array, "T E"], bias: Float[Array, "E"], cfg: MoEConfig, rows: int = 1):
    """Top-k ids [T,K] chosen on softmax+bias and their unbiased, scaled weights [T,K] (fp32).

    `rows`: the batch rows the T tokens come in (cfg.route_within_first restricts each row's
    tokens to its first token's routed experts). A slot dropped by cfg.route_prob_floor gets
    id num_experts (not dispatched) and weight 0.
    """
    probs = jax.nn.softmax(logits.astype(acc_dtype(logits.dtype)), axis=-1)
    choice = probs + jax.lax.stop_gradient(bias.astype(probs.dtype))
    if cfg.route_within_first:
        per_row = choice.reshape(rows, -1, choice.shape[-1])
        _, first = jax.lax.top_k(per_row[:, 0], cfg.top_k)  # [rows, K]
        allowed = jnp.zeros(per_row[:, 0].shape, bool).at[jnp.arange(rows)[:, None], first].set(True)
        allowed = allowed | (jnp.arange(choice.shape[-1]) >= cfg.num_experts)
        choice = jnp.where(allowed[:, None], per_row, -jnp.inf).reshape(choice.shape)
    _, ids = jax.lax.top_k(choice, cfg.top_k)
    picked = jnp.take_along_axis(probs, ids, axis=-1)
    if cfg.route_prob_floor > 0:
        drop = (ids < cfg.num_experts) & (picked < cfg.route_prob_floor)
        ids, picked = jnp.where(drop, cfg.num_experts, ids), jnp.where(drop, 0.0, picked)
    return ids, picked * cfg.routed_scaling_factor


def _swiglu_experts_dense(x, gate, up, down, combine, delta: Optional[Callable] = None,
                          sparsify: Optional[Callable] = None):
    """Oracle: every expert on every token, combined by a [T,E] weight matrix (zero if unrouted).

    `delta(name, x)` adds an adapter's [T, E, N] term to each expert matmul (or returns None);
    `sparsify(a)` thresholds the gate activation [T, E, F]."""
    delta = delta or (lambda name, x: None)
    sparsify = sparsify or (lambda a: a)

    def add(y, name, x):
        d = delta(name, x)
        return y if d is None else y + d.astype(y.dtype)

    h = sparsify(nn.silu(add(jnp.einsum("TM,EMF->TEF", x, gate), "gate", x))) * add(
        jnp.einsum("TM,EMF->TEF", x, up), "up", x)
    out = add(jnp.einsum("TEF,EFM->TEM", h, down), "down", h)
    return jnp.einsum("TEM,TE->TM", out, combine.astype(out.dtype))


def _swiglu_experts_ragged(x, gate, up, down, ids, weights, routed, num_experts: int,
                           matmul: Optional[Callable] = None, sparsify: Optional[Callable] = None):
    """Dropless: sort (token, slot) pairs by expert, grouped matmuls, weight, scatter-add back.

    `matmul(name, rows, w, group_sizes)` runs one grouped matmul (default: grouped_matmul);
    `sparsify(a, u, group_sizes)` thresholds the gate activation of the sorted rows.
    """
    if matmul is None:
        matmul = lambda name, rows, w, sizes: grouped_matmul(rows, w, sizes)  # noqa: E731
    t, k = ids.shape
    flat_ids = jnp.where(routed, ids, num_experts).reshape(-1)  # zero-expert slots sort last
    order = jnp.argsort(flat_ids, stable=True)
    token_of = (jnp.arange(t * k) // k)[order]
    group_sizes = jnp.bincount(flat_ids, length=num_experts + 1)[:num_experts]
    xs = x[token_of]  # [T*K, M]
    a = nn.silu(matmul("gate", xs, gate, group_sizes))
    u = matmul("up", xs, up, group_sizes)
    h = (a if sparsify is None else sparsify(a, u, group_sizes)) * u
    out = matmul("down", h, down, group_sizes)  # rows of zero-expert slots come back as 0
    out = out * weights.reshape(-1)[order][:, None].astype(out.dtype)
    return jnp.zeros_like(x).at[token_of].add(out)


class MoE(nn.Module):
    """Router + zero experts + routed SwiGLU experts; returns (output, RoutingStats)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Float[Array, "B S M"], token_mask: Optional[Bool[Array, "B S"]] = None):
        cfg, moe = self.config, self.config.moe
        m, e, f, pdt = cfg.hidden_size, moe.num_experts, moe.expert_ffn_size, cfg.param_dtype
        cdt = dtype_of(cfg.dtype)
        classifier = declare(self, "classifier", (m, moe.num_router_outputs), ("embed", None), pdt)
        bias = self.variable(BIAS_COLLECTION, "e_score_correction_bias",
                             lambda: jnp.zeros((moe.num_router_outputs,), jnp.float32)).value
        gate = declare(self, "gate", (e, m, f), ("experts", "embed", "expert_mlp"), pdt)  # [E, M, F]
        up = declare(self, "up", (e, m, f), ("experts", "embed", "expert_mlp"), pdt)  # [E, M, F]
        down = declare(self, "down", (e, f, m), ("experts", "expert_mlp", "embed"), pdt)  # [E, F, M]

        b, s, _ = x.shape
        x_tm = x.reshape(b * s, m)
        # Router in float32 at full precision: selection is discontinuous in the logits.
        rdt = acc_dtype(cdt)
        logits = jnp.einsum("TM,ME->TE", x_tm.astype(rdt), classifier.astype(rdt),
                            precision=jax.lax.Precision.HIGHEST)
        ids, weights = route(logits, bias, moe, rows=b)
        routed = ids < e
        zero_w = jnp.sum(jnp.where(routed, 0.0, weights), axis=-1, keepdims=True)  # [T, 1]
        zero_out = zero_w * x_tm.astype(rdt) if moe.zero_expert_type == "identity" else 0.0
        xc = x_tm.astype(cdt)
        if moe.dispatch == "dense":
            if any(isinstance(w, QTensor) for w in (gate, up, down)):
                raise ValueError(f"{self.path}: moe.dispatch='dense' is the float oracle; "
                                 "quantized expert weights need moe.dispatch='ragged'")
            gate, up, down = gate.astype(cdt), up.astype(cdt), down.astype(cdt)
            combine = jnp.sum(jax.nn.one_hot(ids, e, dtype=rdt) * weights[..., None], axis=1)
            y = _swiglu_experts_dense(xc, gate, up, down, combine,
                                      lambda name, x: lora_expert_delta(self, name, x, cdt),
                                      lambda a: activation_sparsity.threshold(self, "gate", a))
        elif (ep := self._expert_parallel_plan(x.shape, gate)) is not None:
            y = self._expert_parallel(xc.reshape(b, s, m), ids, weights, gate, up, down, ep)
            y = y.reshape(b * s, m)
        else:
            def matmul(name, rows, w, sizes):
                observe.record_grouped(self, name, rows, sizes)
                if isinstance(w, QTensor):
                    out = quantized_matmul.grouped(rows, w, sizes, cdt)
                else:
                    out = grouped_matmul(rows, w.astype(cdt), sizes)
                delta = lora_expert_delta(self, name, rows, cdt, sizes)
                return out if delta is None else out + delta.astype(out.dtype)

            def sparsify(a, u, sizes):
                activation_sparsity.record(self, "gate", a, up=u, group_sizes=sizes)
                expert = activation_sparsity.expert_of_rows(sizes, a.shape[0])
                return activation_sparsity.threshold_rows(self, "gate", a, expert)

            y = _swiglu_experts_ragged(xc, gate, up, down, ids, weights, routed, e, matmul,
                                       sparsify)
        y = (y.astype(rdt) + zero_out).astype(cdt).reshape(b, s, m)
        return y, routing_stats(ids, routed, token_mask, moe)

    def _expert_parallel_plan(self, x_shape, gate):
        """(par, batch axes, expert-MLP axes) for all-to-all dispatch here, or None (GSPMD).

        Read from the ambient parallel context: lcjax/parallel/context.py lists everything the
        context changes in the model."""
        par = parallel_context.current()
        mode = "gspmd" if par is None else par.config.expert_dispatch
        if mode == "gspmd":
            return None
        moe = self.config.moe
        expert_shape = (moe.num_experts, self.config.hidden_size, moe.expert_ffn_size)  # [E, M, F]
        found = expert_parallel.plan(par, x_shape, expert_shape)
        if found is None and mode == "all_to_all":
            raise ValueError(f"{self.path}: parallel.expert_dispatch='all_to_all' needs mesh.expert > 1 "
                             f"dividing num_experts={self.config.moe.num_experts}, rules placing "
                             f"`experts` on `expert` and batch rows {x_shape[0]} split over it "
                             f"(mesh {par.axis_sizes})")
        if found is not None and any(self.has_variable(LORA_COLLECTION, n) for n in ("gate", "up", "down")):
            raise ValueError(f"{self.path}: expert adapters (lcjax.lora) run with GSPMD dispatch; "
                             "set parallel.expert_dispatch=gspmd")
        if found is not None and self.has_variable(activation_sparsity.COLLECTION, "gate"):
            raise ValueError(f"{self.path}: expert activation thresholds (lcjax.sparsity.chess) run "
                             "with GSPMD dispatch; set parallel.expert_dispatch=gspmd")
        if found is not None and isinstance(gate, QTensor):
            raise ValueError(f"{self.path}: expert parallelism runs float expert weights; serve "
                             "quantized experts with parallel.expert_dispatch=gspmd")
        return None if found is None else (par, *found)

    def _expert_parallel(self, x, ids, weights, gate, up, down, ep):
        """Routed experts through lcjax.parallel.expert_parallel (one local ragged FFN per device)."""
        par, batch_axes, mlp_axes = ep
        cdt = x.dtype
        b, s, _ = x.shape

        def experts_fn(rows, local_ids, gate, up, down):
            e_local = gate.shape[0]
            ones = jnp.ones((rows.shape[0], 1), jnp.float32)
            return _swiglu_experts_ragged(rows, gate, up, down, local_ids[:, None], ones,
                                          local_ids[:, None] < e_local, e_local)

        return expert_parallel.expert_parallel_moe(
            x, ids.reshape(b, s, -1), weights.reshape(b, s, -1), gate.astype(cdt), up.astype(cdt),
            down.astype(cdt), experts_fn, par=par, num_experts=self.config.moe.num_experts,
            batch_axes=batch_axes, mlp_axes=mlp_axes)


def routing_stats(ids: Int[Array, "T K"], routed: Bool[Array, "T K"],
                  token_mask: Optional[Bool[Array, "B S"]], moe: MoEConfig) -> RoutingStats:
    """Slot counts per router output and the zero-expert share, over unmasked tokens."""
    mask = jnp.ones(ids.shape[:1], jnp.float32) if token_mask is None else (
        token_mask.reshape(-1).astype(jnp.float32))
    counts = jnp.zeros((moe.num_router_outputs,), jnp.float32).at[ids].add(mask[:, None])
    slots = jnp.maximum(jnp.sum(mask) * moe.top_k, 1.0)
    zero = jnp.sum(jnp.where(routed, 0.0, 1.0) * mask[:, None]) / slots
    return RoutingStats(tokens_per_expert=counts, zero_share=zero)


def update_router_bias(router_bias: Any, tokens_per_expert: Any, moe: MoEConfig,
                       expected_ffn_topk: Optional[Union[int, float]] = None) -> Any:
    """Aux-loss-free balancing: b_e += rate * sign(target_e - load_e) for routed experts only.

    load_e is expert e's share of all top-k slots. The target is the mean routed-expert share
    (DeepSeek-V3), or, with `expected_ffn_topk` K_e, LongCat's budget K_e / (K * E) per expert,
    which also steers how many slots go to zero experts. Zero-expert biases never change.
    Works leaf-wise on matching trees (e.g. stacked [L, E+Z] biases and counts).
    """
    e, k = moe.num_experts, moe.top_k

    def update(bias, counts):
        counts = counts.astype(jnp.float32)
        share = counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)
        routed_share = share[..., :e]
        if expected_ffn_topk is None:
            target = jnp.mean(routed_share, axis=-1, keepdims=True)
        else:
            target = expected_ffn_topk / (k * e)
        delta = moe.bias_update_rate * jnp.sign(target - routed_share)
        return bias.at[..., :e].add(delta.astype(bias.dtype))

    return jax.tree.map(update, router_bias, tokens_per_expert)
