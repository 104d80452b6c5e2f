"""Activation thresholds under serving: continuous batching over the paged latent cache, MTP
speculative decoding and quantized weights give the greedy tokens of the plain full forward of
the same sparse model; the --activation-sparsity flag."""

import argparse

import numpy as np
import pytest

from lcjax.config_io import load_config, resolve_config_path
from lcjax.quant import quantize_model
from lcjax.serve import chess_flag, cli
from lcjax.serve.engine import Engine, EngineConfig
from lcjax.sparsity import chess
from tests.model.conftest import init_variables
from tests.serve.test_engine import GREEDY, _prompts, _run_staggered, greedy_reference


@pytest.fixture(scope="module")
def model():
    cfg = load_config(resolve_config_path("tiny")).model
    variables = init_variables(cfg, seed=3)
    variables["params"]["lm_head"] = variables["params"]["lm_head"] * 40.0  # no near-ties
    rng = np.random.default_rng(0)
    calib = [rng.integers(3, cfg.vocab_size, (2, 32), dtype=np.int32) for _ in range(2)]
    return cfg, variables, calib


def _engine_matches_forward(cfg, variables, k):
    prompts = _prompts(cfg, [5, 40, 13, 29])
    want = [greedy_reference(cfg, variables, p, GREEDY.max_tokens) for p in prompts]
    engine = Engine(cfg, variables, None, EngineConfig(
        max_num_seqs=4, max_model_len=96, page_size=8, prefill_chunk=16, max_prefill_seqs=2,
        num_speculative_tokens=k))
    outs = _run_staggered(engine, prompts, GREEDY)
    assert [o.token_ids for o in outs] == want
    return want


@pytest.mark.slow
@pytest.mark.parametrize("k", [0, 2])
def test_engine_with_chess_plus_equals_the_sparse_forward(model, k):
    cfg, variables, calib = model
    th = chess.calibrate(cfg, variables, calib, 0.5, "chess+")
    sparse = _engine_matches_forward(cfg, chess.with_thresholds(variables, th), k)
    dense = [greedy_reference(cfg, variables, p, GREEDY.max_tokens)
             for p in _prompts(cfg, [5, 40, 13, 29])]
    assert sparse != dense  # s=0.5 on a random model does change some greedy tokens


@pytest.mark.slow
def test_quantized_sparse_engine_with_mtp_equals_its_forward(model):
    cfg, variables, calib = model
    q = quantize_model(variables, cfg, "w8a8", calib)
    th = chess.calibrate(cfg, q, calib, 0.5, "chess")
    _engine_matches_forward(cfg, chess.with_thresholds(q, th), 2)


def test_flag_parsing_and_apply(model):
    cfg, variables, calib = model
    parser = argparse.ArgumentParser()
    chess_flag.add_flags(parser.add_argument_group("model"))
    args = parser.parse_args(["--activation-sparsity", "cats:s=0.3"])
    chess_flag.check_flags(args, parser)
    seen = []

    def batches(recipe, model, n, max_len):
        seen.append((recipe.needs_calibration, n, max_len))
        return calib, "test batches"

    loaded = cli.LoadedModel(cfg, variables, None, "tiny")
    out = chess_flag.apply(args, loaded, 64, batches)
    assert seen == [(True, 4, 64)]
    t = out.variables["chess"]["layers"]["mlp_0"]["gate"]
    assert t.shape == (cfg.num_layers, cfg.ffn_hidden_size) and float(t.min()) > 0
    assert np.all(np.asarray(t) == np.asarray(t)[:, :1])  # CATS: one threshold per layer
    assert chess_flag.apply(parser.parse_args([]), loaded, 64, batches) is loaded  # off by default
    for bad in (["--activation-sparsity", "chess:s=1.5"],
                ["--activation-sparsity", "chess", "--activation-sparsity-calib-batches", "0"]):
        with pytest.raises(SystemExit):
            chess_flag.check_flags(parser.parse_args(bad), parser)
    serve_args = cli.build_parser().parse_args(["--activation-sparsity", "chess+:s=0.5"])
    assert serve_args.activation_sparsity == "chess+:s=0.5"  # the server's own parser has it
    assert cli.build_parser().parse_args([]).activation_sparsity is None  # off by default
