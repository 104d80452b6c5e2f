"""Shapes and logical axes of a quantized tree without quantizing: for memory plans and shardings.

`abstract_quantize` maps the abstract float params (ShapeDtypeStructs, as `jax.eval_shape` of
the model's init gives them) and their logical PartitionSpecs to what `quantize_model` would
store: a QTensor of ShapeDtypeStructs per quantized weight and a QTensor of logical specs
beside it. A QTensor stores the matrix [*batch, K, N] (K = prod(kshape), N = prod(nshape));
splitting the leading kshape / nshape dim of the float weight is a contiguous split of K / N,
so the merged dims keep the leading dim's logical name:
    q              [*batch, K (K//2 int4), N]   (*batch, k_name, n_name)
    scale, zero    channel [*batch, N]; group [*batch, K//g, N]; tensor [*batch]
    channel_scale  [*batch, N]                  (Integer Scale)
    smooth         [*batch, K]                  (SmoothQuant; FPTQ's LAE, counted for every
                                                 layer: the real tree drops it where no layer
                                                 of the stack chose LAE, so this is an upper bound)
    act_scale      [*batch]                     (static / FPTQ activations)
"""

from __future__ import annotations

import math
from typing import Any, Union

import flax.core
import jax
import numpy as np
from flax import traverse_util
from jax.sharding import PartitionSpec

from lcjax.config import Config, ModelConfig
from lcjax.model.model import model_config
from lcjax.ops.qtensor import QTensor
from lcjax.quant.apply import LayerSpec, layer_spec
from lcjax.quant.quantizers import check_weight_settings
from lcjax.quant.recipes import RecipeConfig, get_recipe

F32 = np.dtype(np.float32)


def _sds(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(int(d) for d in shape), np.dtype(dtype))


def abstract_qtensor(shape: tuple, spec: LayerSpec, recipe: RecipeConfig, name: str = "weight"
                     ) -> tuple[QTensor, QTensor]:
    """(QTensor of ShapeDtypeStructs, QTensor of dim-name tuples) for one float weight `shape`.

    The second QTensor holds, per stored array, the index of the float weight's dim whose
    logical name each stored dim takes (None: no name); `abstract_quantize` turns it into specs.
    """
    nb = spec.batch_dims
    batch, kshape, nshape = shape[:nb], shape[nb: nb + spec.kdims], shape[nb + spec.kdims:]
    k, n = math.prod(kshape), math.prod(nshape)
    check_weight_settings(name, k, recipe.weight_bits, recipe.granularity, recipe.group_size)
    weight_only = recipe.weight_only or spec.weight_only
    bdims = tuple(range(nb))
    kdim, ndim = nb, nb + spec.kdims  # the leading k / n dim of the float weight
    scale_shape, scale_dims = {
        "tensor": (batch, bdims),
        "channel": (batch + (n,), bdims + (ndim,)),
        "group": (batch + (k // (recipe.group_size or 1), n), bdims + (kdim, ndim)),
    }[recipe.granularity]
    integer = recipe.integer_scale is not None and not weight_only
    smoothed = not weight_only and (recipe.smoothquant is not None or recipe.act == "fptq")
    static = not weight_only and recipe.act in ("static", "fptq")
    arrays = dict(
        q=(_sds(batch + (k // 2 if recipe.weight_bits == 4 else k, n), np.int8), bdims + (kdim, ndim)),
        scale=(_sds(scale_shape, np.int32 if integer else F32), scale_dims),
        zero=(_sds(scale_shape, F32), scale_dims) if not recipe.symmetric else None,
        channel_scale=(_sds(batch + (n,), F32), bdims + (ndim,)) if integer else None,
        smooth=(_sds(batch + (k,), F32), bdims + (kdim,)) if smoothed else None,
        act_scale=(_sds(batch, F32), bdims) if static else None,
    )
    act = "none" if weight_only else ("static" if recipe.act == "fptq" else recipe.act)
    static_fields = dict(bits=recipe.weight_bits, granularity=recipe.granularity,
                         group_size=recipe.group_size, act=act, kshape=tuple(kshape),
                         nshape=tuple(nshape), alpha=None)
    shapes = QTensor(**{f: v and v[0] for f, v in arrays.items()}, **static_fields)
    dims = QTensor(**{f: v and v[1] for f, v in arrays.items()}, **static_fields)
    return shapes, dims


def abstract_quantize(params: Any, logical_specs: Any, config: Union[Config, ModelConfig],
                      recipe: Union[str, RecipeConfig]) -> tuple[Any, Any]:
    """(abstract quantized params, logical specs) as `quantize_model(params, config, recipe)`.

    Args:
      params: the float `params` collection as ShapeDtypeStructs (or arrays: only shapes read).
      logical_specs: the matching tree of logical PartitionSpecs (`nn.get_partition_spec`).
      config, recipe: as for `quantize_model`.
    Returns:
      Trees of the same nesting; each quantized weight is a QTensor whose array fields are
      ShapeDtypeStructs in the first tree and logical PartitionSpecs in the second (None fields
      in both where the recipe stores nothing). Nothing is allocated.
    """
    cfg = model_config(config)
    recipe = get_recipe(recipe)
    flat = traverse_util.flatten_dict(flax.core.unfreeze(params))
    flat_specs = traverse_util.flatten_dict(flax.core.unfreeze(logical_specs))
    out, out_specs = {}, {}
    for path, leaf in flat.items():
        logical = tuple(flat_specs[path]) + (None,) * (len(leaf.shape) - len(flat_specs[path]))
        spec = layer_spec(path, cfg)
        if spec is None:
            out[path], out_specs[path] = _sds(leaf.shape, leaf.dtype), PartitionSpec(*logical)
            continue
        shapes, dims = abstract_qtensor(tuple(leaf.shape), spec, recipe, "/".join(path))
        out[path] = shapes
        out_specs[path] = jax.tree.map(lambda d: PartitionSpec(*(logical[i] for i in d)), dims,
                                       is_leaf=lambda x: isinstance(x, tuple))
    return traverse_util.unflatten_dict(out), traverse_util.unflatten_dict(out_specs)


__all__ = ["abstract_qtensor", "abstract_quantize"]
