"""Shared building blocks: parameter declaration with logical axes, weight matmuls, RMSNorm,
dense SwiGLU."""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from lcjax.ops import activation_sparsity, observe, quantized_matmul, sparse_gemv
from lcjax.ops.grouped_matmul import grouped_matmul
from lcjax.ops.qtensor import QTensor
from lcjax.parallel import context as parallel_context
from lcjax.parallel import tensor_parallel

# HF initialises every linear with normal(0, initializer_range=0.02); norms with ones.
default_init = nn.initializers.normal(stddev=0.02)
# Low-rank adapters (lcjax/lora): a variables collection beside "params", holding at a module's
# path, for its weight `name`, {"a": [K..., r], "b": [r, N...], "ctl": [6]} (experts: [E, K, r],
# [E, r, N]). ctl = (scale, lam, relu, silu, gelu weights, dropout rate): the adapter adds
# scale * B f(dropout(A x)) with f(z) = lam * phi(z) + (1 - lam) * z, phi = the weighted sum of
# the three activations (a one-hot choice). Absent collection: the plain model.
LORA_COLLECTION = "lora"
LORA_DROPOUT_RNG = "lora_dropout"


def dtype_of(name: str) -> jnp.dtype:
    """Config dtype string ("float32", "bfloat16", ...) to a jnp dtype."""
    return jnp.dtype(name)


def acc_dtype(dtype) -> jnp.dtype:
    """Dtype for statistics (norms, softmax, router): float32, or wider when the input is wider."""
    return jnp.promote_types(dtype, jnp.float32)


def declare(module: nn.Module, name: str, shape: Sequence[int], axes: Sequence[Optional[str]],
            param_dtype: str, init: Callable = default_init) -> Union[jax.Array, QTensor]:
    """Create a parameter whose logical axis names travel with it (for sharding rules).

    A quantized weight (lcjax.ops.qtensor.QTensor) is returned as stored: its integer payload has the
    matrix layout [K, N], not `shape`, which flax's parameter shape check would reject.
    """
    if len(shape) != len(axes):
        raise ValueError(f"param {name}: shape {tuple(shape)} and axes {tuple(axes)} differ in rank")
    if module.has_variable("params", name):
        stored = module.get_variable("params", name)
        if isinstance(stored, QTensor):
            logical = tuple(stored.kshape) + tuple(stored.nshape)
            if logical != tuple(shape)[len(shape) - len(logical):]:
                raise ValueError(f"param {name}: quantized weight of logical shape "
                                 f"{stored.logical_shape} where {tuple(shape)} is declared")
            return stored
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape),
                        dtype_of(param_dtype))


def _weight_einsum_grad_specs(spec: str):
    """(dx spec, dw spec) of "X,W->O", or None when some index lives in one operand alone
    (summed away or broadcast), where the plain einsum transpose is used instead."""
    if "." in spec or spec.count(",") != 1 or "->" not in spec:
        return None
    lhs, rest = spec.split(",")
    rhs, out = rest.split("->")
    if any(c not in rhs + out for c in lhs) or any(c not in lhs + out for c in rhs) or any(
            c not in lhs + rhs for c in out):
        return None
    return f"{out},{rhs}->{lhs}", f"{lhs},{out}->{rhs}"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum_vjp(spec: str, x, w):
    return jnp.einsum(spec, x, w)


def _einsum_fwd(spec, x, w):
    return jnp.einsum(spec, x, w), (x, w)


def _einsum_bwd(spec, res, dy):
    x, w = res
    dx_spec, dw_spec = _weight_einsum_grad_specs(spec)
    return (jnp.einsum(dx_spec, dy, w).astype(x.dtype),
            jnp.einsum(dw_spec, x, dy).astype(w.dtype))


_einsum_vjp.defvjp(_einsum_fwd, _einsum_bwd)


def weight_einsum(spec: str, x: Float[Array, "..."], w: Float[Array, "..."]) -> Float[Array, "..."]:
    """jnp.einsum(spec, x, w) whose gradients are the two einsums written out ("O,W->X" and
    "X,O->W"). The same values as autodiff's; on CPU, autodiff's transposed weight-gradient
    dot (dW of [N, M] x [N, V]) lowers to a transposed copy and a slow dot (~3x the forward
    for an 8192-wide lm_head), where the written-out einsum takes the fast matmul path."""
    if _weight_einsum_grad_specs(spec) is None:
        return jnp.einsum(spec, x, w)
    return _einsum_vjp(spec, x, w)


