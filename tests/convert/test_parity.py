"""lcjax after conversion vs transformers' LongcatFlashForCausalLM: logits, greedy decoding, round trip.

Random tiny configs (float32, CPU): >= 2 logical layers, zero experts, routed_scaling_factor 6.0,
random correction biases and norm weights. Padding: transformers sees right- and left-padded
batches with an attention mask; lcjax sees the right-padded batch with segment_ids (1 = token,
0 = pad), and only real tokens are compared (pad positions are garbage on both sides).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LongcatFlashForCausalLM

from lcjax.convert import load_hf_checkpoint, save_hf_checkpoint
from lcjax.model import LongCatModel, decode_step, prefill

from .conftest import hf_config, make_hf_model, read_tensors

CONFIGS = {
    "base": dict(),
    "three_layers": dict(  # more experts and zero experts, top-3, odd widths, rope dim 8
        num_layers=3, hidden_size=48, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=24,
        kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=8, head_dim=8, v_head_dim=6,
        ffn_hidden_size=72, expert_ffn_hidden_size=24, n_routed_experts=6, zero_expert_num=3,
        moe_topk=3),
    "yarn": dict(  # DeepSeek YaRN: cos/sin attention factor and the mscale^2 softmax scale
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 32, "mscale": 1.0,
                         "mscale_all_dim": 1.0}),
}
LENGTHS = (24, 17, 9)


@functools.lru_cache(maxsize=None)
def _converted(name: str, tmp_root: str):
    """(transformers model, HF dir written by save_pretrained in shards, lcjax config, variables)."""
    import pathlib

    model = make_hf_model(hf_config(**CONFIGS[name]), seed=len(name))
    path = pathlib.Path(tmp_root) / name
    model.save_pretrained(path, max_shard_size="100KB")
    config, variables = load_hf_checkpoint(path)
    return model, path, config.model, variables


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("parity"))
    return lambda name: _converted(name, root)


def _batch(vocab: int, seed: int):
    """Right-padded ids [3, 24] and the mask of real tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (len(LENGTHS), max(LENGTHS)))
    mask = np.arange(ids.shape[1])[None, :] < np.array(LENGTHS)[:, None]
    return np.where(mask, ids, 0), mask


def _left_padded(ids, mask):
    """The same rows moved to the right end (transformers' padding side for generation)."""
    left_ids, left_mask = np.zeros_like(ids), np.zeros_like(mask)
    for b, n in enumerate(LENGTHS):
        left_ids[b, ids.shape[1] - n:], left_mask[b, ids.shape[1] - n:] = ids[b, :n], True
    return torch.as_tensor(left_ids), torch.as_tensor(left_mask, dtype=torch.long)


# One compiled prefill per config serves both the logits and the generation tests.
_PREFILL = jax.jit(prefill, static_argnums=(0, 4))
_STEP = jax.jit(decode_step, static_argnums=0)
NEW_TOKENS = 32
MAX_LEN = max(LENGTHS) + NEW_TOKENS


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_with_padding(converted, name):
    model, path, cfg, variables = converted(name)
    assert path.joinpath("model.safetensors.index.json").is_file()  # a multi-shard checkpoint
    ids, mask = _batch(cfg.vocab_size, seed=1)
    got, _ = _PREFILL(cfg, variables, jnp.asarray(ids, jnp.int32), jnp.asarray(LENGTHS, jnp.int32),
                      MAX_LEN)
    got = np.asarray(got)
    with torch.no_grad():
        right = model(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask, dtype=torch.long)).logits
        left = model(*_left_padded(ids, mask)).logits  # RoPE is relative: same logits
    for b, n in enumerate(LENGTHS):
        np.testing.assert_allclose(got[b, :n], right[b, :n].numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(got[b, :n], left[b, ids.shape[1] - n:].numpy(), atol=1e-4, rtol=0)
    assert np.abs(got[mask]).max() > 0.1  # the comparison is not between near-zero logits


def test_packed_segment_ids_forward_matches_transformers(converted):
    """LongCatModel.apply with segment_ids (1 = token, 0 = pad) on the right-padded batch."""
    model, _, cfg, variables = converted("base")
    ids, mask = _batch(cfg.vocab_size, seed=4)
    got = np.asarray(jax.jit(LongCatModel(cfg).apply)(variables, jnp.asarray(ids, jnp.int32),
                                                      jnp.asarray(mask, jnp.int32)))
    with torch.no_grad():
        want = model(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask, dtype=torch.long)).logits
    np.testing.assert_allclose(got[mask], want.numpy()[mask], atol=1e-4, rtol=0)


def _lcjax_greedy(cfg, variables, ids) -> np.ndarray:
    """Greedy decoding: prefill the right-padded prompts, then jitted decode_step per token."""
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    logits, cache = _PREFILL(cfg, variables, jnp.asarray(ids, jnp.int32), lengths, MAX_LEN)
    token = jnp.argmax(logits[jnp.arange(len(LENGTHS)), lengths - 1], -1)
    out = [token]
    for _ in range(NEW_TOKENS - 1):
        logits, cache = _STEP(cfg, variables, cache, token[:, None].astype(jnp.int32))
        token = jnp.argmax(logits[:, -1], -1)
        out.append(token)
    return np.stack([np.asarray(t) for t in out], axis=1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_generation_of_32_tokens_is_identical(converted, name):
    model, _, cfg, variables = converted(name)
    ids, mask = _batch(cfg.vocab_size, seed=2)
    model.generation_config.eos_token_id = None  # always 32 tokens, never stop early
    left_ids, left_mask = _left_padded(ids, mask)
    with torch.no_grad():
        want = model.generate(left_ids, attention_mask=left_mask, max_new_tokens=NEW_TOKENS,
                              do_sample=False, pad_token_id=0)[:, ids.shape[1]:].numpy()
    got = _lcjax_greedy(cfg, variables, ids)
    assert want.shape == got.shape == (len(LENGTHS), NEW_TOKENS)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", ["base", "three_layers"])
def test_round_trip_reproduces_every_tensor_bit_for_bit(converted, tmp_path, name):
    model, path, cfg, variables = converted(name)
    save_hf_checkpoint(variables, cfg, tmp_path / "out", max_shard_size="64KB")
    original, written = read_tensors(path), read_tensors(tmp_path / "out")
    assert sorted(written) == sorted(original)  # incl. transformers' zero-expert gate/up stubs
    for key, (array, dtype) in original.items():
        assert written[key][1] == dtype, key
        np.testing.assert_array_equal(written[key][0], array, err_msg=key)
    # ...and transformers loads what lcjax wrote, giving identical logits.
    reloaded = LongcatFlashForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    ids = torch.as_tensor(_batch(cfg.vocab_size, seed=3)[0])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
