"""quant_matmul: W8A8, W4A8 (float or Integer Scale group scales), W4A16; backends by
`implementation=`.

Backends (modules <name>.py here; see xla.py for the interface) are filled by guarded imports;
each kernel backend also registers "<name>_interpret": the same kernels run by an interpreter
(CPU CI runs those). `implementation=None` tries the platform's default order, which always ends
with "xla" (the reference); naming an implementation never falls back to another, and a backend
that cannot run a case raises NotImplementedError naming the value and what it supports.
"""

from __future__ import annotations

import math
from types import ModuleType

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Shaped

from pallas_kernels.quant_matmul.reference import Mode
from pallas_kernels.registry import Registry

# Every backend; modules are <name>.py in this package ("xla" is the reference).
BACKENDS = ("pallas_tpu", "pallas_gpu", "triton", "segments", "xla")
# Backends that also register "<name>_interpret": the same kernels run by an interpreter (CPU CI).
INTERPRET_BACKENDS = ("pallas_tpu", "pallas_gpu", "triton")
# Which GPU kernel is faster is a measurement (scripts/bench_quant_matmul.py), not a belief.
_DEFAULT_ORDER = {
    "cpu": ("segments", "xla"),  # the reference with grouped products in sorted row tiles
    "tpu": ("pallas_tpu", "xla"),
    "gpu": ("pallas_gpu", "triton", "xla"),
}

# Registered value: (module, interpret).
REGISTRY = Registry(__package__, BACKENDS, _DEFAULT_ORDER, interpret=INTERPRET_BACKENDS,
                    load=lambda module, interpret: (module, interpret))
# Every name a backend may register under.
KNOWN_IMPLEMENTATIONS = REGISTRY.names


def available_implementations() -> tuple[str, ...]:
    """Registered backends, in KNOWN_IMPLEMENTATIONS order."""
    return REGISTRY.available()


def default_order(platform: str | None = None) -> tuple[str, ...]:
    """Registered backends tried by `implementation=None` on `platform` (default: jax's)."""
    return REGISTRY.default_order(platform)


def backend_module(implementation: str) -> ModuleType:
    """The module of a registered backend (its Config, default_config, search_space)."""
    return REGISTRY.get(implementation)[0]


def quant_matmul(
    x: Shaped[Array, "M K"],
    w: Shaped[Array, "Kw N"],
    *,
    w_scale: Shaped[Array, "*Gs Ns"],
    x_scale: Shaped[Array, "*Ms"] | None = None,
    bits: int = 8,
    group_size: int | None = None,
    alpha: float | int | None = None,
    out_dtype=jnp.bfloat16,
    implementation: str | None = None,
    config=None,
) -> Shaped[Array, "M N"]:
    """y = x @ dequantize(w), the mode chosen by the arguments (reference.py defines the math).

    Args:
      x: [M, K] int8 (A8: quantized activations, x_scale required) or float (A16: bf16, f16,
        f32; the weights are dequantized in the kernel). int4 and other integer activations are
        refused.
      w: [K, N] int8 (bits=8) or [K/2, N] int8 of packed nibbles (bits=4, see pack_int4).
      w_scale: float [N] (per channel) or [K/group_size, N] (per group); an integer dtype means
        Integer Scale: s_int = round(alpha * s) [K/group_size, N], with int8 x only.
      x_scale: float [M] (per token, dynamic) or [] / [1] (per tensor, static); A8 only.
      bits: weight bits, 8 or 4.
      group_size: contraction-group size of w_scale, dividing K; None for per-channel.
      alpha: the Integer Scale amplifier, given iff w_scale is integer:
        y = x_scale * float(acc_i32) / alpha. A power of two keeps the epilogue exact.
      out_dtype: float output dtype.
      implementation: one of KNOWN_IMPLEMENTATIONS, or None for the platform's default order.
      config: the named backend's Config (block sizes, warps, stages); default: its heuristic.

    Returns:
      [M, N] out_dtype. Cost 2*M*K*N ops; weights (bits/8 bytes each) read about once.
      int32 accumulation can wrap past reference.accumulator_bound (see reference.py).
    """
    mode, n_dim = _validate(x, w, w_scale, x_scale, bits, group_size, alpha, out_dtype,
                            implementation, config, num_experts=None)
    x_scale = _per_token(x_scale, x.shape[0])
    if x.shape[0] == 0 or n_dim == 0:
        return jnp.zeros((x.shape[0], n_dim), out_dtype)
    if x.shape[1] == 0:
        return jnp.zeros((x.shape[0], n_dim), out_dtype)
    module, interpret = _choose(implementation, x, w, mode, out_dtype, config, grouped=False)
    return module.quant_matmul(x, w, _normal_scale(w_scale, mode), x_scale, mode=mode,
                               alpha=alpha, out_dtype=jnp.dtype(out_dtype), config=config,
                               interpret=interpret)


