"""CHESS in the verify pass from the server flag: `--sparse-verify ffn=METHOD:s=S` parses, bad
specs are parser errors naming the value, the CLI path installs verify-only thresholds (plain
decode unchanged, the verifier changed), and the engine refuses the setting without them."""

import argparse

import numpy as np
import pytest

from lcjax.config_io import load_config, resolve_config_path
from lcjax.ops import activation_sparsity
from lcjax.serve import chess_flag, cli
from lcjax.serve.engine import Engine, EngineConfig
from lcjax.serve.sampling import SamplingParams
from lcjax.sparsity import sparse_verify as sv
from tests.model.conftest import init_variables

FLAGS = ["--sparse-verify", "ffn=chess+:s=0.8,reuse_layers=1", "--num-speculative-tokens", "2",
         "--max-model-len", "96", "--page-size", "8", "--max-num-seqs", "4"]


def test_flag_parses_and_bad_specs_name_the_value(capsys):
    config = load_config(resolve_config_path("tiny"))
    args = cli.build_parser().parse_args(FLAGS)
    ec = cli.engine_config(args, config)
    assert ec.sparse_verify == sv.SparseVerifyConfig(ffn="chess+:s=0.8", reuse_layers=1)
    assert sv.SparseVerifyConfig().ffn == "none"
    for bad, named in (("ffn=chess:s=1.5", "1.5"), ("ffn=dense", "dense")):
        with pytest.raises(SystemExit):
            cli.main(["--sparse-verify", bad, "--num-speculative-tokens", "2"])
        assert named in capsys.readouterr().err
    with pytest.raises(ValueError, match="verify thresholds"):
        Engine(config, {}, None, EngineConfig(num_speculative_tokens=2, max_model_len=64,
                                              sparse_verify=sv.SparseVerifyConfig(ffn="chess")))


@pytest.mark.slow
def test_cli_path_installs_verify_only_thresholds():
    """chess_flag.apply with the flag: thresholds in the verify collection only; a plain decode
    engine on those variables gives the dense tokens, the speculative engine's verifier is the
    sparse one (its greedy tokens differ from dense verification somewhere)."""
    config = load_config(resolve_config_path("tiny"))
    cfg = config.model
    variables = init_variables(cfg, seed=3)
    variables["params"]["lm_head"] = variables["params"]["lm_head"] * 40.0  # no near-ties
    rng = np.random.default_rng(0)
    calib = [rng.integers(3, cfg.vocab_size, (2, 32), dtype=np.int32) for _ in range(2)]
    args = cli.build_parser().parse_args(FLAGS)
    chess_flag.check_flags(args, argparse.ArgumentParser())
    loaded = cli.LoadedModel(config, variables, None, "tiny")
    out = chess_flag.apply(args, loaded, 96, lambda recipe, model, n, max_len: (calib, "test"))
    assert sv.VERIFY_COLLECTION in out.variables
    assert activation_sparsity.COLLECTION not in out.variables
    prompts = [[int(t) for t in rng.integers(3, 256, n)] for n in (40, 13, 29, 5)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    ec = cli.engine_config(args, config)

    def run(variables, **changes):
        engine = Engine(config, variables, None, ec.__class__(**{**ec.__dict__, **changes}))
        return [o.token_ids for o in engine.generate(prompts, params)]

    dense = run(variables, num_speculative_tokens=0, sparse_verify=None)
    assert run(out.variables, num_speculative_tokens=0, sparse_verify=None) == dense
    assert run(variables, sparse_verify=None) == dense  # dense verify: greedy = plain decode
    assert run(out.variables) != dense
