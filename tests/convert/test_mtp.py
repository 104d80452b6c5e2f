"""MTP weights (`model.mtp.*`, spec §1.6) load into the MTP head and round-trip bit for bit.

transformers drops `model.mtp.*`, so the reference MTP forward is assembled here from
transformers' own MLA / MLP modules with the synthetic MTP tensors:
    logits_{t+2} = lm_head(norm(z + mlp(post(z)))),  z = z0 + attn(input(z0)),
    z0 = eh_proj([enorm(E_mtp[x_{t+1}]); hnorm(h_t)])  with h_t the final-normed hidden state.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.longcat_flash.modeling_longcat_flash import LongcatFlashMLA, LongcatFlashMLP

from lcjax.convert import load_hf_checkpoint, save_hf_checkpoint
from lcjax.convert.hf_names import zero_expert_stub_keys
from lcjax.model import LongCatModel

from .conftest import read_tensors


def _rms(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _load(module, tensors, prefix):
    module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    return module.eval()


def torch_mtp_logits(model, tensors, ids):
    cfg, eps = model.config, model.config.rms_norm_eps
    t = {k[len("model.mtp."):]: v for k, v in tensors.items() if k.startswith("model.mtp.")}
    layer = "layers.0."
    with torch.no_grad():
        hidden = model.model(torch.as_tensor(ids)).last_hidden_state[:, :-1]
        e = _rms(t["embed_tokens.weight"][torch.as_tensor(ids[:, 1:])], t[layer + "enorm.m.weight"], eps)
        h = _rms(hidden, t[layer + "hnorm.m.weight"], eps)
        z = torch.cat([e, h], -1) @ t[layer + "eh_proj.weight"].T
        attn = _load(LongcatFlashMLA(cfg, layer_idx=0), t, layer + "self_attn.")
        ffn = t[layer + "transformer_layer.mlp.gate_proj.weight"].shape[0]
        mlp = _load(LongcatFlashMLP(cfg, intermediate_size=ffn), t, layer + "transformer_layer.mlp.")
        s = z.shape[1]
        rope = model.model.rotary_emb(z, torch.arange(s)[None])
        causal = torch.full((s, s), float("-inf")).triu(1)[None, None]
        z = z + attn(_rms(z, t[layer + "input_layernorm.weight"], eps), rope, causal)[0]
        z = z + mlp(_rms(z, t[layer + "post_attention_layernorm.weight"], eps))
        return model.lm_head(_rms(z, t["norm.weight"], eps)).numpy()


@pytest.fixture(scope="module")
def loaded(hub_checkpoint):
    path, model = hub_checkpoint
    config, variables = load_hf_checkpoint(path)
    return path, model, config.model, variables


def test_mtp_head_is_detected_with_its_width(loaded):
    _, _, cfg, variables = loaded
    assert cfg.mtp_layers == 1 and cfg.mtp_ffn == 80 != cfg.ffn_hidden_size
    assert variables["params"]["mtp"]["mlp"]["gate"].shape == (cfg.hidden_size, 80)


def test_main_and_mtp_logits_match_the_torch_reference(loaded):
    path, model, cfg, variables = loaded
    ids = np.random.default_rng(8).integers(3, cfg.vocab_size, (2, 16))
    logits, aux = jax.jit(LongCatModel(cfg).apply, static_argnames="return_aux")(
        variables, jnp.asarray(ids, jnp.int32), return_aux=True)
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(torch.as_tensor(ids)).logits.numpy(), atol=1e-4, rtol=0)
    tensors = {k: torch.as_tensor(v[0]) for k, v in read_tensors(path).items()}
    want = torch_mtp_logits(model, tensors, ids)
    np.testing.assert_allclose(aux.mtp_logits[:, :-1], want, atol=1e-4, rtol=0)


def test_hub_layout_round_trip_with_mtp_is_bit_exact(loaded, tmp_path):
    path, _, cfg, variables = loaded
    original = read_tensors(path)
    save_hf_checkpoint(variables, cfg, tmp_path / "hub", zero_expert_stubs=False)
    written = read_tensors(tmp_path / "hub")
    assert sorted(written) == sorted(original)
    for key, (array, dtype) in original.items():
        assert written[key][1] == dtype
        np.testing.assert_array_equal(written[key][0], array, err_msg=key)
    # Stubs add only the zero-expert gate/up tensors some transformers 5 releases need, zeros.
    save_hf_checkpoint(variables, cfg, tmp_path / "stubs", zero_expert_stubs=True)
    with_stubs = read_tensors(tmp_path / "stubs")
    stubs = set(zero_expert_stub_keys(cfg))
    assert set(with_stubs) == set(original) | stubs and len(stubs) == 2 * 2 * 2
    assert all(not with_stubs[k][0].any() for k in stubs)
