# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Hugging Face checkpoints in and out
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/lcjax/blob/main/notebooks/03_convert_hf.ipynb)
#
# Build a tiny random `transformers` LongcatFlashForCausalLM, save it with `save_pretrained`,
# load it with `lcjax.convert.load_hf_checkpoint` and compare the logits of both frameworks on
# the same tokens; then write it back to the Hub layout with `save_hf_checkpoint`.

# %%
# Install lcjax unless it is importable already (a local checkout, CI). A clone, not a wheel:
# the YAML presets in configs/ live beside the package. jax gets the extra of this runtime.
import glob, importlib.util, os, shutil, subprocess, sys

if importlib.util.find_spec("lcjax") is None:
    jax_pkg = ("jax[cuda12]" if shutil.which("nvidia-smi") else
               "jax[tpu]" if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") else "jax")
    subprocess.run(["git", "clone", "-q", "--depth", "1", "https://github.com/OWNER/lcjax"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "lcjax", jax_pkg,
                    "matplotlib", "transformers>=4.57", "torch", "safetensors"], check=True)
    sys.path.insert(0, os.path.abspath("lcjax"))
SMOKE = os.environ.get("LCJAX_NOTEBOOK_SMOKE") == "1"  # CI: fewer steps, same code

# %% [markdown]
# ## A tiny random transformers model
# LongcatFlash is in transformers ≥ 5; with an older release this notebook says so and stops.

# %%
import pathlib
import tempfile

import numpy as np
import torch

try:
    from transformers import LongcatFlashConfig, LongcatFlashForCausalLM
except ImportError:
    import transformers
    LongcatFlashConfig = None
    print(f"transformers {transformers.__version__} has no LongcatFlash: skipping this notebook")

if LongcatFlashConfig is not None:
    hf_config = LongcatFlashConfig(
        vocab_size=99, hidden_size=64, ffn_hidden_size=96, expert_ffn_hidden_size=32, num_layers=2,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=4, head_dim=4, v_head_dim=8, n_routed_experts=4,
        zero_expert_num=2, moe_topk=2, routed_scaling_factor=6.0, max_position_embeddings=128,
        rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    hf_config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf_model = LongcatFlashForCausalLM(hf_config).eval()
    with torch.no_grad():  # make what the init leaves trivial (norms, router bias) random
        for name, p in hf_model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
        for layer in hf_model.model.layers:
            layer.mlp.router.e_score_correction_bias.normal_(0.0, 0.1)
    workdir = pathlib.Path(tempfile.mkdtemp())
    hf_model.save_pretrained(workdir / "hf", max_shard_size="100KB")
    print(sorted(p.name for p in (workdir / "hf").iterdir())[:6], "...")

# %% [markdown]
# ## Convert and compare logits
# `load_hf_checkpoint` derives the lcjax config from `config.json` and streams the tensors one at
# a time into the lcjax parameter tree (routed experts stacked, zero experts dropped).

# %%
if LongcatFlashConfig is not None:
    import jax
    import jax.numpy as jnp

    import lcjax
    from lcjax.convert import load_hf_checkpoint

    config, variables = load_hf_checkpoint(workdir / "hf")
    m = config.model
    print(f"lcjax config: {m.num_layers} layers, width {m.hidden_size}, "
          f"{m.moe.num_experts} routed + {m.moe.num_zero_experts} zero experts, top-{m.moe.top_k}")
    ids = np.random.default_rng(0).integers(3, hf_config.vocab_size, (2, 24))
    with torch.no_grad():
        hf_logits = hf_model(torch.as_tensor(ids)).logits.numpy()
    with jax.default_matmul_precision("highest"):  # TPUs and GPUs round float32 matmuls by default
        jax_logits = np.asarray(lcjax.LongCatModel(config).apply(variables, jnp.asarray(ids)))
    diff = np.abs(jax_logits - hf_logits).max()
    print(f"logits {jax_logits.shape}: max |lcjax - transformers| = {diff:.2e}")
    print("same greedy next tokens:", (jax_logits.argmax(-1) == hf_logits.argmax(-1)).mean() * 100, "%")
    assert diff < 1e-4, diff

# %% [markdown]
# ## And back
# `save_hf_checkpoint` writes the Hub layout that `from_pretrained` loads.

# %%
if LongcatFlashConfig is not None:
    from lcjax.convert import save_hf_checkpoint

    save_hf_checkpoint(variables, config, workdir / "back")
    reloaded = LongcatFlashForCausalLM.from_pretrained(workdir / "back", attn_implementation="eager").eval()
    with torch.no_grad():
        back_logits = reloaded(torch.as_tensor(ids)).logits.numpy()
    print(f"transformers -> lcjax -> transformers: max |logits diff| = {np.abs(back_logits - hf_logits).max():.2e}")
