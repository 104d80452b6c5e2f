"""Quantized tensor-parallel communication (Flash Communication) inside the model, 8 devices.

The tiny model is trained briefly (exact comm), then evaluated and differentiated on a
data=2 x tensor=4 mesh with exact and quantized TP all-reduces of o_proj and down_proj.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax.linen as nn

from lcjax.config import ParallelConfig
from lcjax.model import LongCatModel
from lcjax.parallel import logical_shardings, use_parallelism
from lcjax.train import loop

from .conftest import mesh_of
from tests.train.conftest import train_config, write_corpus

MODES = ("none", "int8", "int6", "int4")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny model trained 25 steps; returns (corpus glob, run dir)."""
    root = tmp_path_factory.mktemp("tp")
    corpus, run = write_corpus(root), root / "run"
    loop.train(_config(corpus, run, "none"))  # exact TP comm on the data=2 x tensor=4 mesh
    return corpus, run


def _config(corpus, run, mode, *extra):
    return train_config(corpus, run, "train.steps=25", "train.checkpoint_every=25", "mesh.data=2",
                        "mesh.tensor=4", "train.eval_batches=2", "optimizer.warmup_steps=5",
                        f"parallel.quantized_tp_comm={mode}", *extra)


def test_held_out_loss_with_quantized_tp_comm(trained):
    losses = {}
    for mode in MODES:
        summary = loop.train(_config(*trained, mode))  # resumes at the last step: eval only
        assert summary.start_step == summary.final_step == 25
        losses[mode] = summary.final_eval_loss
    rel = {m: abs(losses[m] - losses["none"]) / losses["none"] for m in MODES}
    print("held-out loss per TP comm mode:", json.dumps(losses), "relative:", json.dumps(rel))
    assert losses["none"] < 5.0  # trained: well below ln(320) = 5.77
    assert rel["int8"] < 0.01  # the bound
    assert rel["int6"] < 0.05 and rel["int4"] < 0.10
    assert rel["int8"] > 0  # the quantized path ran (a bit-identical loss would mean it did not)


def test_row_parallel_projections_reduce_quantized_with_exact_gradients():
    """int8 TP comm: u8 all-to-all + all-gather replace the f32 all-reduces of o/down projections;
    the backward is exact psum's (straight-through), so gradients stay close to exact comm's."""
    cfg = train_config("unused", "unused").model
    ids = jax.random.randint(jax.random.key(0), (4, 32), 3, cfg.vocab_size)
    boxed = jax.eval_shape(LongCatModel(cfg).init, jax.random.key(1), ids)
    variables = nn.unbox(jax.jit(LongCatModel(cfg).init)(jax.random.key(1), ids))
    mesh = mesh_of(data=2, tensor=4)
    shardings = logical_shardings(nn.get_partition_spec(boxed["params"]), mesh,
                                  abstract=nn.unbox(boxed["params"]))
    params = jax.device_put(variables["params"], shardings)

    def loss(params, ids):
        logits = LongCatModel(cfg).apply({**variables, "params": params}, ids)
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))

    out = {}
    for mode in ("none", "int8"):
        with use_parallelism(mesh, ParallelConfig(quantized_tp_comm=mode)):
            fn = jax.jit(jax.value_and_grad(loss))
            out[mode] = fn(params, ids), fn.lower(params, ids).compile().as_text()
    (l_exact, g_exact), hlo_exact = out["none"]
    (l_q, g_q), hlo_q = out["int8"]
    assert "all-to-all" not in hlo_exact and "all-reduce" in hlo_exact
    assert any("all-to-all" in line and "u8[" in line for line in hlo_q.splitlines())
    assert any("all-gather" in line and "u8[" in line for line in hlo_q.splitlines())
    np.testing.assert_allclose(l_q, l_exact, rtol=1e-3)
    rel = [float(jnp.linalg.norm(a - b) / (jnp.linalg.norm(b) + 1e-12))
           for a, b in zip(jax.tree.leaves(g_q), jax.tree.leaves(g_exact))]
    assert max(rel) < 0.02, rel  # per-leaf relative L2 of the gradient
