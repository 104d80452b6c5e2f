"""Flash-Lite: the hashed N-gram embedding against a small torch port of the published formulation.

transformers has no n-gram model, so the port (spec §3.2, Hub remote code `NgramEmbedding` with
`_shift_right_ignore_eos`) computes `inputs_embeds` for `LongcatFlashForCausalLM`; lcjax loads
the same Hub-layout checkpoint (`model_type="longcat_flash_ngram"`) and must give the same
embedding and logits, including sequences with EOS inside the n-gram window.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lcjax.convert import load_hf_checkpoint, save_hf_checkpoint
from lcjax.model import LongCatModel
from lcjax.model.embedding import Embedder

from .conftest import hf_config, hf_config_json, hub_tensors, make_hf_model, read_tensors, write_checkpoint

RATIO, NEIGHBORS, SPLITS, EOS = 3, 4, 2, 2  # orders 2..4 x 2 splits = 6 tables


def shift_right_ignore_eos(x: torch.Tensor, shift: int, eos: int) -> torch.Tensor:
    """x[t - shift], or 0 when that is before the sequence or an EOS lies in x[t-shift .. t-1].

    Segments end at each EOS (the EOS belongs to the segment before), so history never crosses it.
    """
    seq = x.shape[1]
    shifted = F.pad(x, (shift, 0))[:, :seq]
    eos_before = F.pad(torch.cumsum((x == eos).long(), 1), (1, 0))  # [B, S+1]: EOS in x[:, :t]
    t = torch.arange(seq)
    crossed = eos_before[:, t] - eos_before[:, (t - shift).clamp(min=0)] > 0
    return torch.where((t >= shift) & ~crossed, shifted, torch.zeros_like(shifted))


def torch_ngram_embedding(ids, word, tables, projs, vocab: int, eos: int | None = EOS):
    """(E_tok[x] + sum_j P_j(T_j[id_j])) / (1 + K(N-1)); id_j in int64 as the remote code."""
    x = ids.long()
    out = word[x].double()
    hist = {d: shift_right_ignore_eos(x, d, eos) if eos is not None else F.pad(x, (d, 0))[:, :x.shape[1]]
            for d in range(1, NEIGHBORS)}
    for n in range(2, NEIGHBORS + 1):
        for k in range(SPLITS):
            j = (n - 2) * SPLITS + k
            modulus = RATIO * vocab + 2 * j + 1
            row = x.clone()
            for d in range(1, n):
                row = row + hist[d] * pow(vocab, d, modulus)
            row = row % modulus
            out = out + tables[j][row].double() @ projs[j].double().T
    return (out / (1 + SPLITS * (NEIGHBORS - 1))).float()


@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    config = hf_config(hidden_size=48, num_attention_heads=4, num_key_value_heads=4)
    model = make_hf_model(config, seed=5)
    g = torch.Generator().manual_seed(6)
    num_tables, dim = SPLITS * (NEIGHBORS - 1), 48 // (SPLITS * (NEIGHBORS - 1))
    tables = [torch.randn(RATIO * config.vocab_size + 2 * j + 1, dim, generator=g) for j in range(num_tables)]
    projs = [0.3 * torch.randn(48, dim, generator=g) for _ in range(num_tables)]
    tensors = hub_tensors(model)
    tensors.update({f"model.ngram_embeddings.embedders.{j}.weight": t for j, t in enumerate(tables)})
    tensors.update({f"model.ngram_embeddings.post_projs.{j}.weight": p for j, p in enumerate(projs)})
    meta = hf_config_json(config, model_type="longcat_flash_ngram",
                          architectures=["LongcatFlashNgramForCausalLM"],
                          ngram_vocab_size_ratio=RATIO, oe_neighbor_num=NEIGHBORS,  # alias
                          emb_split_num=SPLITS)
    path = write_checkpoint(tmp_path_factory.mktemp("lite"), tensors, meta, shards=2)
    config_, variables = load_hf_checkpoint(path)
    return model, path, config_.model, variables, tables, projs


def _ids(vocab):
    rng = np.random.default_rng(7)
    ids = rng.integers(3, vocab, (2, 20))
    ids[0, 4] = ids[0, 5] = EOS  # consecutive EOS: a one-token segment
    ids[0, 11] = EOS
    ids[1, 0] = EOS  # EOS first: later tokens never look back past it
    ids[1, 17] = EOS
    return ids


def test_loader_maps_the_ngram_config(lite):
    _, _, cfg, variables, tables, _ = lite
    assert cfg.ngram.enabled and (cfg.ngram.vocab_size_ratio, cfg.ngram.neighbor_num,
                                  cfg.ngram.split_num) == (RATIO, NEIGHBORS, SPLITS)
    assert cfg.eos_token_id == EOS and cfg.ngram.num_tables == len(tables)
    np.testing.assert_array_equal(variables["params"]["embed"]["ngram"]["table_5"], tables[5].numpy())


def test_embedding_and_logits_match_torch_port_with_eos_in_window(lite):
    model, _, cfg, variables, tables, projs = lite
    ids = _ids(cfg.vocab_size)
    word = model.model.embed_tokens.weight.detach()
    want_embeds = torch_ngram_embedding(torch.as_tensor(ids), word, tables, projs, cfg.vocab_size)
    got_embeds = Embedder(cfg).apply({"params": variables["params"]["embed"]}, jnp.asarray(ids, jnp.int32))
    np.testing.assert_allclose(got_embeds, want_embeds.numpy(), atol=1e-6, rtol=0)
    # The EOS rule matters here: ignoring it (as mlx-lm does) changes the positions after EOS.
    no_reset = torch_ngram_embedding(torch.as_tensor(ids), word, tables, projs, cfg.vocab_size, eos=None)
    assert np.abs(no_reset.numpy() - want_embeds.numpy())[0, 5:8].max() > 1e-3

    with torch.no_grad():
        want = model(inputs_embeds=want_embeds).logits.numpy()
    got = jax.jit(LongCatModel(cfg).apply)(variables, jnp.asarray(ids, jnp.int32))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_lite_round_trip_is_bit_exact(lite, tmp_path):
    _, path, cfg, variables, _, _ = lite
    save_hf_checkpoint(variables, cfg, tmp_path / "out", zero_expert_stubs=False)
    original, written = read_tensors(path), read_tensors(tmp_path / "out")
    assert sorted(written) == sorted(original)
    for key, (array, dtype) in original.items():
        assert written[key][1] == dtype
        np.testing.assert_array_equal(written[key][0], array, err_msg=key)
