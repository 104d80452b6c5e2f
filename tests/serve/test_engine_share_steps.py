"""Engines of one configuration share jitted steps: no recompile, each keeps its own weights."""

import jax
import numpy as np
import pytest

from lcjax.serve.engine import Engine, EngineConfig
from lcjax.serve.sampling import SamplingParams

from tests.serve.test_engine import model  # noqa: F401 (fixture)


def test_shared_steps_compile_once_and_run_each_engines_own_variables(model):  # noqa: F811
    cfg, variables = model
    other = jax.tree.map(lambda x: x, variables)
    other["params"]["lm_head"] = -variables["params"]["lm_head"]  # different greedy choices
    ec = EngineConfig(max_num_seqs=2, max_model_len=48, page_size=8, prefill_chunk=16)
    prompts = [[5, 9, 14, 3, 22], [7, 7, 30]]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)

    first = Engine(cfg, variables, engine_config=ec)
    first.generate(prompts, params)
    compiled = first.stats().num_compilations
    second = Engine(cfg, other, engine_config=ec)
    second.share_steps(first.compiled_steps)
    shared = [o.token_ids for o in second.generate(prompts, params)]
    assert second.stats().num_compilations == compiled  # the shared shape log: nothing new
    second.generate(prompts[:1], params)  # one row: a shape neither engine ran yet
    assert first.stats().num_compilations > compiled  # logged in the one shared log

    alone = [o.token_ids for o in Engine(cfg, other, engine_config=ec).generate(prompts, params)]
    assert shared == alone
    assert shared != [o.token_ids for o in first.generate(prompts, params)]


def test_share_steps_refuses_another_engine_config(model):  # noqa: F811
    cfg, variables = model
    a = Engine(cfg, variables, engine_config=EngineConfig(max_num_seqs=2, max_model_len=48))
    b = Engine(cfg, variables, engine_config=EngineConfig(max_num_seqs=4, max_model_len=48))
    with pytest.raises(ValueError, match="same model config, engine config"):
        b.share_steps(a.compiled_steps)
