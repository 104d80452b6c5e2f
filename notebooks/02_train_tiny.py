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
# # Train the tiny model
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/lcjax/blob/main/notebooks/02_train_tiny.ipynb)
#
# A few hundred optimizer steps of the `tiny` preset (MLA, routed + zero experts, hashed n-gram
# embedding, LoZA sparse sublayers and the MTP head all on) on a small generated text corpus,
# with the real trainer `lcjax.train.loop.train`, then the loss curve from `metrics.jsonl`.

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
# ## A generated corpus
# 60 small documents of pseudo-code-like words, one per file; the trainer splits them by file
# into train and held-out sets and trains a byte-level BPE tokenizer on the train split.

# %%
import json
import pathlib
import tempfile

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
         "rho sigma tau upsilon phi chi psi omega def return class import yield lambda").split()
workdir = pathlib.Path(tempfile.mkdtemp())
(workdir / "corpus").mkdir()
for i in range(60):
    words = [WORDS[(i * 7 + j * j) % len(WORDS)] for j in range(40 + i % 17)]
    (workdir / "corpus" / f"doc{i:03d}.txt").write_text(" ".join(words) + "\n")
print((workdir / "corpus" / "doc000.txt").read_text()[:120], "...")

# %% [markdown]
# ## Config and training
# The `tiny` preset trimmed to one logical layer, 32-token rows, 4 rows per step. Everything the
# run writes lands in `train.run_dir`: orbax checkpoints, `config.yaml`, `tokenizer.json`,
# `metrics.jsonl` and TensorBoard events. Running the cell again resumes from the checkpoint.

# %%
from lcjax.config_io import load_config, resolve_config_path
from lcjax.train.loop import train

steps = 30 if SMOKE else 300
run_dir = workdir / "run"
config = load_config(resolve_config_path("tiny"), [
    "data.source=text", f"data.path={workdir / 'corpus'}/*.txt", "data.seq_len=32",
    "data.global_batch=4", "data.heldout_fraction=0.1", "model.vocab_size=320",
    "model.num_layers=1", "model.loza.layer_pattern=01", f"train.run_dir={run_dir}",
    f"train.steps={steps}", f"train.checkpoint_every={steps}", f"train.eval_every={steps // 3}",
    "train.eval_batches=2", f"train.log_every={max(1, steps // 10)}", "optimizer.warmup_steps=5"])
summary = train(config)
print(f"held-out loss {summary.initial_eval_loss:.3f} -> {summary.final_eval_loss:.3f}")

# %% [markdown]
# ## The loss curve
# One JSON object per line of `metrics.jsonl`: `train/*` at every step, `eval/loss` every
# `train.eval_every` steps.

# %%
import matplotlib.pyplot as plt

records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
train_rows = [r for r in records if "train/loss" in r]
eval_rows = [r for r in records if "eval/loss" in r]
fig, ax = plt.subplots(figsize=(7, 3.5))
ax.plot([r["step"] for r in train_rows], [r["train/ce"] for r in train_rows], label="train CE")
ax.plot([r["step"] for r in eval_rows], [r["eval/loss"] for r in eval_rows], "o-", label="held-out loss")
ax.set(xlabel="step", ylabel="nats / token", title="tiny on the generated corpus")
ax.legend()
plt.show()
print(sorted(p.name for p in run_dir.iterdir()))
