"""Post-training quantization of LongCat models: quantizers, recipes, calibration.

- quantizers: `QTensor` (the quantized weight leaf the model runs), int8/int4 (packed) weights
  per tensor / channel / group, symmetric or asymmetric; per-token and static int8 activations.
- recipes: W8A8 (+SmoothQuant), FPTQ W4A8 (LAE + layer policy), W4A8 + Integer Scale, W4A16,
  OdysseyLLM per-channel W4A8 with clip search, naive W4A8.
- `quantize_model(params_or_variables, config, recipe, calib_data)`; orbax save/load;
  `lcjax.quant.calibrate.calibrate` (the module shares its name, so it is not re-exported).

The model imports nothing from here (QTensor and the calibration hooks live in lcjax.ops);
`apply` and `calibrate` import the model, so their names load lazily (PEP 562): importing
lcjax.quant for QTensor does not build the model.
"""

from lcjax.lazy import lazy_getattr
from lcjax.quant.quantizers import (QTensor, dequantize, pack_int4, quantize_per_token,
                                    quantize_static, quantize_weight, unpack_int4)

_LAZY = {
    "quantize_model": "lcjax.quant.apply",
    "quantized_paths": "lcjax.quant.apply",
    "RecipeConfig": "lcjax.quant.recipes",
    "RECIPES": "lcjax.quant.recipes",
    "get_recipe": "lcjax.quant.recipes",
    "FPTQConfig": "lcjax.quant.fptq",
    "save_quantized": "lcjax.quant.checkpoint",
    "load_quantized": "lcjax.quant.checkpoint",
}
__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = ["QTensor", "dequantize", "pack_int4", "quantize_per_token", "quantize_static",
           "quantize_weight", "unpack_int4", *_LAZY]
