"""`quantize_model`: a float LongCat parameter tree -> one the model runs with QTensor weights.

Quantized: the MLA projections q_a, q_b, kv_a, o (and kv_b, stored quantized but always used
dequantized: see lcjax/model/attention.py), the dense SwiGLU gate/up/down (decoder layers and
MTP block) and the MoE expert gate/up/down. Float: embeddings (token, n-gram, MTP), norms, the
router classifier and its bias, the MTP eh_proj and the lm_head.

Under nn.scan (scan_layers) a weight keeps its leading layer axis; statistics, smoothing and
static scales are per layer along it, and FPTQ's policy is per layer through the static scale
(0 = per-token, see QTensor.act_scale).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional, Union

import flax.core
import flax.linen as nn
import numpy as np
from flax import traverse_util

from lcjax.config import Config, ModelConfig
from lcjax.model.model import model_config
from lcjax.quant import fptq as fptq_lib
from lcjax.quant.calibrate import calibrate
from lcjax.quant.integer_scale import to_integer_scale
from lcjax.quant.quantizers import QTensor, quantize_weight, static_scale, with_activation
from lcjax.quant.recipes import RecipeConfig, get_recipe, search_clip, smoothquant_scale

_MLA = re.compile(r"attn(_\d+)?")
_MLP = re.compile(r"mlp(_\d+)?")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """Where a quantizable weight's axes are: [*batch (L, E), *k (kdims), *n]."""

    batch_dims: int
    kdims: int
    weight_only: bool = False  # MLA kv_b: dequantized for both attention forms
    experts: bool = False


def layer_spec(path: tuple, cfg: ModelConfig) -> Optional[LayerSpec]:
    """The LayerSpec of a parameter path, or None if the parameter stays float."""
    if len(path) < 2:
        return None
    parent, leaf = path[-2], path[-1]
    stacked = 1 if (cfg.scan_layers and path[0] == "layers") else 0
    if _MLA.fullmatch(parent) and leaf in ("q_a", "q_b", "kv_a", "kv_b", "o"):
        return LayerSpec(stacked, 2 if leaf == "o" else 1, weight_only=leaf == "kv_b")
    if _MLP.fullmatch(parent) and leaf in ("gate", "up", "down"):
        return LayerSpec(stacked, 1)
    if parent == "moe" and leaf in ("gate", "up", "down"):
        return LayerSpec(stacked + 1, 1, experts=True)
    return None


def _name(path: tuple) -> str:
    return "/".join(path)


def quantized_paths(params: Any, config: Union[Config, ModelConfig]) -> list[str]:
    """Names ("layers/attn_0/q_a", ...) of the weights `quantize_model` quantizes."""
    cfg = model_config(config)
    flat = traverse_util.flatten_dict(flax.core.unfreeze(nn.unbox(params)))
    return [_name(p) for p in flat if layer_spec(p, cfg) is not None]


def _check_layer(name: str, spec: LayerSpec, recipe: RecipeConfig) -> None:
    """Unsupported combinations, named by layer and setting (weight checks: quantize_weight)."""
    if recipe.act_bits != 8 and not (recipe.weight_only or spec.weight_only):
        raise ValueError(f"{name}: act_bits={recipe.act_bits} is not supported: activations are "
                         "quantized to int8 only (int4 activations are refused)")
    if recipe.integer_scale is not None:
        if recipe.granularity != "group":
            raise ValueError(f"{name}: integer_scale={recipe.integer_scale} needs group-wise "
                             f"weight scales, got granularity={recipe.granularity!r}")
        if not recipe.symmetric:
            raise ValueError(f"{name}: integer_scale={recipe.integer_scale} needs symmetric weights")
        if recipe.weight_only:
            raise ValueError(f"{name}: integer_scale={recipe.integer_scale} is an A8 mode; "
                             "act='none' (weight-only) keeps float group scales")
    if recipe.clip_search and recipe.granularity != "channel":
        raise ValueError(f"{name}: clip_search searches per-channel ranges, got "
                         f"granularity={recipe.granularity!r}")


def _input_stats(name: str, stats: Optional[dict], spec: LayerSpec, needed: bool):
    """(absmax [*batch, K], gram or None), empty experts filled with the layer's maximum."""
    if stats is None:
        if needed:
            raise ValueError(f"{name}: the recipe needs calibration statistics for this input, "
                             "but calibration recorded none")
        return None, None
    absmax = np.asarray(stats["absmax"], np.float32)
    if spec.experts:
        seen = np.asarray(stats["count"])[..., None] > 0
        absmax = np.where(seen, absmax, absmax.max(axis=-2, keepdims=True))
    return absmax, stats.get("gram")