# Logical names of a row-parallel projection: (x axes, w axes, the contracted split axis).
RowParallel = tuple[tuple[str, ...], tuple[str, ...], str]
O_PROJ: RowParallel = (("batch", "length", "heads", "head_dim"), ("heads", "head_dim", "embed"), "heads")
DOWN_PROJ: RowParallel = (("batch", "length", "mlp"), ("mlp", "embed"), "mlp")


def _lora_activation(z: Float[Array, "... r"], ctl: Float[Array, "6"]) -> Float[Array, "... r"]:
    """f(z) = lam * phi(z) + (1 - lam) * z; exactly z when lam = 0 (the mergeable adapter)."""
    lam = ctl[1].astype(z.dtype)
    phi = (ctl[2].astype(z.dtype) * jax.nn.relu(z) + ctl[3].astype(z.dtype) * jax.nn.silu(z)
           + ctl[4].astype(z.dtype) * jax.nn.gelu(z))
    return lam * phi + (1 - lam) * z


def _lora_input(module: nn.Module, x, ctl):
    """Inverted dropout on the adapter input while a `lora_dropout` rng is given (training)."""
    if not module.scope.has_rng(LORA_DROPOUT_RNG):
        return x
    rate = ctl[5]
    keep = jax.random.bernoulli(module.make_rng(LORA_DROPOUT_RNG), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate).astype(x.dtype), jnp.zeros_like(x))


def lora_delta(module: nn.Module, name: str, spec: str, x: Float[Array, "..."],
               dtype) -> Optional[Float[Array, "..."]]:
    """scale * B f(A x) for weight `name` of `module` (spec "X,W->O" as `linear` runs it, W's
    contracted dims first), or None without an adapter. Cost: two rank-r einsums."""
    if not module.has_variable(LORA_COLLECTION, name):
        return None
    adapter = module.get_variable(LORA_COLLECTION, name)
    lhs, rest = spec.split(",")
    rhs, out = rest.split("->")
    k = "".join(c for c in rhs if c not in out)
    n = rhs[len(k):]
    kept = "".join(c for c in lhs if c not in k)
    ctl = adapter["ctl"]
    z = jnp.einsum(f"{lhs},{k}r->{kept}r", _lora_input(module, x, ctl), adapter["a"].astype(dtype))
    y = jnp.einsum(f"{kept}r,r{n}->{out}", _lora_activation(z, ctl), adapter["b"].astype(dtype))
    return y * ctl[0].astype(dtype)


def lora_expert_delta(module: nn.Module, name: str, x, dtype, group_sizes=None):
    """Per-expert adapter of expert weight `name` ([E, K, N]; adapter [E, K, r] / [E, r, N]):
    rows sorted by expert x [N, K] with `group_sizes` [E] (ragged dispatch) -> [N, N_out] via two
    grouped matmuls; or, without group_sizes, every expert on every token (the dense oracle):
    x [T, K] or [T, E, K] -> [T, E, N_out]. None without an adapter."""
    if not module.has_variable(LORA_COLLECTION, name):
        return None
    adapter = module.get_variable(LORA_COLLECTION, name)
    ctl = adapter["ctl"]
    a, b = adapter["a"].astype(dtype), adapter["b"].astype(dtype)
    x = _lora_input(module, x, ctl)
    if group_sizes is not None:
        z = grouped_matmul(x, a, group_sizes)
        y = grouped_matmul(_lora_activation(z, ctl), b, group_sizes)
    else:
        z = jnp.einsum("TK,EKr->TEr" if x.ndim == 2 else "TEK,EKr->TEr", x, a)
        y = jnp.einsum("TEr,ErN->TEN", _lora_activation(z, ctl), b)
    return y * ctl[0].astype(dtype)


