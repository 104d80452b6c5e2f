"""Policy init from a Hugging Face directory: an lcjax model exported with save_hf_checkpoint
(safetensors + config.json) and a tokenizer.json, loaded by `policy.path` (format auto and
hf), gives the source model's logits, and a short RL run starts from it."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.config_io import load_config, resolve_config_path
from lcjax.model import LongCatModel
from lcjax.rl.config import PolicyConfig
from lcjax.rl.policy import load_policy
from lcjax.serve.loading import random_model

pytestmark = pytest.mark.slow  # exports and reloads a model (~20 s), compiles forwards

TEXTS = [f"assert {a} + {b} == {a + b}\n" for a in range(10) for b in range(10)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(source (config, variables), HF directory) of a random tiny model."""
    from lcjax.convert import save_hf_checkpoint
    from lcjax.data.tokenizer import train_or_load_tokenizer

    config, variables, _ = random_model(load_config(resolve_config_path("tiny")), seed=3)
    # random init leaves the router correction biases at 0: make them matter
    rng = np.random.default_rng(0)
    variables = jax.tree.map(np.asarray, variables)
    variables["router_bias"] = jax.tree.map(
        lambda b: rng.normal(0, 0.1, b.shape).astype(b.dtype), variables["router_bias"])
    hub = tmp_path_factory.mktemp("hf") / "model"
    save_hf_checkpoint(variables, config, hub)
    train_or_load_tokenizer(hub, config.model.vocab_size, TEXTS)  # 259: bytes + specials
    (hub / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return (config, variables), hub


def _logits(model_cfg, variables, ids):
    return np.asarray(jax.jit(LongCatModel(model_cfg).apply)(
        {"params": variables["params"], "router_bias": variables["router_bias"]}, ids), np.float64)


@pytest.mark.parametrize("fmt", ["auto", "hf"])
def test_hf_policy_matches_source_logits(exported, fmt):
    (config, variables), hub = exported
    got_config, got_variables, tokenizer = load_policy(PolicyConfig(path=str(hub), format=fmt))
    assert got_config.model.vocab_size == config.model.vocab_size
    ids = np.random.default_rng(1).integers(3, config.model.vocab_size, (2, 24)).astype(np.int32)
    want = _logits(config.model, variables, ids)
    got = _logits(got_config.model, got_variables, ids)
    assert np.abs(want).max() > 0.1  # a model whose logits say something
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # the tokenizer is the directory's tokenizer.json, special ids from tokenizer_config.json
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    assert tokenizer.decode(tokenizer.encode(TEXTS[7])) == TEXTS[7]


def test_hf_policy_learner_logprobs(exported):
    """The learner's log pi on the loaded policy is the source model's log-softmax."""
    from lcjax.rl.learner import token_logprobs

    (config, variables), hub = exported
    got_config, got_variables, _ = load_policy(PolicyConfig(path=str(hub)))
    ids = np.random.default_rng(2).integers(3, config.model.vocab_size, (1, 16)).astype(np.int32)
    ones, pos = np.ones_like(ids), np.arange(16, dtype=np.int32)[None]
    got = np.asarray(jax.jit(token_logprobs, static_argnums=0)(
        got_config.model, jax.tree.map(jnp.asarray, got_variables["params"]),
        jax.tree.map(jnp.asarray, got_variables["router_bias"]), ids, ones, pos))
    logits = _logits(config.model, variables, ids[:, :-1])
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    want = np.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_missing_tokenizer_is_a_clear_error(exported, tmp_path):
    import shutil

    _, hub = exported
    bare = tmp_path / "bare"
    shutil.copytree(hub, bare)
    (bare / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_policy(PolicyConfig(path=str(bare)))


def test_rl_run_starts_from_hf_policy(exported, tmp_path):
    """`python -m lcjax.rl policy.path=<HF dir>`: two learner steps, metrics and plot written;
    on step 1 the rollout engine's sampling logprobs equal the learner's (both run the loaded
    policy, and nothing is stale yet)."""
    from lcjax.rl.__main__ import main

    _, hub = exported
    run_dir = tmp_path / "run"
    rc = main([f"policy.path={hub}", "rl.steps=2", "rl.groups_per_step=2", "rl.checkpoint_every=1",
               "rollout.group_size=4", "rollout.max_tokens=4", "rollout.max_num_seqs=16",
               "objective.filter_equal_groups=false", f"rl.run_dir={run_dir}"])
    assert rc == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in records)
    assert records[0]["staleness_max"] == 0 and records[0]["logp_gap"] < 1e-3
    assert (run_dir / "reward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["policy"]["path"] == str(hub)
