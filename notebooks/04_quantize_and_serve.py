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
# # Quantize and serve
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/lcjax/blob/main/notebooks/04_quantize_and_serve.ipynb)
#
# Train the tiny model briefly, quantize it with a few `lcjax.quant` recipes, compare held-out
# perplexity per recipe, then serve a quantized model with the OpenAI-compatible server
# (`python -m lcjax.serve`) and query it with the `openai` client.

# %%
# Install lcjax unless it is importable already (a local checkout, CI). A clone, not a wheel:
# the YAML presets in configs/ live beside the package. jax gets the extra of this runtime.
import glob, importlib.util, os, shutil, subprocess, sys

if importlib.util.find_spec("lcjax") is None:
    jax_pkg = ("jax[cuda12]" if shutil.which("nvidia-smi") else
               "jax[tpu]" if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") else "jax")
    subprocess.run(["git", "clone", "-q", "--depth", "1", "https://github.com/OWNER/lcjax"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "lcjax", jax_pkg,
                    "matplotlib", "openai"], check=True)
    sys.path.insert(0, os.path.abspath("lcjax"))
SMOKE = os.environ.get("LCJAX_NOTEBOOK_SMOKE") == "1"  # CI: fewer steps, same code

# %% [markdown]
# ## A briefly trained tiny model
# Quantization error is only meaningful on a model that has learned something, so train the
# tiny preset for a few steps on a generated corpus (see `02_train_tiny` for the details).

# %%
import pathlib
import tempfile

from lcjax.config_io import load_config, resolve_config_path
from lcjax.train.loop import train

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
         "rho sigma tau upsilon phi chi psi omega def return class import yield lambda").split()
workdir = pathlib.Path(tempfile.mkdtemp())
(workdir / "corpus").mkdir()
for i in range(60):
    words = [WORDS[(i * 7 + j * j) % len(WORDS)] for j in range(40 + i % 17)]
    (workdir / "corpus" / f"doc{i:03d}.txt").write_text(" ".join(words) + "\n")
steps = 20 if SMOKE else 200
run_dir = workdir / "run"
train(load_config(resolve_config_path("tiny"), [
    "data.source=text", f"data.path={workdir / 'corpus'}/*.txt", "data.seq_len=32",
    "data.global_batch=4", "data.heldout_fraction=0.1", "model.vocab_size=320",
    "model.num_layers=1", "model.loza.layer_pattern=01", f"train.run_dir={run_dir}",
    f"train.steps={steps}", f"train.checkpoint_every={steps}", "train.eval_every=0",
    "train.eval_batches=4", f"train.log_every={steps}", "optimizer.warmup_steps=5"]))

# %% [markdown]
# ## Perplexity per recipe
# Each recipe quantizes the MLA projections and the dense and expert FFNs (router, norms,
# embeddings and lm_head stay float). The tiny model's contraction dims (48, 64, 16, ...) need a
# group size of 8. Calibration uses training batches; perplexity uses the held-out split, as
# `scripts/eval_quant.py` does.

# %%
import math

import jax
import jax.numpy as jnp

from lcjax.model import LongCatModel
from lcjax.quant import quantize_model
from lcjax.serve.loading import load_run
from lcjax.train import data_setup

config, variables, tokenizer = load_run(run_dir)
eval_batches = [{k: jnp.asarray(v) for k, v in b.items()}
                for b in data_setup.eval_batches(config, tokenizer)]
iterator = data_setup.train_iterator(config, tokenizer)
calib = [next(iterator) for _ in range(2)]


@jax.jit
def nll(variables, batch):
    logits = LongCatModel(config).apply(variables, batch["inputs"], batch["segment_ids"],
                                        batch["positions"]).astype(jnp.float32)
    target = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    mask = batch["loss_mask"]
    return jnp.sum((jax.nn.logsumexp(logits, -1) - target) * mask), jnp.sum(mask)


def perplexity(variables) -> float:
    sums = [nll(variables, b) for b in eval_batches]
    return math.exp(sum(float(s) for s, _ in sums) / sum(float(n) for _, n in sums))


recipes = ["w8a8", "fptq_w4a8:group_size=8", "w4a16:group_size=8", "naive_w4a8:group_size=8"]
ppl = {"float32": perplexity(variables)}
for recipe in recipes:
    ppl[recipe] = perplexity(quantize_model(variables, config, recipe, calib))
for name, value in ppl.items():
    print(f"{name:<26} held-out perplexity {value:8.3f}")

# %%
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(7, 3))
ax.bar([n.split(":")[0] for n in ppl], list(ppl.values()), color=["grey"] + ["C0"] * len(recipes))
ax.set(ylabel="held-out perplexity", title="tiny model: perplexity per quantization recipe")
ax.set_ylim(min(ppl.values()) * 0.95, max(ppl.values()) * 1.02)
plt.show()

# %% [markdown]
# ## Serve it
# `python -m lcjax.serve --checkpoint RUN_DIR --quant RECIPE` quantizes at load time (calibrating
# on the run's training data) and serves `/v1/completions`, `/v1/chat/completions` and more.
# `--port 0` takes a free port; the server prints its URL, then `lcjax.serve: ready`.

# %%
import re
import subprocess
import sys

server = subprocess.Popen(
    [sys.executable, "-m", "lcjax.serve", "--checkpoint", str(run_dir), "--quant", "fptq_w4a8:group_size=8",
     "--port", "0", "--max-num-seqs", "2", "--max-model-len", "128", "--prefill-chunk", "16",
     "--served-model-name", "tiny-w4a8", "--log-level", "warning"],
    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
log = []
for line in server.stdout:
    log.append(line)
    if line.strip() == "lcjax.serve: ready" or server.poll() is not None:
        break
assert log and log[-1].strip() == "lcjax.serve: ready", "".join(log)
base_url = re.search(r"at (http://\S+/v1)", "".join(log)).group(1)
print("".join(log))

# %%
import openai

client = openai.OpenAI(base_url=base_url, api_key="none")
print([m.id for m in client.models.list()])
completion = client.completions.create(model="tiny-w4a8", prompt="alpha beta", max_tokens=16,
                                       temperature=0)
print(repr(completion.choices[0].text), completion.usage)
stream = client.chat.completions.create(model="tiny-w4a8", max_tokens=12, stream=True,
                                        messages=[{"role": "user", "content": "gamma delta"}])
print("".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices))

# %%
server.terminate()  # Ctrl-C / SIGTERM drains running requests and exits
print(server.communicate(timeout=60)[0][-200:])