def quant_gmm(
    x: Shaped[Array, "M K"],
    w: Shaped[Array, "E Kw N"],
    group_sizes: Shaped[Array, "Eg"],
    *,
    w_scale: Shaped[Array, "*Ws"],
    x_scale: Shaped[Array, "*Ms"] | None = None,
    bits: int = 8,
    group_size: int | None = None,
    alpha: float | int | None = None,
    out_dtype=jnp.bfloat16,
    implementation: str | None = None,
    config=None,
) -> Shaped[Array, "M N"]:
    """Grouped (MoE) quant_matmul: rows of x sorted by expert, expert e owns the next
    group_sizes[e] rows and multiplies them by w[e] with scales w_scale[e]; rows past
    sum(group_sizes) give 0 (a sum past M is clipped to M), as grouped_matmul.gmm.

    Args as quant_matmul, with w [E, K(/2), N], w_scale [E, N] or [E, K/group_size, N] and
    group_sizes int [E].
    """
    mode, n_dim = _validate(x, w, w_scale, x_scale, bits, group_size, alpha, out_dtype,
                            implementation, config, num_experts=w.shape[0] if w.ndim else None)
    if getattr(group_sizes, "ndim", None) != 1 or group_sizes.shape[0] != w.shape[0]:
        raise ValueError(f"group_sizes shape {getattr(group_sizes, 'shape', None)} must be "
                         f"[E] = [{w.shape[0]}] (w shape {w.shape})")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes.dtype={group_sizes.dtype} must be an integer dtype")
    x_scale = _per_token(x_scale, x.shape[0])
    if 0 in (x.shape[0], x.shape[1], n_dim, w.shape[0]):
        return jnp.zeros((x.shape[0], n_dim), out_dtype)
    module, interpret = _choose(implementation, x, w, mode, out_dtype, config, grouped=True)
    return module.quant_gmm(x, w, group_sizes.astype(jnp.int32), _normal_scale(w_scale, mode),
                            x_scale, mode=mode, alpha=alpha, out_dtype=jnp.dtype(out_dtype),
                            config=config, interpret=interpret)


def _choose(implementation, x, w, mode, out_dtype, config, *, grouped):
    """(module, interpret): the named backend (or its NotImplementedError), else the first in the
    default order whose check passes."""

    def attempt(name, backend):
        module, interpret = backend
        module.check(x, w, mode=mode, out_dtype=jnp.dtype(out_dtype), grouped=grouped,
                     config=config, interpret=interpret)
        return backend

    return REGISTRY.select(implementation, attempt)


def _per_token(x_scale, num_rows: int):
    """x_scale [M], [] or [1] -> float32 [M] (None stays None)."""
    if x_scale is None:
        return None
    return jnp.broadcast_to(jnp.reshape(x_scale.astype(jnp.float32), (-1,))
                            if x_scale.size == 1 else x_scale.astype(jnp.float32), (num_rows,))


def _normal_scale(w_scale, mode: Mode):
    return w_scale.astype(jnp.int32 if mode.integer_scale else jnp.float32)


def _shape(x) -> str:
    return "None" if x is None else str(tuple(getattr(x, "shape", ())))


