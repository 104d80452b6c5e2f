"""CHESS activation sparsity: calibrated thresholds that zero small FFN (and attention) activations.

CHESS (arXiv 2409.01366) drops FFN channel i of `y = W_down (silu(g) ⊙ u)` when its
contribution |silu(g)_i|·|u_i| is small, with |u_i| replaced by its calibration mean E|u_i|:

  CHESS   per layer, τ = the s-quantile of the importance |silu(g)_i|·E|u_i| over the calibration
          tokens and channels; per channel t_i = τ / E|u_i|; at inference silu(g)_i ← 0 when
          |silu(g)_i| <= t_i.
  CATS    the baseline: one threshold per layer, τ = the s-quantile of |silu(g)|.
  CHESS+  CHESS, plus one threshold per layer (the s-quantile of |x|) on the input of the q
          down-projection (q_a) and of the output projection (o). k/v keep the dense input, so
          the latent cache stays exact.

The thresholded activation is the gate activation silu(g), as in the paper: its zeros decide,
before the up projection runs, which W_up columns and W_down rows a sparse kernel may skip.
Routed experts get thresholds per expert ([E, F]) from the rows routed to them. Quantiles are
taken per calibration batch and averaged over batches (the paper: per sample; pass batches of
one sequence to match it exactly); E|u| is the mean over all calibration rows.

Use: `th = calibrate(cfg, variables, batches, sparsity=0.5, method="chess")`, then run the model
(training forward, prefill, cached decode, the serve engine, MTP drafts) on
`with_thresholds(variables, th)`: the thresholds ride in the variables collection
`lcjax.ops.activation_sparsity.COLLECTION` (its docstring lists the sites and shapes). A
threshold of 0 keeps the model exactly dense. Calibration keeps the raw activations of every
site on the host (tokens x width float32 per site, twice for FFNs): meant for a few tens of
thousands of tokens, as the paper's 64K.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Iterable, Optional, Union

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lcjax.config import Config, ModelConfig
from lcjax.model.model import LongCatModel, model_config
from lcjax.ops import activation_sparsity

METHODS = ("cats", "chess", "chess+")
FFN_SITE = "gate"
ATTENTION_SITES = ("q_a", "o")
Path = tuple[str, ...]
# Per calibration batch: {site path (module path + site name): {"act", "up"?, "sizes"?}} as numpy.
BatchStats = dict[Path, dict[str, np.ndarray]]


@flax.struct.dataclass
class ChessThresholds:
    """Per-layer, per-channel thresholds: `tree` is the activation_sparsity.COLLECTION subtree
    (module path -> {site: thresholds}; scanned layers stacked [L, ...], experts [.., E, F]).
    A pytree, so it can be passed through jit; method and sparsity are static metadata."""

    tree: Any
    method: str = flax.struct.field(pytree_node=False, default="chess")
    sparsity: float = flax.struct.field(pytree_node=False, default=0.5)

    def flat(self) -> dict[Path, Any]:
        """{site path: thresholds}."""
        return traverse_util.flatten_dict(self.tree)


def check_method(method: str, sparsity: float) -> None:
    """ValueError naming a bad method or a sparsity outside [0, 1)."""
    if method not in METHODS:
        raise ValueError(f"activation sparsity method {method!r} is not one of {METHODS}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"activation sparsity s={sparsity} must be in [0, 1)")


def parse_spec(spec: str) -> tuple[str, float]:
    """"chess:s=0.5" / "cats:s=0.3" / "chess+" (s=0.5) -> (method, sparsity)."""
    m = re.fullmatch(r"\s*([a-z+]+)\s*(?::\s*s\s*=\s*([0-9.eE+-]+)\s*)?", spec)
    if m is None:
        raise ValueError(f"activation sparsity spec {spec!r}: expected METHOD[:s=S], e.g. chess:s=0.5")
    method = m.group(1)
    try:
        sparsity = 0.5 if m.group(2) is None else float(m.group(2))
    except ValueError:
        raise ValueError(f"activation sparsity spec {spec!r}: s={m.group(2)!r} is not a number") from None
    check_method(method, sparsity)
    return method, sparsity


def with_thresholds(variables: dict, thresholds: Optional[ChessThresholds]) -> dict:
    """`variables` whose model applies `thresholds` (None: the dense model, collection removed)."""
    out = {k: v for k, v in variables.items() if k != activation_sparsity.COLLECTION}
    if thresholds is not None:
        out[activation_sparsity.COLLECTION] = thresholds.tree
    return out


def _as_inputs(batch: Any) -> tuple:
    """(input_ids, segment_ids or None, positions or None) of a trainer batch dict or an id array."""
    if isinstance(batch, dict):
        if "inputs" not in batch:
            raise ValueError(f"calibration batch keys {sorted(batch)} lack 'inputs' (token ids [B, S])")
        get = lambda k: None if batch.get(k) is None else jnp.asarray(batch[k])  # noqa: E731
        return jnp.asarray(batch["inputs"]), get("segment_ids"), get("positions")
    return jnp.asarray(batch), None, None


@functools.lru_cache(maxsize=None)
def _recording_forward(cfg: ModelConfig):
    """The jitted forward (with the MTP head) returning the sown activations."""

    @jax.jit
    def run(variables, ids, segment_ids, positions):
        _, state = LongCatModel(cfg).apply(variables, ids, segment_ids, positions,
                                           return_aux=True, mutable=[activation_sparsity.STATS])
        return state[activation_sparsity.STATS]
    return run


def collect_stats(config: Union[Config, ModelConfig], variables: dict,
                  batches: Iterable[Any]) -> list[BatchStats]:
    """The raw |activations| of every site, one dict per batch (on the host, float32).

    `variables` may carry thresholds (then later sites see the sparsified model: used to measure
    the activity of a sparse model); `calibrate` strips them first.
    """
    run = _recording_forward(model_config(config))
    out = []
    for batch in batches:
        sown = run(nn.unbox(variables), *_as_inputs(batch))
        flat = traverse_util.flatten_dict(sown, is_leaf=lambda _, v: isinstance(v, tuple))
        out.append({path: {k: np.asarray(v) for k, v in value[0].items()}
                    for path, value in flat.items()})
    if not out:
        raise ValueError("calibration needs at least one batch")
    return out


def _channel_ndim(path: Path) -> int:
    return 2 if path[-1] == "o" else 1


def _lead_shape(path: Path, st: dict) -> tuple[int, ...]:
    """Stacked-layer dims in front of [rows, *channels] (scanned layers: (L,))."""
    return st["act"].shape[: st["act"].ndim - 1 - _channel_ndim(path)]


def _rows_by_expert(sizes: np.ndarray, rows: int) -> np.ndarray:
    """Expert id of each sorted row; rows past sum(sizes) get E."""
    return np.searchsorted(np.cumsum(sizes), np.arange(rows), side="right")


def _site_threshold(path: Path, per_batch: list[dict], sparsity: float, method: str) -> np.ndarray:
    """Thresholds of one (unstacked) site from its per-batch stats, float64."""
    acts = [b["act"].astype(np.float64) for b in per_batch]
    channels = acts[0].shape[1:]
    if path[-1] != FFN_SITE:  # attention input: one quantile of |x| per layer
        return np.full(channels, np.mean([np.quantile(a, sparsity) for a in acts]))
    ups = [b["up"].astype(np.float64) for b in per_batch]
    if "sizes" not in per_batch[0]:  # dense FFN: all rows in one group
        groups = [[np.ones(a.shape[0], bool)] for a in acts]
    else:
        groups = [[ex == e for e in range(b["sizes"].shape[0])]
                  for b in per_batch for ex in [_rows_by_expert(b["sizes"], b["act"].shape[0])]]
    out = []
    for e in range(len(groups[0])):
        rows = [(a[g[e]], u[g[e]]) for a, u, g in zip(acts, ups, groups) if g[e].any()]
        if not rows:  # never routed in calibration: no information, stay dense
            out.append(np.zeros(channels))
            continue
        mean_u = np.sum([u.sum(0) for _, u in rows], axis=0) / sum(len(u) for _, u in rows)
        if method == "cats":
            out.append(np.full(channels, np.mean([np.quantile(a, sparsity) for a, _ in rows])))
            continue
        tau = np.mean([np.quantile(a * mean_u, sparsity) for a, _ in rows])
        big = np.finfo(np.float32).max  # a channel whose up projection was always 0
        out.append(np.where(mean_u > 0, tau / np.maximum(mean_u, 1e-300), big) if tau > 0
                   else np.zeros(channels))
    return out[0] if "sizes" not in per_batch[0] else np.stack(out)


def thresholds_from_stats(stats: list[BatchStats], sparsity: float, method: str) -> dict[Path, np.ndarray]:
    """{site path: float32 thresholds} of `method` at target sparsity s (0: all zeros)."""
    check_method(method, sparsity)
    sites = [p for p in stats[0] if p[-1] == FFN_SITE or (method == "chess+" and p[-1] in ATTENTION_SITES)]
    out = {}
    for path in sites:
        lead = _lead_shape(path, stats[0][path])
        per_layer = []
        for idx in np.ndindex(*lead):
            per_batch = [{k: v[idx] for k, v in b[path].items()} for b in stats]
            t = _site_threshold(path, per_batch, sparsity, method)
            per_layer.append(np.zeros_like(t) if sparsity == 0 else t)  # s=0: exactly dense
        out[path] = np.stack(per_layer).reshape(lead + per_layer[0].shape).astype(np.float32)
    return out


def calibrate(config: Union[Config, ModelConfig], variables: dict, batches: Iterable[Any],
              sparsity: float = 0.5, method: str = "chess") -> ChessThresholds:
    """Thresholds of `method` ("cats", "chess", "chess+") at target sparsity s in [0, 1).

    Args:
      config: the run Config or ModelConfig.
      variables: {"params", "router_bias"} of the model (float or quantized; any thresholds in
        them are ignored: calibration runs the dense model).
      batches: trainer batch dicts (inputs, segment_ids, positions) or int token arrays [B, S].
      sparsity: the target fraction of activations zeroed per site.
      method: see the module docstring.
    """
    check_method(method, sparsity)
    stats = collect_stats(config, with_thresholds(variables, None), batches)
    flat = {path: jnp.asarray(t) for path, t in thresholds_from_stats(stats, sparsity, method).items()}
    return ChessThresholds(tree=traverse_util.unflatten_dict(flat), method=method, sparsity=float(sparsity))


def activity(stats: list[BatchStats], thresholds: ChessThresholds) -> dict[Path, dict[str, np.ndarray]]:
    """Per site: {"active": Σ_rows active channels, "rows": rows seen, "channels": width}, per
    stacked layer (leading dims of the site), from stats collected on the model (use
    `collect_stats(cfg, with_thresholds(variables, thresholds), batches)`). Sites without
    thresholds count every channel active."""
    flat = {p: np.asarray(t, np.float32) for p, t in thresholds.flat().items()}
    out = {}
    for path in stats[0]:
        lead = _lead_shape(path, stats[0][path])
        cdims = _channel_ndim(path)
        active = np.zeros(lead)
        rows = np.zeros(lead)
        for b in stats:
            act = b[path]["act"]
            n = act.shape[len(lead)]
            if "sizes" in b[path]:
                n_real = b[path]["sizes"].sum(-1)  # [*lead]; rows past the groups are padding
            else:
                n_real = np.full(lead, n)
            for idx in np.ndindex(*lead):
                a = act[idx][: int(n_real[idx])]
                t = flat.get(path)
                if t is None:
                    keep = np.ones(a.shape, bool)
                elif "sizes" in b[path]:
                    t_rows = t[idx][_rows_by_expert(b[path]["sizes"][idx], a.shape[0])]
                    keep = a > t_rows
                else:
                    keep = a > t[idx]
                active[idx] += keep.reshape(a.shape[0], -1).sum()
                rows[idx] += a.shape[0]
        out[path] = {"active": active, "rows": rows,
                     "channels": int(np.prod(stats[0][path]["act"].shape[-cdims:]))}
    return out
