"""Checkpoint conversion: Hugging Face LongCat-Flash (safetensors) <-> lcjax (orbax).

Public names:
- load_hf_checkpoint(path, config=None) -> (Config, variables); save_hf_checkpoint(variables,
  config, path): in-memory, for notebooks and tests.
- hf_to_lcjax(src, dst) / lcjax_to_hf(src, dst): streamed directory conversions (the CLI).
- load_lcjax_checkpoint(path) -> (Config, variables): read a converted directory or a training
  run's newest checkpoint (lcjax_to_hf takes either too).
- config_from_checkpoint, model_config_from_hf, hf_config_dict: config.json <-> ModelConfig.
CLI: `python -m lcjax.convert {hf-to-lcjax,lcjax-to-hf,compare} ...`.
"""

from lcjax.convert.hf import (config_from_checkpoint, hf_to_lcjax, lcjax_to_hf, load_hf_checkpoint,
                              save_hf_checkpoint)
from lcjax.convert.hf_config import hf_config_dict, model_config_from_hf
from lcjax.convert.orbax_io import load_lcjax_checkpoint

__all__ = [
    "config_from_checkpoint", "hf_config_dict", "hf_to_lcjax", "lcjax_to_hf",
    "load_hf_checkpoint", "load_lcjax_checkpoint", "model_config_from_hf", "save_hf_checkpoint",
]
