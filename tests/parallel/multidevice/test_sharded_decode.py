"""jit in/out shardings for params and the KV cache: sharded prefill + decode == one device."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import lcjax
from lcjax.config_io import load_config, resolve_config_path
from lcjax.model import LongCatModel
from lcjax.parallel import cache_shardings, logical_shardings, use_parallelism

from .conftest import mesh_of


def test_sharded_prefill_and_decode_match_one_device():
    cfg = load_config(resolve_config_path("tiny"), []).model
    ids = jax.random.randint(jax.random.key(0), (4, 20), 3, cfg.vocab_size)
    lengths = jnp.array([20, 13, 7, 16])
    boxed = jax.eval_shape(LongCatModel(cfg).init, jax.random.key(1), ids)
    variables = nn.unbox(jax.jit(LongCatModel(cfg).init)(jax.random.key(1), ids))
    prefill = lambda v, i, n: lcjax.prefill(cfg, v, i, n, max_len=48)  # noqa: E731
    step = lambda v, c, t: lcjax.decode_step(cfg, v, c, t)  # noqa: E731
    want_logits, want_cache = jax.jit(prefill)(variables, ids, lengths)
    tokens = jnp.argmax(want_logits[jnp.arange(4), lengths - 1], -1)[:, None]
    want_step, _ = jax.jit(step)(variables, want_cache, tokens)

    mesh = mesh_of(data=2, fsdp=2, tensor=2)
    with use_parallelism(mesh):
        param_sh = logical_shardings(nn.get_partition_spec(boxed["params"]), mesh,
                                     abstract=nn.unbox(boxed["params"]))
        var_sh = {"params": param_sh, "router_bias": jax.tree.map(
            lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), variables["router_bias"])}
        cache_sh = cache_shardings(jax.eval_shape(prefill, variables, ids, lengths)[1], mesh)
        sharded_vars = jax.device_put(variables, var_sh)
        logits, cache = jax.jit(prefill, out_shardings=(None, cache_sh))(sharded_vars, ids, lengths)
        got_step, new_cache = jax.jit(step, in_shardings=(var_sh, cache_sh, None),
                                      out_shardings=(None, cache_sh))(sharded_vars, cache, tokens)
    latent = cache.layers[0].latent
    assert latent.sharding.spec[0] == ("data", "fsdp") and latent.sharding.spec[1:] == (None, None)
    assert new_cache.layers[1].latent.sharding == cache_sh.layers[1].latent
    assert sharded_vars["params"]["lm_head"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    np.testing.assert_allclose(logits, want_logits, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(got_step, want_step, atol=2e-5, rtol=2e-5)
