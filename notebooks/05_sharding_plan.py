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
# # Sharding LongCat-Flash on 256 chips
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/lcjax/blob/main/notebooks/05_sharding_plan.ipynb)
#
# How `lcjax.parallel` would lay out the 560B-parameter LongCat-Flash on a 256-chip mesh,
# computed without a single device: an abstract mesh, the train state from `jax.eval_shape`,
# and the rule table that maps each parameter's logical axis names onto mesh axes.

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
# ## The mesh and the rules
# Three presets from `configs/rules/`: pure FSDP, FSDP × tensor parallel, and the default
# expert × FSDP × tensor parallel. Rules are an ordered list of `[logical_name, mesh_axes]`;
# an axis that does not divide a dimension is dropped for that array.

# %%
import math

import jax
from jax.sharding import PartitionSpec as P

from lcjax.config import MeshConfig
from lcjax.config_io import load_config, resolve_config_path
from lcjax.parallel import abstract_mesh, load_rules, resolve_specs, shard_bytes
from lcjax.train.state import abstract_state, create_optimizer

CHIPS = 256
PLANS = {
    "fsdp": MeshConfig(data=1, fsdp=-1),
    "fsdp_tp": MeshConfig(data=1, fsdp=-1, tensor=8),
    "ep_fsdp_tp": MeshConfig(data=1, fsdp=4, expert=32, tensor=2),
}


def show(axes) -> str:
    """A spec entry as text: '-' replicated, 'fsdp+expert' split over both axes."""
    return "-" if axes is None else axes if isinstance(axes, str) else "+".join(axes)


seen = set()
for name, axes in load_rules("ep_fsdp_tp"):
    print(f"  {name:<12} -> {show(axes):<20} {'(fallback)' if name in seen else ''}")
    seen.add(name)

# %% [markdown]
# ## Per-parameter plan (`ep_fsdp_tp`)
# `abstract_state` gives shapes only (`jax.eval_shape`), so nothing of the 560B is allocated.

# %%
def plan(preset: str):
    config = load_config(resolve_config_path("longcat_flash"), [f"parallel.rules={preset}"])
    sizes = dict(abstract_mesh(PLANS[preset], CHIPS).shape)
    state, logical = abstract_state(config, create_optimizer(config))
    return sizes, state, logical, resolve_specs(state, logical, sizes, load_rules(preset))


sizes, state, logical, specs = plan("ep_fsdp_tp")
rows = jax.tree_util.tree_flatten_with_path(state.params)[0]
names = jax.tree.leaves(logical.params, is_leaf=lambda x: isinstance(x, P))
param_specs = jax.tree.leaves(specs.params, is_leaf=lambda x: isinstance(x, P))
print(f"mesh {sizes}: {len(rows)} parameter arrays, "
      f"{sum(math.prod(leaf.shape) for _, leaf in rows) / 1e9:.1f}B parameters\n")
print(f"| {'parameter':<34} | {'shape':<26} | {'logical axes':<38} | {'mesh axes':<28} |")
print(f"|{'-' * 36}|{'-' * 28}|{'-' * 40}|{'-' * 30}|")
for (path, leaf), axes, spec in zip(rows, names, param_specs):
    key = "/".join(str(getattr(k, "key", k)) for k in path)
    print(f"| {key:<34} | {str(leaf.shape):<26} | {', '.join(map(show, axes)):<38} "
          f"| {', '.join(map(show, spec)):<28} |")

# %% [markdown]
# ## Bytes per chip, per preset
# fp32 parameters plus AdamW's two fp32 moments: the whole `TrainState` one chip holds.

# %%
print(f"| {'rules':<10} | {'mesh (axes of size > 1)':<28} | {'params GB/chip':>14} | {'+ AdamW GB/chip':>15} |")
print(f"|{'-' * 12}|{'-' * 30}|{'-' * 16}|{'-' * 17}|")
for preset in PLANS:
    sizes, state, logical, specs = plan(preset)
    params_gb = shard_bytes(state.params, specs.params, sizes) / 1e9
    state_gb = shard_bytes(state, specs, sizes) / 1e9
    mesh = " x ".join(f"{axis}={n}" for axis, n in sizes.items() if n > 1)
    print(f"| {preset:<10} | {mesh:<28} | {params_gb:>14.1f} | {state_gb:>15.1f} |")
