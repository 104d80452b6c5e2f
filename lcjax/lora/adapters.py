"""Which weights get adapters, their shapes, initialisation, and the "lora" variables collection.

Adapters live in their own tree, shaped like the module tree: for a weight at parameter path
"layers/attn_0/q_a" the adapter is `tree["layers"]["attn_0"]["q_a"] = {"a": A, "b": B}`. Passed
to the model as the `lcjax.model.layers.LORA_COLLECTION` variables collection (with each site's
control vector added by `attach`), so the model's own matmul helpers (`layers.linear`, the MoE
grouped matmuls) add `scale * B f(A x)`: no model code knows LoRA beyond that hook, the base
params stay one untouched tree (frozen, and the same tree every checkpoint reader expects), and
adapters can be stored, merged or dropped on their own.

Shapes, with W = [lead..., K..., N...] (lead: the scanned layer axis L and the expert axis E):
    A = [lead..., K..., r]  (normal, std 1 / sqrt(prod K): the layer's fan-in)
    B = [lead..., r, N...]  (zeros: step 0 is the base model exactly)
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from lcjax.config import LoraConfig
from lcjax.config_run import AFA_ACTIVATIONS

# (module name pattern, weight) -> (contracted dims K, output dims N, expert axis in front).
_HOOKS = (
    (re.compile(r"^attn(_\d+)?$"), {"q_a": (1, 1), "q_b": (1, 2), "kv_a": (1, 1), "o": (2, 1)}, 0),
    (re.compile(r"^mlp(_\d+)?$"), {"gate": (1, 1), "up": (1, 1), "down": (1, 1)}, 0),
    (re.compile(r"^moe$"), {"gate": (1, 1), "up": (1, 1), "down": (1, 1)}, 1),
)
HOOKED = "MLA q_a q_b kv_a o, dense SwiGLU gate up down, expert gate up down"


def _key(k) -> str:
    return str(getattr(k, "key", k))


def _site(path: tuple[str, ...], scan_layers: bool):
    """(lead, K dims, N dims) of a hooked weight, else None."""
    if len(path) < 2:
        return None
    for pattern, weights, experts in _HOOKS:
        if pattern.match(path[-2]) and path[-1] in weights:
            lead = int(scan_layers and path[0] == "layers") + experts
            return (lead, *weights[path[-1]])
    return None


def target_sites(params: Any, lora: LoraConfig, scan_layers: bool) -> dict[tuple[str, ...], tuple]:
    """{param path: (lead, k, n, shape)} of the weights `lora.targets` selects.

    Raises ValueError naming the pattern when it selects no hooked weight (and listing any
    unhooked weights it did match)."""
    pattern = re.compile(lora.pattern)
    sites, unhooked = {}, []
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        path = tuple(_key(k) for k in path)
        name = "/".join(path)
        if not pattern.search(name):
            continue
        site = _site(path, scan_layers)
        if site is None:
            unhooked.append(name)
        else:
            sites[path] = (*site, tuple(leaf.shape))
    if not sites:
        raise ValueError(f"config: lora.targets={lora.targets!r} is invalid: expected a pattern that "
                         f"selects some adapted weight ({HOOKED}); it matches "
                         f"{unhooked[:6] or 'no parameter'}")
    return sites


def _shapes(site, rank: int):
    lead, k, _, shape = site
    return shape[:lead + k] + (rank,), shape[:lead] + (rank,) + shape[lead + k:]


def _nest(flat: dict[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def _flat_sites(adapters: Any) -> dict[tuple[str, ...], dict]:
    """{weight path: {"a", "b", ...}} of an adapter tree."""
    out = {}

    def walk(node, path):
        if isinstance(node, dict) and "a" in node and "b" in node:
            out[path] = node
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + (k,))

    walk(adapters, ())
    return out


def init_adapters(key: jax.Array, params: Any, lora: LoraConfig, scan_layers: bool,
                  dtype=jnp.float32) -> dict:
    """Fresh adapters for the selected weights of `params` (arrays or ShapeDtypeStructs)."""
    sites = target_sites(params, lora, scan_layers)
    flat = {}
    for i, (path, site) in enumerate(sorted(sites.items())):
        a_shape, b_shape = _shapes(site, lora.rank)
        lead, k = site[0], site[1]
        fan_in = math.prod(a_shape[lead:lead + k])
        a = jax.random.normal(jax.random.fold_in(key, i), a_shape, dtype) / math.sqrt(fan_in)
        flat[path] = {"a": a, "b": jnp.zeros(b_shape, dtype)}
    return _nest(flat)


def abstract_adapters(params: Any, lora: LoraConfig, scan_layers: bool, dtype=jnp.float32) -> dict:
    return jax.eval_shape(lambda: init_adapters(jax.random.key(0), params, lora, scan_layers, dtype))


def adapter_specs(adapters: Any, param_specs: Any, lora: LoraConfig, scan_layers: bool) -> dict:
    """PartitionSpecs of the adapters: A keeps W's lead and K axes, B its lead and N axes."""
    flat_specs = {tuple(_key(k) for k in p): s for p, s in jax.tree_util.tree_leaves_with_path(
        param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))}
    out = {}
    for path, adapter in _flat_sites(adapters).items():
        a_nd, b_nd = adapter["a"].ndim, adapter["b"].ndim
        site = _site(path, scan_layers)
        lead, k = site[0], site[1]
        spec = tuple(flat_specs[path]) + (None,) * (a_nd + b_nd)  # padded: W ndim = a + b - 2
        out[path] = {"a": PartitionSpec(*spec[:lead + k], None),
                     "b": PartitionSpec(*spec[:lead], None, *spec[lead + k:b_nd + k - 1])}
    return _nest(out)


def control(lora: LoraConfig, lam) -> jax.Array:
    """The [6] control vector of every site: (scale, lam, relu, silu, gelu, dropout)."""
    phi = [float(lora.afa.activation == a) for a in AFA_ACTIVATIONS[1:]]
    lam = jnp.asarray(0.0 if lora.afa.activation == "none" else lam, jnp.float32)
    head = jnp.asarray([lora.scale], jnp.float32)
    tail = jnp.asarray(phi + [lora.dropout], jnp.float32)
    return jnp.concatenate([head, lam[None], tail])


def attach(adapters: Any, lora: LoraConfig, lam, scan_layers: bool) -> dict:
    """The "lora" variables collection: each site's {"a", "b"} plus its control vector, with
    the site's leading (layer / expert) axes so scanned layers slice it like the params."""
    ctl = control(lora, lam)
    flat = {}
    for path, adapter in _flat_sites(adapters).items():
        lead = int(scan_layers and path[0] == "layers")  # the expert axis is not sliced
        shape = adapter["a"].shape[:lead] + (ctl.shape[0],)
        flat[path] = {"a": adapter["a"], "b": adapter["b"], "ctl": jnp.broadcast_to(ctl, shape)}
    return _nest(flat)


def sites_of(adapters: Any) -> dict[tuple[str, ...], dict]:
    """{weight path: adapter} of an adapter tree (public form of the walk)."""
    return _flat_sites(adapters)