def linear(module: nn.Module, name: str, spec: str, x: Float[Array, "..."], w, dtype,
           row_parallel: Optional[RowParallel] = None, sparse_input: bool = False
           ) -> Float[Array, "..."]:
    """einsum(spec, x, w) in `dtype` for the weight param `name` of `module`.

    A float weight runs `jnp.einsum(spec, x, w.astype(dtype))`, as it always has; a quantized
    weight (lcjax.ops.qtensor.QTensor) runs the quantized matmul. While calibrating (the
    lcjax.ops.observe collections mutable) the input's statistics are recorded under `name`.
    `row_parallel` marks a projection whose contracted dim is tensor-split: under
    `parallel.quantized_tp_comm` its all-reduce runs quantized (lcjax.parallel.tensor_parallel).
    That setting is read from the ambient parallel context: lcjax/parallel/context.py lists
    everything the context changes in the model. `sparse_input` (x mostly zero channels, a
    float 2-D weight, at most sparse_gemv.MAX_ROWS rows: decode) runs lcjax.ops.sparse_gemv,
    which reads only the rows of w whose input channel is nonzero.
    """
    if sparse_input and _sparse_gemv_applies(x, w, row_parallel):
        observe.record(module, name, x)
        y = sparse_gemv.sparse_matmul(x.astype(dtype), w.astype(dtype))
    else:
        y = _base_linear(module, name, spec, x, w, dtype, row_parallel)
    delta = lora_delta(module, name, spec, x, dtype)
    return y if delta is None else y + delta.astype(y.dtype)


def _sparse_gemv_applies(x, w, row_parallel) -> bool:
    """A float [K, N] weight, few rows, and no quantized tensor-parallel reduction to run."""
    if isinstance(w, QTensor) or w.ndim != 2 or x.size // max(x.shape[-1], 1) > sparse_gemv.MAX_ROWS:
        return False
    if row_parallel is None:
        return True
    _, w_axes, contract = row_parallel
    par = parallel_context.current()
    return tensor_parallel.quantized_tp_axis(par, w.shape, w_axes, contract) is None


def _base_linear(module, name, spec, x, w, dtype, row_parallel):
    rhs, out = spec.split(",")[1].split("->")
    observe.record(module, name, x, kdims=sum(c not in out for c in rhs))
    if row_parallel is not None and not isinstance(w, QTensor):
        x_axes, w_axes, contract = row_parallel
        par = parallel_context.current()
        if tensor_parallel.quantized_tp_axis(par, w.shape, w_axes, contract) is not None:
            return tensor_parallel.row_parallel_einsum(spec, x.astype(dtype), w.astype(dtype), x_axes,
                                                       w_axes, contract, par=par)
    if not isinstance(w, QTensor):
        return weight_einsum(spec, x, w.astype(dtype))
    return quantized_matmul.einsum(spec, x, w, dtype)


class RMSNorm(nn.Module):
    """x / rms(x) * scale, statistics in float32 (HF LongcatFlashRMSNorm semantics)."""

    eps: float
    axis_name: str = "embed"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: Float[Array, "... M"]) -> Float[Array, "... M"]:
        scale = declare(self, "scale", (x.shape[-1],), (self.axis_name,), self.param_dtype,
                        nn.initializers.ones)
        x32 = x.astype(acc_dtype(x.dtype))
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # HF casts the normalised value back to the input dtype before the weight multiply.
        return scale.astype(x.dtype) * normed.astype(x.dtype)


class SwiGLU(nn.Module):
    """Dense FFN down(silu(x @ gate) * (x @ up)); the LongCat `mlps[i]` and MTP MLP."""

    ffn_size: int
    param_dtype: str = "float32"
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x: Float[Array, "B S M"]) -> Float[Array, "B S M"]:
        m = x.shape[-1]
        cdt = dtype_of(self.dtype)
        gate = declare(self, "gate", (m, self.ffn_size), ("embed", "mlp"), self.param_dtype)  # [M, F]
        up = declare(self, "up", (m, self.ffn_size), ("embed", "mlp"), self.param_dtype)  # [M, F]
        down = declare(self, "down", (self.ffn_size, m), ("mlp", "embed"), self.param_dtype)  # [F, M]
        x = x.astype(cdt)
        a_bsf = nn.silu(linear(self, "gate", "BSM,MF->BSF", x, gate, cdt))
        u_bsf = linear(self, "up", "BSM,MF->BSF", x, up, cdt)
        # Activation sparsity (lcjax.ops.activation_sparsity): thresholds on the gate activation.
        activation_sparsity.record(self, "gate", a_bsf, up=u_bsf)
        h_bsf = activation_sparsity.threshold(self, "gate", a_bsf) * u_bsf
        h_bsf = nn.with_logical_constraint(h_bsf, ("batch", "length", "mlp"))
        return linear(self, "down", "BSF,FM->BSM", h_bsf, down, cdt, DOWN_PROJ,
                      sparse_input=activation_sparsity.thresholds_of(self, "gate") is not None)
