"""LoRA fine-tuning end to end on chat data: frozen base (no optimizer state for it), adapters
checkpointed, lam logged, `python -m lcjax.lora merge` writing a run the server loads with the
same logits, and the merge refused at a step where the AFA coefficient is not 0."""

import functools
import json
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from lcjax.config_io import load_config, resolve_config_path
from lcjax.lora.__main__ import main as lora_main
from lcjax.lora.adapters import attach
from lcjax.lora.merge import load_lora_run, load_merged_run
from lcjax.model import BIAS_COLLECTION, LongCatModel
from lcjax.model.layers import LORA_COLLECTION
from lcjax.serve.loading import load_run
from lcjax.train import loop

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()


def _chat_corpus(path) -> str:
    lines = []
    for i in range(40):
        q = " ".join(WORDS[(i + j) % 10] for j in range(3 + i % 5))
        a = " ".join(WORDS[(i * 3 + j) % 10] for j in range(4 + i % 3))
        lines.append(json.dumps({"messages": [{"role": "user", "content": q},
                                              {"role": "assistant", "content": a}]}))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = [f"data.source=chat", f"data.path={_chat_corpus(root / 'chat.jsonl')}", "data.seq_len=32",
            "data.global_batch=4", "data.heldout_fraction=0.1", "model.vocab_size=320",
            "model.num_layers=1", "model.loza.layer_pattern=01", "train.steps=4",
            "train.checkpoint_every=1", "train.keep_checkpoints=3", "train.eval_every=0",
            "train.eval_batches=1", "train.log_every=1", "train.async_checkpoint=false",
            "optimizer.warmup_steps=1", "optimizer.learning_rate=0.01", f"train.run_dir={root / 'run'}",
            "lora.rank=4", "lora.alpha=8", "lora.afa.activation=silu",
            "lora.afa.start_fraction=0.25", "lora.afa.anneal_fraction=0.5"]
    cfg = load_config(resolve_config_path("tiny"), base)
    loop.train(cfg)
    return cfg, root


def test_base_frozen_adapters_trained_and_lambda_logged(lora_run):
    cfg, root = lora_run
    run = root / "run"
    config, variables, adapters, step, _ = load_lora_run(run)
    assert step == 4
    # The frozen base is the fresh init of the same seed (no init_from): unchanged by training.
    from lcjax.train.state import create_optimizer, init_state
    from lcjax.parallel import make_mesh

    fresh = init_state(config, create_optimizer(config), make_mesh(config.mesh))
    for a, b in zip(jax.tree.leaves(fresh.params), jax.tree.leaves(variables["params"])):
        np.testing.assert_array_equal(np.asarray(a), b)
    # The router bias is part of the frozen base: no balancing updates in a LoRA run.
    for a, b in zip(jax.tree.leaves(fresh.router_bias), jax.tree.leaves(variables["router_bias"])):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert any(np.abs(ad["b"]).max() > 0 for ad in _sites(adapters))  # B moved off zero
    # Adam moments only for the adapters.
    n_adapter = sum(x.size for x in jax.tree.leaves(fresh.lora))
    n_opt = sum(x.size for x in jax.tree.leaves(fresh.opt_state))
    assert 2 * n_adapter <= n_opt <= 2 * n_adapter + 8
    lams = [json.loads(l).get("train/afa_lambda") for l in (run / "metrics.jsonl").read_text().splitlines()]
    lams = [x for x in lams if x is not None]
    assert lams[:4] == pytest.approx([1.0, 1.0, 0.5, 0.0])


def _sites(adapters):
    from lcjax.lora.adapters import sites_of

    return list(sites_of(adapters).values())