def quantize_layer(name: str, w: Any, spec: LayerSpec, recipe: RecipeConfig,
                   stats: Optional[dict] = None) -> tuple[QTensor, dict]:
    """One weight [*batch, *k, *n] -> (QTensor, report row)."""
    _check_layer(name, spec, recipe)
    shape = tuple(w.shape)
    batch, kshape = shape[: spec.batch_dims], shape[spec.batch_dims: spec.batch_dims + spec.kdims]
    nshape = shape[spec.batch_dims + spec.kdims:]
    k, n = int(np.prod(kshape)), int(np.prod(nshape))
    w2 = np.asarray(w, np.float32).reshape(batch + (k, n))
    weight_only = recipe.weight_only or spec.weight_only
    absmax, gram = _input_stats(name, stats, spec, recipe.needs_calibration and not weight_only)
    report = {"layer": name, "K": k, "N": n, "act": "none" if weight_only else recipe.act}
    if absmax is not None:
        report["v"] = float(absmax.max())

    smooth, act_scale, act = None, None, ("none" if weight_only else recipe.act)
    if not weight_only:
        if recipe.smoothquant is not None:
            smooth = smoothquant_scale(absmax, w2, recipe.smoothquant)
        if recipe.act == "fptq":
            axes = (-2, -1) if spec.experts else (-1,)
            v = absmax.max(axis=axes)  # per layer: [*L]
            pol = fptq_lib.policy(v, recipe.fptq)
            if spec.experts:
                pol = np.broadcast_to(pol[..., None], absmax.shape[:-1])
            lae = fptq_lib.lae_scale(absmax)
            smooth = np.where((pol == fptq_lib.LAE)[..., None], lae, 1.0).astype(np.float32)
            scale = static_scale(np.asarray(np.max(absmax / smooth, axis=-1)))
            act_scale = np.where(pol == fptq_lib.DYNAMIC, 0.0, scale).astype(np.float32)
            act = "static"
            report["policy"] = {str(p): int(np.sum(np.asarray(pol) == p)) for p in np.unique(pol)}
            if smooth is not None and not (pol == fptq_lib.LAE).any():
                smooth = None
        elif recipe.act == "static":
            eff = absmax if smooth is None else absmax / smooth
            act_scale = static_scale(np.asarray(eff.max(axis=-1)))
    if smooth is not None:
        w2 = w2 * smooth[..., :, None]

    clip = 1.0
    if recipe.clip_search:
        h = None
        if gram is not None:
            h = np.asarray(gram, np.float64)
            if smooth is not None:
                h = h / (smooth[..., :, None] * smooth[..., None, :])
        clip, err, base = search_clip(w2, h, bits=recipe.weight_bits, grid=recipe.clip_grid)
        report["clip_mean"] = float(np.mean(clip))
        report["clip_mse_ratio"] = float(np.sum(err) / max(np.sum(base), 1e-30))

    qt = quantize_weight(w2, kdims=1, batch_dims=len(batch), bits=recipe.weight_bits,
                         granularity=recipe.granularity, group_size=recipe.group_size,
                         symmetric=recipe.symmetric, clip=clip, name=name)
    qt = qt.replace(kshape=kshape, nshape=nshape)
    qt = with_activation(qt, act, act_scale=act_scale, smooth=smooth, name=name)
    if recipe.integer_scale is not None and not weight_only:
        qt = to_integer_scale(qt, recipe.integer_scale, name)
        report["alpha"] = qt.alpha
    report["quant"] = qt.describe()
    return qt, report


def quantize_model(params: Any, config: Union[Config, ModelConfig], recipe: Union[str, RecipeConfig],
                   calib_data: Optional[Any] = None, *, stats: Optional[dict] = None,
                   return_report: bool = False):
    """Quantize a float LongCat tree with `recipe`; the result runs in LongCatModel, decode and serve.

    Args:
      params: the float `params` tree, or the variables {"params", "router_bias"} (needed when
        the recipe calibrates: the forward pass routes with the bias). The same kind comes back.
      config: the run Config or its ModelConfig.
      recipe: a RecipeConfig or a preset name with overrides ("fptq_w4a8:group_size=8").
      calib_data: batches for lcjax.quant.calibrate (trainer batch dicts or token arrays
        [B, S]); required by recipes with static scales, smoothing or clip search.
      stats: statistics from lcjax.quant.calibrate (instead of calib_data; reused across a
        sweep of recipes). Clip search needs them with gram=True.
      return_report: also return one dict per quantized weight (ranges, policy, clip, α).

    Raises:
      ValueError naming the layer and the setting: unsupported combinations (int4 activations,
      a group size not dividing K, Integer Scale without groups), an already-quantized tree.
    """
    cfg = model_config(config)
    recipe = get_recipe(recipe)
    tree = flax.core.unfreeze(nn.unbox(params))
    is_variables = isinstance(tree, dict) and "params" in tree
    float_params = tree["params"] if is_variables else tree
    flat = traverse_util.flatten_dict(float_params)
    for path, leaf in flat.items():
        if isinstance(leaf, QTensor):
            raise ValueError(f"{_name(path)} is already quantized ({leaf.describe()}): "
                             "quantize_model takes a float parameter tree")
    specs = {p: s for p in flat if (s := layer_spec(p, cfg)) is not None}
    if not specs:
        raise ValueError("quantize_model: no quantizable weights found (is this a LongCat params tree?)")

    if stats is None:
        stats = {}
    elif recipe.clip_search and not any("gram" in st for st in stats.values()):
        raise ValueError(f"recipe {recipe.name!r} searches clipping on the output error: the "
                         "given stats need calibrate(..., gram=True)")
    if recipe.needs_calibration and not stats:
        if calib_data is None:
            raise ValueError(f"recipe {recipe.name!r} calibrates (static scales, smoothing or clip "
                             "search): pass calib_data")
        if not is_variables:
            raise ValueError(f"recipe {recipe.name!r} calibrates by running the model: pass the "
                             "variables {'params', 'router_bias'}, not the params alone")
        stats = calibrate(cfg, tree, calib_data, gram=recipe.clip_search)

    reports = []
    for path, spec in specs.items():
        qt, report = quantize_layer(_name(path), flat[path], spec, recipe, stats.get(path))
        flat[path] = qt
        reports.append(report)
    out_params = traverse_util.unflatten_dict(flat)
    out = {**tree, "params": out_params} if is_variables else out_params
    return (out, reports) if return_report else out
