"""LoRA and AFA-LoRA fine-tuning: adapters on frozen weights, the annealed activation, merging.

- adapters: which weights get adapters (lora.targets), init (B = 0), the "lora" collection
- afa: the AFA coefficient schedule lam(t)
- merge: fold W + (alpha / r) * B A into the base (`merge`, `merged_variables`), and
  `python -m lcjax.lora merge RUN OUT`
"""

from lcjax.lazy import lazy_getattr

_LAZY = {
    "init_adapters": "lcjax.lora.adapters",
    "attach": "lcjax.lora.adapters",
    "target_sites": "lcjax.lora.adapters",
    "afa_lambda": "lcjax.lora.afa",
    "merge": "lcjax.lora.merge",
    "merge_adapters": "lcjax.lora.merge",
    "merged_variables": "lcjax.lora.merge",
    "load_lora_run": "lcjax.lora.merge",
    "load_merged_run": "lcjax.lora.merge",
}
__getattr__ = lazy_getattr(__name__, _LAZY)

__all__ = list(_LAZY)
