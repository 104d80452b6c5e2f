"""A printed model summary: parameter counts by module and one timed forward pass.

What `python -m lcjax.train` shows until the training loop lands: it proves the install, the
config and the model end to end on CPU in seconds.
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lcjax.config import Config
from lcjax.model import BIAS_COLLECTION, LongCatModel
from lcjax.params_count import count_params


def _rows_by_module(params: dict) -> list[tuple[str, int]]:
    """Parameter count per top-level module of the param tree."""
    return [(name, sum(int(np.prod(x.shape)) for x in jax.tree.leaves(sub)))
            for name, sub in params.items()]


def forward_summary(config: Config, batch: int = 2, seq: int = 64) -> str:
    """Initialise the model, run one forward on random tokens, return a text table."""
    cfg = config.model
    seq = min(seq, cfg.max_position_embeddings)
    key_init, key_data = jax.random.split(jax.random.key(config.runtime.seed))
    tokens = jax.random.randint(key_data, (batch, seq + 1), 0, cfg.vocab_size, jnp.int32)
    model = LongCatModel(cfg)
    variables = nn.unbox(jax.jit(model.init)(key_init, tokens[:, :-1]))
    apply = jax.jit(lambda v, x: model.apply(v, x, return_aux=True))
    start = time.perf_counter()
    logits, aux = jax.block_until_ready(apply(variables, tokens[:, :-1]))
    compile_and_run = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(apply(variables, tokens[:, :-1]))
    run = time.perf_counter() - start
    logp = jax.nn.log_softmax(logits, axis=-1)
    loss = -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    counts = count_params(cfg)
    lines = [f"{'module':<24}{'parameters':>16}", "-" * 40]
    for name, n in _rows_by_module(variables["params"]):
        lines.append(f"{name:<24}{n:>16,}")
    total = sum(n for _, n in _rows_by_module(variables["params"]))
    lines += ["-" * 40, f"{'total (incl. MTP)':<24}{total:>16,}",
              f"{'router_bias entries':<24}{sum(x.size for x in jax.tree.leaves(variables[BIAS_COLLECTION])):>16,}",
              "", counts.table(), "",
              f"forward: batch {batch} x seq {seq} on {jax.devices()[0].platform}",
              f"  logits {tuple(logits.shape)} {logits.dtype}, finite={bool(jnp.all(jnp.isfinite(logits)))}",
              f"  loss at init {float(loss):.4f} (ln V = {np.log(cfg.vocab_size):.4f})",
              f"  zero-expert share per layer {np.round(np.asarray(aux.routing.zero_share), 3).tolist()}",
              f"  first call (compile + run) {compile_and_run:.2f}s, second call {run * 1e3:.1f} ms"]
    return "\n".join(lines)
