"""Serve prefill chunks (and the ring-cached sparse layers at decode) run the model's configured
attention backend, through the same op as training, and give the full forward's greedy tokens."""

import dataclasses

import pytest

from lcjax.config_io import load_config, resolve_config_path
from lcjax.serve.engine import Engine, EngineConfig
from lcjax.serve.sampling import SamplingParams
from tests.model.conftest import init_variables
from tests.model.test_attention_backends import spy_all
from tests.serve.test_engine import _prompts, greedy_reference


@pytest.mark.slow
def test_prefill_chunks_use_the_configured_kernel(monkeypatch):
    cfg = load_config(resolve_config_path("tiny")).model
    variables = init_variables(cfg, seed=3)
    variables["params"]["lm_head"] = variables["params"]["lm_head"] * 40.0  # no near-ties
    prompt = _prompts(cfg, [45])[0]  # two chunks of 32, LoZA rings shorter than a chunk
    want = greedy_reference(dataclasses.replace(cfg, attention_impl="reference"), variables,
                            prompt, 3, width=64)
    calls = spy_all(monkeypatch)
    engine = Engine(dataclasses.replace(cfg, attention_impl="pallas_gpu_interpret"), variables,
                    None, EngineConfig(max_num_seqs=1, max_model_len=64, page_size=16,
                                       prefill_chunk=32))
    out = engine.generate([prompt], SamplingParams(max_tokens=3, temperature=0.0,
                                                   ignore_eos=True))
    assert out[0].token_ids == want
    assert calls and set(calls) == {"pallas_gpu_interpret"}, sorted(set(calls))
