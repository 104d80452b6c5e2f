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
# # A tour of lcjax
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/lcjax/blob/main/notebooks/01_tour.ipynb)
#
# Config presets and their parameter counts, one forward pass of the `tiny` model, cached greedy
# generation checked against the full forward, and a look at the router: the share of top-k
# slots each layer sends to zero-computation experts.

# %%
# Install lcjax unless it is importable already (a local checkout, CI). A clone, not a wheel:
# the YAML presets in configs/ live beside the package. jax gets the extra of this runtime.
import glob, importlib.util, os, shutil, subprocess, sys

if importlib.util.find_spec("lcjax") is None:
    jax_pkg = ("jax[cuda12]" if shutil.which("nvidia-smi") else
               "jax[tpu]" if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") else "jax")
    subprocess.run(["git", "clone", "-q", "--depth", "1", "https://github.com/OWNER/lcjax"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "lcjax", jax_pkg,
                    "matplotlib"], check=True)
    sys.path.insert(0, os.path.abspath("lcjax"))
SMOKE = os.environ.get("LCJAX_NOTEBOOK_SMOKE") == "1"  # CI: fewer steps, same code

# %% [markdown]
# ## Config presets
# A preset is a YAML file of overrides on the dataclass defaults in `lcjax/config.py`;
# `resolve_config_path` turns a bare name into `configs/models/NAME.yaml`, and dotted
# `key=value` overrides go last.

# %%
import jax
import jax.numpy as jnp
import numpy as np

import lcjax
from lcjax.config_io import PRESET_DIR, load_config, resolve_config_path

# The checks below compare two computations exactly; TPUs and GPUs round float32 matmuls by default.
jax.config.update("jax_default_matmul_precision", "highest")

print("presets:", sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
config = load_config(resolve_config_path("tiny"), ["model.num_layers=4",
                                                   "model.loza.layer_pattern=01100110"])
m = config.model
print(f"tiny: {m.num_layers} layers, width {m.hidden_size}, {m.moe.num_experts} routed + "
      f"{m.moe.num_zero_experts} zero experts, top-{m.moe.top_k}, vocab {m.vocab_size}")

# %% [markdown]
# ## Parameter counts
# Closed-form counts from the config shapes (`lcjax/params_count.py`); *activated* is what one
# token touches: min = every top-k slot on a zero expert, max = every slot on a routed expert.

# %%
for name in ("longcat_flash", "longcat_flash_lite", "tiny"):
    print(f"== {name}")
    print(lcjax.count_params(load_config(resolve_config_path(name))).table(), "\n")

# %% [markdown]
# ## A forward pass
# `init` returns two collections: trainable `params` and the router's correction biases
# (`router_bias`, updated outside the optimizer). `return_aux=True` adds routing statistics.

# %%
model = lcjax.LongCatModel(config)
ids = jax.random.randint(jax.random.key(1), (2, 48), 3, m.vocab_size)
variables = model.init(jax.random.key(0), ids)
logits, aux = model.apply(variables, ids, return_aux=True)
n_params = sum(x.size for x in jax.tree.leaves(variables["params"]))
print("logits", logits.shape, logits.dtype, "| params in the tree:", f"{n_params:,}")

# %% [markdown]
# ## Cached generation
# `prefill` fills the MLA latent cache with right-padded prompts of different lengths;
# `decode_step` appends one token per row. Greedy tokens must equal the argmax of a full
# forward pass over the prompt and the generated tokens.

# %%
prompt_len, new_tokens = 16, 8
lengths = jnp.array([prompt_len, prompt_len])
prefill = jax.jit(lcjax.prefill, static_argnums=(0, 4))
step = jax.jit(lcjax.decode_step, static_argnums=0)
step_logits, cache = prefill(config, variables, ids[:, :prompt_len], lengths, prompt_len + new_tokens)
tokens = [jnp.argmax(step_logits[:, prompt_len - 1], -1)]
for _ in range(new_tokens - 1):
    step_logits, cache = step(config, variables, cache, tokens[-1][:, None])
    tokens.append(jnp.argmax(step_logits[:, -1], -1))
cached = jnp.stack(tokens, axis=1)

# One forward over prompt + generated tokens: its argmax at each position is the next token.
full = model.apply(variables, jnp.concatenate([ids[:, :prompt_len], cached], axis=1))
teacher_forced = jnp.argmax(full[:, prompt_len - 1:-1], -1)
print("cached decode:", cached.tolist())
print("full forward: ", teacher_forced.tolist())
assert (cached == teacher_forced).all()

# %% [markdown]
# ## Routing: zero-expert share per layer
# Each token picks top-k of routed + zero experts; a zero expert returns its input (identity)
# at no FLOPs, so the share of slots routed to zero experts is compute saved. At random init
# it is near the zero experts' share of the pool; training (and the correction biases) move it.

# %%
import matplotlib.pyplot as plt

zero_share = np.asarray(aux.routing.zero_share)  # [L]
counts = np.asarray(aux.routing.tokens_per_expert)  # [L, E + Z]
print("zero share per layer:", np.round(zero_share, 3),
      "| pool share of zero experts:", m.moe.num_zero_experts / (m.moe.num_experts + m.moe.num_zero_experts))
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3))
ax0.bar(range(len(zero_share)), zero_share)
ax0.set(xlabel="layer", ylabel="zero-expert share of top-k slots", title="zero-expert share")
ax1.imshow(counts, aspect="auto", cmap="viridis")
ax1.axvline(m.moe.num_experts - 0.5, color="w", ls="--")
ax1.set(xlabel="expert (right of the line: zero experts)", ylabel="layer", title="tokens per expert")
plt.tight_layout()
plt.show()
