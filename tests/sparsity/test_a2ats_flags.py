"""The serve flags --kv-retrieval / --a2ats / --ngram-offload: parsing, refusals, what apply
hands the engine."""

import argparse
import dataclasses

import numpy as np
import pytest

from lcjax.serve import retrieval_flags
from lcjax.sparsity.a2ats import A2ATSConfig
from lcjax.sparsity.host_offload import host_memory_kind


def _parse(*argv):
    p = argparse.ArgumentParser()
    retrieval_flags.add_flags(p.add_argument_group("engine"))
    args = p.parse_args(list(argv))
    retrieval_flags.check_flags(args, p)
    return args


def test_defaults_are_off_and_settings_parse():
    args = _parse()
    assert (args.kv_retrieval, args.ngram_offload) == ("none", "none")
    cfg = retrieval_flags.a2ats_config("topk_fraction=0.05,codebook_size=256,offload=host,query_aware=false")
    assert cfg == A2ATSConfig(topk_fraction=0.05, codebook_size=256, offload="host", query_aware=False)


@pytest.mark.parametrize("argv, match", [
    (("--kv-retrieval", "a2ats", "--a2ats", "topk=0.1"), "topk"),
    (("--kv-retrieval", "a2ats", "--a2ats", "topk_fraction=2"), "topk_fraction=2.0"),
    (("--a2ats", "topk_fraction=0.1"), "need --kv-retrieval a2ats"),
    (("--kv-retrieval", "a2ats", "--a2ats-calib-batches", "0"), "must be >= 1"),
])
def test_bad_flags_exit_naming_the_value(argv, match, capsys):
    with pytest.raises(SystemExit):
        _parse(*argv)
    assert match in capsys.readouterr().err


@dataclasses.dataclass
class _Model:
    config: object
    variables: dict
    tokenizer: object = None

    def _replace(self, **kw):
        return dataclasses.replace(self, **kw)


@pytest.mark.skipif(host_memory_kind() is None, reason="no pinned_host memory")
def test_apply_offloads_ngram_tables_and_loads_a_saved_index(tmp_path):
    import jax.numpy as jnp
    from lcjax.config_io import load_config, resolve_config_path
    from lcjax.sparsity.a2ats import Codebook
    from lcjax.sparsity.a2ats_calibrate import A2ATSIndex

    config = load_config(resolve_config_path("tiny"))
    cfg = config.model
    table = jnp.ones((5, 2))
    model = _Model(config, {"params": {"embed": {"ngram": {"table_0": table, "proj_0": table}}}})
    d = cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim
    book = Codebook(centroids=jnp.ones((4, d)), centroids_l=jnp.ones((4, d)), transform=jnp.eye(d))
    books = tuple(None if s else book for s in cfg.sparse_layers)
    A2ATSIndex(books=books, rope=cfg.mla.rope, config=A2ATSConfig(codebook_size=4)).save(
        str(tmp_path / "cb.npz"))
    args = _parse("--ngram-offload", "host", "--kv-retrieval", "a2ats", "--a2ats-codebook",
                  str(tmp_path / "cb.npz"), "--a2ats", "topk_fraction=0.1")
    out, kwargs = retrieval_flags.apply(args, model, 64, calibration_batches=print)
    ngram = out.variables["params"]["embed"]["ngram"]
    assert ngram["table_0"].sharding.memory_kind == "pinned_host"
    assert ngram["proj_0"].sharding.memory_kind == "device"
    index = kwargs["kv_retrieval"]
    assert index.config == A2ATSConfig(codebook_size=4, topk_fraction=0.1)
    assert [b is None for b in index.books] == list(cfg.sparse_layers)
    np.testing.assert_array_equal(index.books[0].transform, np.eye(d))
