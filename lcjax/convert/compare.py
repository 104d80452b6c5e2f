"""Layer-by-layer comparison of lcjax and transformers on one HF checkpoint (float32, CPU).

What to run when parity breaks: both models see the same random tokens; for every logical layer
and each of its sublayers (attn_0, mlp_0, moe, attn_1, mlp_1) it reports
  * `stream`: max |lcjax - HF| of that output when each framework runs on its own activations
    (errors accumulate), and
  * `local`: the same when the lcjax layer is fed HF's input to that layer (the error this layer
    adds by itself; the first layer with a large `local` is the broken one),
then the final norm and the logits with the KL divergence KL(HF || lcjax) per token.
Needs torch and transformers (the `test` extra).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.convert.hf import load_hf_checkpoint
from lcjax.model.decode import layer_variables, sparse_pair
from lcjax.model.decoder import DecoderLayer
from lcjax.model.embedding import Embedder
from lcjax.model.layers import RMSNorm

_SUBLAYERS = ("attn_0", "mlp_0", "moe", "attn_1", "mlp_1")


@dataclasses.dataclass(frozen=True)
class Row:
    """One compared activation: max abs difference on own / HF inputs, HF's max abs value."""

    name: str
    stream: float
    local: float
    scale: float
    kl_mean: float = float("nan")
    kl_max: float = float("nan")


def _hf_activations(model, ids) -> dict[str, Any]:
    """Outputs of the embedding, every layer and sublayer, the final norm and the logits."""
    import torch

    acts: dict[str, Any] = {}
    hooks = []

    def keep(name, takes_input=False):
        def hook(module, args, output):
            value = args[0] if takes_input else (output[0] if isinstance(output, tuple) else output)
            acts[name] = value.detach().float().numpy()
        return hook

    core = model.model
    hooks.append(core.embed_tokens.register_forward_hook(keep("embed")))
    for l, layer in enumerate(core.layers):
        hooks.append(layer.register_forward_hook(keep(f"layer_{l}_in", takes_input=True)))
        hooks.append(layer.register_forward_hook(keep(f"layer_{l}")))
        for i in range(2):
            hooks.append(layer.self_attn[i].register_forward_hook(keep(f"layer_{l}/attn_{i}")))
            hooks.append(layer.mlps[i].register_forward_hook(keep(f"layer_{l}/mlp_{i}")))
        hooks.append(layer.mlp.register_forward_hook(keep(f"layer_{l}/moe")))
    hooks.append(core.norm.register_forward_hook(keep("final_norm")))
    try:
        with torch.no_grad():
            acts["logits"] = model(torch.as_tensor(ids)).logits.float().numpy()
    finally:
        for h in hooks:
            h.remove()
    return acts


@functools.partial(jax.jit, static_argnums=(0, 4))  # one compile serves every layer
def _run_layer(cfg, layer_vars, x, positions, pair: tuple[bool, bool]):
    """One logical layer on `x`: its output and the outputs of its five sublayers."""
    (out, _), state = DecoderLayer(cfg).apply(layer_vars, x, pair, positions, None, None,
                                              capture_intermediates=True, mutable=["intermediates"])
    inter = state["intermediates"]
    subs = {}
    for name in _SUBLAYERS:
        value = inter[name]["__call__"][0]
        subs[name] = value[0] if isinstance(value, tuple) else value  # MLA / MoE return pairs
    return out, subs


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(softmax(p) || softmax(q)) per token, in float64."""
    lp = p_logits.astype(np.float64) - np.logaddexp.reduce(p_logits.astype(np.float64), -1, keepdims=True)
    lq = q_logits.astype(np.float64) - np.logaddexp.reduce(q_logits.astype(np.float64), -1, keepdims=True)
    return np.sum(np.exp(lp) * (lp - lq), axis=-1)


def _diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def compare_with_transformers(path: Union[str, os.PathLike], *, batch: int = 2, seq_len: int = 32,
                              seed: int = 0) -> list[Row]:
    """Rows of the layer-by-layer comparison of lcjax and `LongcatFlashForCausalLM` on `path`."""
    import torch
    from transformers import LongcatFlashForCausalLM

    config, variables = load_hf_checkpoint(path)
    cfg = dataclasses.replace(config.model, dtype="float32", param_dtype="float32")
    if cfg.ngram.enabled:
        raise ValueError("compare: model_type 'longcat_flash_ngram' has no transformers "
                         "implementation (use the n-gram parity test in tests/convert)")
    if not 1 <= seq_len <= cfg.max_position_embeddings:
        raise ValueError(f"seq_len={seq_len} must be in [1, {cfg.max_position_embeddings}]")
    torch.manual_seed(seed)
    model = LongcatFlashForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq_len))
    hf = _hf_activations(model, ids)

    variables = jax.tree.map(jnp.asarray, variables)
    params = variables["params"]
    positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
    x = np.asarray(Embedder(cfg).apply({"params": params["embed"]}, jnp.asarray(ids, jnp.int32)))
    rows = [Row("embed", _diff(x, hf["embed"]), _diff(x, hf["embed"]),
                float(np.max(np.abs(hf["embed"]))))]
    for l in range(cfg.num_layers):
        lv = layer_variables(variables, l, cfg)
        pair = sparse_pair(cfg, l)
        x, subs = _run_layer(cfg, lv, jnp.asarray(x), positions, pair)
        local_out, local_subs = _run_layer(cfg, lv, jnp.asarray(hf[f"layer_{l}_in"]), positions, pair)
        for name in _SUBLAYERS:
            want = hf[f"layer_{l}/{name}"].reshape(subs[name].shape)
            rows.append(Row(f"layer_{l}/{name}", _diff(subs[name], want),
                            _diff(local_subs[name], want), float(np.max(np.abs(want)))))
        want = hf[f"layer_{l}"]
        rows.append(Row(f"layer_{l}", _diff(x, want), _diff(local_out, want),
                        float(np.max(np.abs(want)))))
    normed = np.asarray(RMSNorm(cfg.rms_norm_eps).apply({"params": params["final_norm"]}, x))
    rows.append(Row("final_norm", _diff(normed, hf["final_norm"]), float("nan"),
                    float(np.max(np.abs(hf["final_norm"])))))
    logits = normed @ np.asarray(params["lm_head"], np.float32)
    x = np.asarray(x)
    kl = _kl(hf["logits"], logits)
    rows.append(Row("logits", _diff(logits, hf["logits"]), float("nan"),
                    float(np.max(np.abs(hf["logits"]))), float(kl.mean()), float(kl.max())))
    return rows


def format_rows(rows: list[Row]) -> str:
    """A fixed-width table, one line per compared activation."""
    lines = [f"{'activation':<16} {'max|diff| stream':>17} {'max|diff| local':>16} "
             f"{'max|HF|':>10} {'KL mean':>10} {'KL max':>10}"]
    for r in rows:
        lines.append(f"{r.name:<16} {r.stream:>17.3e} {r.local:>16.3e} {r.scale:>10.3e} "
                     f"{r.kl_mean:>10.3e} {r.kl_max:>10.3e}")
    return "\n".join(lines)
