"""Host offload: row gathers/scatters on host tables equal device indexing; N-gram tables in
host memory give the same logits as on the device, in the model and in the serve engine."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.ops.host_rows import on_host, set_rows, take_rows
from lcjax.sparsity import host_offload

pytestmark = pytest.mark.skipif(host_offload.host_memory_kind() is None,
                                reason="no pinned_host memory on this device")


def test_take_and_set_rows_on_host_equal_numpy():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(11, 3)).astype(np.float32)
    ids = rng.integers(0, 11, (2, 5))
    host = host_offload.to_host(jnp.asarray(table))
    assert on_host(host) and not on_host(jnp.asarray(table))
    got = jax.jit(lambda t, i: take_rows(t, i) * 1.0)(host, jnp.asarray(ids))
    np.testing.assert_array_equal(got, table[ids])
    assert got.sharding.memory_kind == "device"
    rows = rng.normal(size=(3, 3)).astype(np.float32)
    put = jax.jit(set_rows)(host, jnp.asarray([4, 0, 99]), jnp.asarray(rows))  # 99: dropped
    ref = table.copy()
    ref[[4, 0]] = rows[:2]
    np.testing.assert_array_equal(np.asarray(put), ref)
    assert put.sharding.memory_kind == "pinned_host"


def test_ngram_tables_on_host_give_the_same_logits():
    from lcjax.config_io import load_config, resolve_config_path
    from lcjax.model import LongCatModel
    from lcjax.serve.loading import random_model
    cfg, variables, _ = random_model(load_config(resolve_config_path("tiny")), seed=0)
    moved = host_offload.offload_ngram_tables(variables)
    paths = host_offload.ngram_table_paths(moved["params"])
    assert len(paths) == cfg.model.ngram.num_tables
    tables = sum(np.prod(np.shape(variables["params"]["embed"]["ngram"][p[-1]])) * 4 for p in paths)
    assert host_offload.device_bytes(variables) - host_offload.device_bytes(moved) == tables
    ids = jax.random.randint(jax.random.key(0), (2, 12), 3, cfg.model.vocab_size)
    run = jax.jit(LongCatModel(cfg.model).apply)
    np.testing.assert_array_equal(run(moved, ids), run(variables, ids))


def test_offload_refuses_a_model_without_ngram_tables():
    with pytest.raises(ValueError, match="ngram.enabled=False"):
        host_offload.offload_ngram_tables({"params": {"embed": {"tokens": {"embedding": jnp.zeros(2)}}}})


@pytest.mark.slow
def test_engine_with_ngram_tables_on_host_equals_device():
    from lcjax.config_io import load_config, resolve_config_path
    from lcjax.serve.engine import Engine, EngineConfig
    from lcjax.serve.loading import random_model
    from lcjax.serve.sampling import SamplingParams
    cfg, variables, _ = random_model(load_config(resolve_config_path("tiny")), seed=0)
    prompts = [[5, 9, 200, 17, 33, 4, 81], [7, 7, 3, 90]]
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=3)
    ec = EngineConfig(max_num_seqs=2, max_model_len=64, prefill_chunk=16, num_speculative_tokens=2)
    ref = Engine(cfg, variables, None, ec).generate(prompts, greedy)
    out = Engine(cfg, host_offload.offload_ngram_tables(variables), None, ec).generate(prompts, greedy)
    assert [o.token_ids for o in out] == [o.token_ids for o in ref]
    for a, b in zip(out, ref):
        np.testing.assert_allclose([t.logprob for t in a.logprobs], [t.logprob for t in b.logprobs],
                                   rtol=1e-6)


def test_take_rows_accepts_host_numpy_tables():
    """An un-jitted apply with numpy params (as restored from a checkpoint) gathers as before."""
    import numpy as np

    from lcjax.ops.host_rows import take_rows

    table = np.arange(12, dtype=np.float32).reshape(6, 2)
    ids = jax.numpy.asarray([[4, 0], [5, 5]])
    np.testing.assert_array_equal(np.asarray(take_rows(table, ids)), table[np.asarray(ids)])
