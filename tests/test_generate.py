"""`python -m lcjax.generate`: streamed text equals a plain forward-pass greedy loop; errors."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax import generate
from lcjax.config_io import load_config, resolve_config_path
from lcjax.model import LongCatModel
from lcjax.serve.loading import random_model


def _greedy_by_forward(prompt_ids, steps):
    """Reference: argmax of the full causal forward pass (no cache) over the growing sequence,
    kept in one padded [1, P + steps] shape so it compiles once."""
    config, variables, _ = random_model(load_config([resolve_config_path("tiny")]), seed=0)
    forward = jax.jit(LongCatModel(config.model).apply)
    ids = np.zeros((1, len(prompt_ids) + steps), np.int32)
    ids[0, :len(prompt_ids)] = prompt_ids
    for n in range(len(prompt_ids), len(prompt_ids) + steps):
        logits = forward(variables, jnp.asarray(ids))
        ids[0, n] = int(np.argmax(np.asarray(logits[0, n - 1])))
    return ids[0, len(prompt_ids):].tolist()


def test_greedy_stream_matches_the_forward_pass(capsys):
    out = io.StringIO()
    args = generate.build_parser().parse_args(
        ["--config", "tiny", "--max-tokens", "6", "--ignore-eos", "def f(x):"])
    assert generate.run(args, out=out) == 0
    from lcjax.serve.loading import ByteTokenizer
    tok = ByteTokenizer()
    expected = "def f(x):" + tok.decode(_greedy_by_forward(tok.encode("def f(x):"), 6))
    assert out.getvalue() == expected + "\n"
    assert "[6 tokens, finish: length]" in capsys.readouterr().err


@pytest.mark.slow  # a second engine
def test_stdin_prompt_and_several_samples():
    out = io.StringIO()
    args = generate.build_parser().parse_args(
        ["--config", "tiny", "--max-tokens", "4", "--temperature", "1.0", "--num-samples", "2",
         "--no-stream", "-"])
    assert generate.run(args, stdin=io.StringIO("import os\n"), out=out, err=io.StringIO()) == 0
    text = out.getvalue()
    assert text.count("--- sample") == 2 and text.count("import os\n") == 2


@pytest.mark.parametrize("argv, message", [
    (["--config", "tiny", "--temperature", "-1", "hi"], "temperature"),
    (["--config", "tiny", "--max-model-len", "3", "a long prompt"], "max-model-len=3"),
    (["--checkpoint", "/nonexistent/run", "hi"], "/nonexistent/run"),
])
def test_errors_are_one_line_and_exit_2(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("LCJAX_TRACEBACK", raising=False)
    assert generate.main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("lcjax.serve: WARN")]
    assert len(err) == 1 and err[0].startswith("lcjax.generate: error:") and message in err[0], err


def test_bad_flags_are_usage_errors():
    with pytest.raises(SystemExit) as exit_:
        generate.main(["--max-tokens", "0", "hi"])
    assert exit_.value.code == 2
