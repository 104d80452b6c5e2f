"""Flax modules of the LongCat family; no I/O."""

from lcjax.model.cache import LayerCache, ModelCache
from lcjax.model.decode import decode_step, init_cache, prefill
from lcjax.model.model import LongCatModel, ModelAux, document_positions
from lcjax.model.moe import BIAS_COLLECTION, RoutingStats, update_router_bias

__all__ = [
    "BIAS_COLLECTION", "LayerCache", "LongCatModel", "ModelAux", "ModelCache", "RoutingStats",
    "decode_step", "document_positions", "init_cache", "prefill", "update_router_bias",
]
