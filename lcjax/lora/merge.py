"""Fold trained adapters into the base weights: W' = W + (alpha / r) * B A, a plain model again.

Exact only where the adapter is linear, i.e. where the AFA coefficient lam is 0 (plain LoRA, or
an AFA-LoRA run annealed to the end); `merge` refuses a run saved at a step where lam != 0.

    python -m lcjax.lora merge RUN OUT     # RUN: a LoRA training run; OUT: a normal run directory

OUT holds config.yaml (lora off), tokenizer.json and checkpoints/<step>/ with the merged params
and the run's router biases, the layout `python -m lcjax.serve --checkpoint OUT`,
`lcjax.serve.loading.load_run` and `python -m lcjax.convert` read. `load_unmerged_run` keeps base
and adapters apart (what `python -m lcjax.serve --lora RUN` serves).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import string
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lcjax.config import Config, LoraConfig
from lcjax.config_io import dump_config, load_config
from lcjax.lora.adapters import abstract_adapters, attach, sites_of
from lcjax.lora.afa import afa_lambda_at
from lcjax.run_checkpoint import restore_newest

RUN_CONFIG, TOKENIZER_FILE = "config.yaml", "tokenizer.json"


def merge_adapters(params: Any, adapters: Any, lora: LoraConfig) -> Any:
    """`params` with every adapted weight W replaced by W + scale * B A (float32 sum, cast back
    to W's dtype). Adapters [lead..., K..., r] / [lead..., r, N...] match W [lead..., K..., N...]."""
    flat = sites_of(adapters)

    def fold(path, w):
        key = tuple(str(getattr(k, "key", k)) for k in path)
        if key not in flat:
            return w
        a, b = (jnp.asarray(flat[key][n], jnp.float32) for n in ("a", "b"))
        lead = a.ndim + b.ndim - 2 - w.ndim  # dims A and B share with W: layer, expert
        letters = string.ascii_uppercase
        shared, k = letters[:lead], letters[lead:a.ndim - 1]
        n = letters[a.ndim - 1:a.ndim - 1 + b.ndim - 1 - lead]
        delta = jnp.einsum(f"{shared}{k}z,{shared}z{n}->{shared}{k}{n}", a, b)
        return (jnp.asarray(w, jnp.float32) + lora.scale * delta).astype(w.dtype)

    return jax.tree_util.tree_map_with_path(fold, params)


def merged_variables(config: Config, variables: dict, adapters: Any, step: int) -> dict:
    """`variables` ({"params", "router_bias"}) with the adapters folded in; ValueError when the
    AFA coefficient at `step` is not 0 (the adapter is not linear there)."""
    check_mergeable(config, step)
    return {**variables, "params": merge_adapters(variables["params"], adapters, config.lora)}


def check_mergeable(config: Config, step: int, where: str = "the run") -> None:
    lam = afa_lambda_at(step, config.lora, config.train.steps)
    if lam != 0.0:
        raise ValueError(
            f"{where} is saved at step {step}, where the AFA coefficient lam = {lam:.6g} "
            f"(lora.afa.activation={config.lora.afa.activation!r}, schedule "
            f"{config.lora.afa.schedule!r}, start_fraction={config.lora.afa.start_fraction}, "
            f"anneal_fraction={config.lora.afa.anneal_fraction} of train.steps="
            f"{config.train.steps}): merging is exact only at lam = 0; train on until lam "
            "reaches 0, then merge")


def load_lora_run(run_dir: str | os.PathLike) -> tuple[Config, dict, Any, int, Any]:
    """(Config, {"params", "router_bias"}, adapters, step, Tokenizer) of a LoRA run's newest
    checkpoint, as host arrays. ValueError when `run_dir` is not a finished LoRA run."""
    from lcjax.data.tokenizer import Tokenizer
    from lcjax.model import BIAS_COLLECTION, LongCatModel

    run_dir = pathlib.Path(run_dir).absolute()
    for name in (RUN_CONFIG, TOKENIZER_FILE):
        if not (run_dir / name).is_file():
            raise ValueError(f"{run_dir} is not a training run directory: {name} is missing")
    config = load_config(run_dir / RUN_CONFIG)
    if not config.lora.enabled:
        raise ValueError(f"{run_dir} is not a LoRA run (its config has lora.rank=0): nothing to merge")
    tokenizer = Tokenizer.from_json((run_dir / TOKENIZER_FILE).read_text())
    boxed = jax.eval_shape(LongCatModel(config.model).init, jax.random.key(0),
                           jnp.zeros((1, 8), jnp.int32))
    params = nn.unbox(boxed["params"])
    abstract = {"params": params, "router_bias": nn.unbox(boxed[BIAS_COLLECTION]),
                "lora": abstract_adapters(params, config.lora, config.model.scan_layers)}
    state, step = restore_newest(run_dir, abstract)
    variables = {"params": state["params"], "router_bias": state["router_bias"]}
    return config, variables, state["lora"], step, tokenizer


def merge(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> pathlib.Path:
    """Merge the newest checkpoint of LoRA run `run_dir` into a normal run directory `out_dir`
    (which must not exist yet). Returns the path of the written checkpoint step."""
    out = pathlib.Path(out_dir).absolute()
    if out.exists():
        raise ValueError(f"{out} exists: merge writes a new run directory; remove it or pick another")
    config, variables, adapters, step, _ = load_lora_run(run_dir)
    check_mergeable(config, step, where=f"{pathlib.Path(run_dir).absolute()}")
    params = merge_adapters(variables["params"], adapters, config.lora)
    tmp = out.with_name(f".{out.name}.merge-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dump_config(dataclasses.replace(config, lora=LoraConfig()), tmp / RUN_CONFIG)
    shutil.copyfile(pathlib.Path(run_dir) / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
    # The training checkpoint layout (lcjax.train.checkpoint): checkpoints/<step>/{state, data}.
    state = {"step": np.asarray(step, np.int32), "params": params,
             "router_bias": variables["router_bias"], "rng": np.zeros((2,), np.uint32)}
    manager = ocp.CheckpointManager(tmp / "checkpoints", item_names=("state", "data"),
                                    options=ocp.CheckpointManagerOptions(create=True))
    try:
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data=ocp.args.JsonSave({})))
        manager.wait_until_finished()
    finally:
        manager.close()
    os.replace(tmp, out)
    return out / "checkpoints" / str(step)


def load_merged_run(run_dir: str | os.PathLike) -> tuple[Config, dict, Any]:
    """(Config with lora off, {"params", BIAS_COLLECTION} merged, Tokenizer) of a LoRA run's newest
    checkpoint: what `lcjax.serve.loading.load_run` returns for a plain run, the merged model
    in memory without writing it. ValueError when lam != 0 at that step."""
    config, variables, adapters, step, tokenizer = load_lora_run(run_dir)
    check_mergeable(config, step, where=str(pathlib.Path(run_dir).absolute()))
    from lcjax.model import BIAS_COLLECTION

    merged = {"params": merge_adapters(variables["params"], adapters, config.lora),
              BIAS_COLLECTION: variables["router_bias"]}
    return dataclasses.replace(config, lora=LoraConfig()), merged, tokenizer


def load_unmerged_run(run_dir: str | os.PathLike) -> tuple[Config, dict, Any, float]:
    """(Config, {"params", BIAS_COLLECTION, LORA_COLLECTION}, Tokenizer, lam) of a LoRA run's
    newest checkpoint: the frozen base and its adapters kept apart, the adapters carrying the
    AFA coefficient lam of the saved step, so any step serves as it was trained (lam != 0
    included, which merging refuses) and the base stays the one shared tree."""
    from lcjax.model import BIAS_COLLECTION
    from lcjax.model.layers import LORA_COLLECTION

    config, variables, adapters, step, tokenizer = load_lora_run(run_dir)
    lam = afa_lambda_at(step, config.lora, config.train.steps)
    return config, {"params": variables["params"], BIAS_COLLECTION: variables["router_bias"],
                    LORA_COLLECTION: attach(adapters, config.lora, lam, config.model.scan_layers)}, \
        tokenizer, lam
