"""lcjax: JAX/Flax implementation of the LongCat model family (Flash, Flash-Lite, ZigZag).

Public names by theme:
- configuration: Config, ModelConfig, MLAConfig, MoEConfig, NgramConfig, LozaConfig, RopeConfig,
  MeshConfig, RuntimeConfig, load_config, dump_config, resolve_config_path, count_params
- model: LongCatModel, ModelAux, RoutingStats, update_router_bias, BIAS_COLLECTION
- inference: init_cache, prefill, decode_step, ModelCache
"""

from lcjax.config import (Config, LozaConfig, MeshConfig, MLAConfig, ModelConfig, MoEConfig,
                          NgramConfig, RopeConfig, RuntimeConfig)
from lcjax.config_io import dump_config, load_config, resolve_config_path
from lcjax.model import (BIAS_COLLECTION, LongCatModel, ModelAux, ModelCache, RoutingStats,
                         decode_step, init_cache, prefill, update_router_bias)
from lcjax.params_count import ParamCount, count_params

__all__ = [
    "BIAS_COLLECTION", "Config", "LongCatModel", "LozaConfig", "MLAConfig", "MeshConfig",
    "ModelAux", "ModelCache", "ModelConfig", "MoEConfig", "NgramConfig", "ParamCount", "RopeConfig",
    "RoutingStats", "RuntimeConfig", "count_params", "decode_step", "dump_config", "init_cache",
    "load_config", "prefill", "resolve_config_path", "update_router_bias",
]