def _validate(x, w, w_scale, x_scale, bits, group_size, alpha, out_dtype, implementation,
              config, *, num_experts) -> tuple[Mode, int]:
    """Check the combination; return the Mode and N."""
    grouped = num_experts is not None
    w_rank = 3 if grouped else 2
    if getattr(x, "ndim", None) != 2:
        raise ValueError(f"x must have shape [M, K], got {_shape(x)}")
    if getattr(w, "ndim", None) != w_rank:
        raise ValueError(f"w must have shape {'[E, K, N]' if grouped else '[K, N]'} (K/2 rows "
                         f"packed for bits=4), got {_shape(w)}")
    if jnp.dtype(x.dtype) == jnp.int8:
        a8 = True
    elif jnp.issubdtype(x.dtype, jnp.floating):
        a8 = False
    elif jnp.dtype(x.dtype).name in ("int4", "uint4"):
        raise ValueError(f"x.dtype={jnp.dtype(x.dtype).name}: int4 activations are not supported; "
                         "x must be int8 (A8, with x_scale) or a float dtype (A16)")
    else:
        raise ValueError(f"x.dtype={jnp.dtype(x.dtype).name} is not supported; x must be int8 (A8, "
                         "with x_scale) or a float dtype (A16)")
    if bits not in (4, 8) or isinstance(bits, bool):
        raise ValueError(f"bits={bits!r} must be 8 or 4 (weight bits)")
    if jnp.dtype(w.dtype) != jnp.int8:
        raise ValueError(f"w.dtype={jnp.dtype(w.dtype).name} must be int8 (bits=8 values, or two "
                         "int4 nibbles per byte for bits=4: see pack_int4)")
    m_dim, k_dim = x.shape
    if bits == 4 and k_dim % 2:
        raise ValueError(f"bits=4 packs two values per byte along K: K={k_dim} must be even")
    w_rows = k_dim if bits == 8 else k_dim // 2
    if w.shape[-2] != w_rows:
        raise ValueError(f"x shape {x.shape} and w shape {w.shape} disagree: bits={bits} needs "
                         f"{w_rows} rows of w for K={k_dim}")
    n_dim = w.shape[-1]
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) \
                or group_size <= 0:
            raise ValueError(f"group_size={group_size!r} must be a positive int or None")
        if k_dim % group_size:
            raise ValueError(f"group_size={group_size} must divide the contraction dimension "
                             f"K={k_dim}")
        group_size = int(group_size)
    want = ((num_experts,) if grouped else ()) + (
        (n_dim,) if group_size is None else (k_dim // group_size, n_dim))
    if getattr(w_scale, "shape", None) != want:
        what = "[N]" if group_size is None else "[K/group_size, N]"
        raise ValueError(f"w_scale shape {_shape(w_scale)} must be {'[E] + ' if grouped else ''}"
                         f"{what} = {list(want)} for w shape {w.shape}, group_size={group_size}")
    integer_scale = jnp.issubdtype(w_scale.dtype, jnp.integer)
    if not integer_scale and not jnp.issubdtype(w_scale.dtype, jnp.floating):
        raise ValueError(f"w_scale.dtype={w_scale.dtype} must be a float or integer dtype")
    if integer_scale:
        if not a8:
            raise ValueError(f"integer w_scale (dtype {w_scale.dtype}) needs int8 activations: "
                             f"Integer Scale is an A8 mode (x.dtype={x.dtype})")
        if group_size is None:
            raise ValueError("integer w_scale needs group_size: per-channel scales fold into "
                             "the float epilogue (pass float w_scale)")
        if jnp.dtype(w_scale.dtype).itemsize > 4:
            raise ValueError(f"integer w_scale dtype {w_scale.dtype} must fit int32")
        if alpha is None:
            raise ValueError("alpha (the Integer Scale amplifier) is required with integer "
                             f"w_scale (dtype {w_scale.dtype})")
        if (isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number))
                or not 0 < alpha < math.inf):
            raise ValueError(f"alpha={alpha!r} must be a finite positive number")
    elif alpha is not None:
        raise ValueError(f"alpha={alpha!r} is only for integer w_scale (Integer Scale); "
                         f"w_scale.dtype={w_scale.dtype} is float")
    if a8:
        if x_scale is None:
            raise ValueError("x_scale is required for int8 x (per-token [M] or per-tensor [])")
        if getattr(x_scale, "shape", None) not in ((m_dim,), (), (1,)):
            raise ValueError(f"x_scale shape {_shape(x_scale)} must be [M] = [{m_dim}] (per "
                             "token) or [] / [1] (per tensor)")
        if not jnp.issubdtype(x_scale.dtype, jnp.floating):
            raise ValueError(f"x_scale.dtype={x_scale.dtype} must be a float dtype")
    elif x_scale is not None:
        raise ValueError(f"x_scale must be None for float x (x.dtype={x.dtype}); it is the scale "
                         "of int8 activations")
    try:
        out_ok = jnp.issubdtype(jnp.dtype(out_dtype), jnp.floating)
    except TypeError:
        out_ok = False
    if not out_ok:
        raise ValueError(f"out_dtype={out_dtype!r} must be a float dtype")
    if config is not None and implementation is None:
        raise ValueError(f"config={config!r} needs a named implementation= (configs are per "
                         "backend)")
    return Mode(bits=bits, a8=a8, group_size=group_size, integer_scale=integer_scale), n_dim