def test_merge_cli_writes_a_run_the_server_loads(lora_run, tmp_path):
    cfg, root = lora_run
    out = tmp_path / "merged"
    assert lora_main(["merge", str(root / "run"), str(out)]) == 0
    config, variables, adapters, step, _ = load_lora_run(root / "run")
    variables, adapters = jax.device_put((variables, adapters))
    merged_cfg, merged, _ = load_run(out)
    merged = jax.device_put(merged)
    assert not merged_cfg.lora.enabled
    ids = jax.random.randint(jax.random.key(0), (2, 16), 3, 320)
    model = LongCatModel(config.model)
    unmerged = model.apply({"params": variables["params"], BIAS_COLLECTION: variables["router_bias"],
                            LORA_COLLECTION: attach(adapters, config.lora, 0.0, True)}, ids)
    got = model.apply({"params": merged["params"], BIAS_COLLECTION: merged[BIAS_COLLECTION]}, ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(unmerged), atol=1e-5, rtol=1e-5)
    # The in-memory path a server takes for `--lora RUN`: the same merged weights.
    _, direct, _ = load_merged_run(root / "run")
    for a, b in zip(jax.tree.leaves(direct), jax.tree.leaves(merged)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # lcjax.convert reads the merged run as it reads any training run.
    from lcjax.convert.__main__ import main as convert_main

    assert convert_main(["lcjax-to-hf", str(out), str(tmp_path / "hf")]) == 0
    assert any(p.suffix == ".safetensors" for p in (tmp_path / "hf").iterdir())


def test_merge_refuses_a_step_where_lambda_is_not_zero(lora_run, tmp_path, capsys):
    cfg, root = lora_run
    early = tmp_path / "early"
    shutil.copytree(root / "run", early)
    for step in ("3", "4"):  # newest left: step 2, where lam = 0.5
        shutil.rmtree(early / "checkpoints" / step)
    assert lora_main(["merge", str(early), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "saved at step 2, where the AFA coefficient lam = 0.5" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_init_from_a_hugging_face_directory(lora_run, tmp_path):
    """train.init_from names an HF LongCat directory: its weights are the frozen base."""
    import dataclasses

    from lcjax.convert import save_hf_checkpoint

    cfg, root = lora_run
    _, base, _ = load_run(root / "run")  # any plain weights of this shape will do
    save_hf_checkpoint(base, cfg, tmp_path / "hf")
    run = tmp_path / "from_hf"
    shutil.copyfile(root / "run" / "tokenizer.json", (run.mkdir() or run) / "tokenizer.json")
    new = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, run_dir=str(run), init_from=str(tmp_path / "hf"), steps=1))
    loop.train(new)
    _, variables, _, step, _ = load_lora_run(run)
    assert step == 1
    for a, b in zip(jax.tree.leaves(base["params"]), jax.tree.leaves(variables["params"])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=0)


@functools.partial(jax.jit, static_argnums=0)
def _forward(model_cfg, variables, ids):
    return LongCatModel(model_cfg).apply(variables, ids)


def _full_forward_argmax(model_cfg, variables, ids, pad_to=32):
    """argmax of the full (uncached) forward at every position of `ids` (padded at the end to
    one compiled length: the model is causal, so the padding changes no earlier position)."""
    padded = np.zeros((1, pad_to), np.int32)
    padded[0, :len(ids)] = ids
    return np.asarray(_forward(model_cfg, variables, padded))[0, :len(ids)].argmax(-1)


def test_serve_lora_applies_unmerged_adapters_at_the_saved_lambda(lora_run, tmp_path):
    """`--lora RUN` serves base + adapters apart, also at a step where lam != 0 (which merging
    refuses): the engine's greedy tokens (paged cache, MTP drafts) equal full forwards with the
    adapters, and differ from the base model's."""
    from lcjax.lora.merge import load_unmerged_run
    from lcjax.serve import Engine, EngineConfig, SamplingParams
    from lcjax.serve.cli import build_parser, load_model

    cfg, root = lora_run
    early = tmp_path / "early"
    shutil.copytree(root / "run", early)
    for step in ("3", "4"):  # newest left: step 2, where lam = 0.5
        shutil.rmtree(early / "checkpoints" / step)
    loaded = load_model(build_parser().parse_args(["--lora", str(early)]))
    assert LORA_COLLECTION in loaded.variables
    config, variables, _, lam = load_unmerged_run(early)
    variables = jax.device_put(variables)
    assert lam == pytest.approx(0.5)
    prompts = [[5, 17, 40, 99, 12], [7, 8, 9, 200, 31, 64, 3, 11]]
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    base = {c: variables[c] for c in ("params", BIAS_COLLECTION)}
    changed = False
    for k in (2,):  # MTP rounds: prefill, the draft head and the verify pass all read adapters
        engine = Engine(config, loaded.variables, loaded.tokenizer,
                        EngineConfig(max_num_seqs=2, max_model_len=32, num_speculative_tokens=k))
        for prompt, out in zip(prompts, engine.generate(prompts, greedy)):
            seq = prompt + out.token_ids
            # Greedy: every generated token is the adapted model's full-forward argmax.
            want = _full_forward_argmax(config.model, variables, seq)[len(prompt) - 1:-1]
            np.testing.assert_array_equal(out.token_ids, want, err_msg=f"k={k}")
            got_base = _full_forward_argmax(config.model, base, seq)[len(prompt) - 1:-1]
            changed |= bool((got_base != want).any())
    assert changed, "the adapters change no greedy token: the test cannot fail"
