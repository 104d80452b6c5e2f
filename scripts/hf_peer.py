"""The transformers peer for the benchmark scripts: lcjax variables loaded into
`LongcatFlashForCausalLM`, whichever expert layout the installed transformers expects."""

from __future__ import annotations

import tempfile


def load_transformers_model(variables, config, *, dtype: str, attn_implementation: str,
                            device: str, **kwargs):
    """Write `variables` with `lcjax.convert.save_hf_checkpoint` and load them in transformers.

    Whether transformers allocates its fused gate_up_proj for the zero experts too differs
    between versions: the Hub layout (routed experts only) is tried first, then the zero-expert
    stubs. kwargs go to `from_pretrained` (e.g. experts_implementation).
    """
    import torch
    import transformers
    from transformers import LongcatFlashForCausalLM

    from lcjax.convert import save_hf_checkpoint

    transformers.utils.logging.disable_progress_bar()
    for stubs in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            save_hf_checkpoint(variables, config, tmp, overwrite=True, zero_expert_stubs=stubs)
            try:
                model = LongcatFlashForCausalLM.from_pretrained(
                    tmp, dtype=getattr(torch, dtype), attn_implementation=attn_implementation,
                    **kwargs)
            except RuntimeError as e:  # transformers' size-mismatch report
                if stubs:
                    raise
                print(f"transformers refused the Hub expert layout ({str(e)[:80]}...); retrying "
                      "with zero-expert stubs", flush=True)
                continue
            return model.to(device)
    raise AssertionError("unreachable")
