"""`python -m lcjax.serve`: flags, model sources (training run, HF directory, random), and a real
process that prints its URL and ready line, serves, and drains on Ctrl-C with exit status 0."""

import contextlib
import dataclasses
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest

from lcjax.config_io import dump_config
from lcjax.serve import cli, loading

REPO = pathlib.Path(__file__).resolve().parents[2]


def parse(*argv):
    return cli.build_parser().parse_args(list(argv))


def _tokenizer(directory):
    from lcjax.data.tokenizer import train_or_load_tokenizer
    texts = ["def main():\n    return 0\n", "import os, sys\nprint('hello world')\n"] * 20
    return train_or_load_tokenizer(directory, 259, texts)  # bytes + specials: the tiny model's 259


def _same(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_flags():
    args = parse("--max-num-seqs", "4", "--max-model-len", "256", "--page-size", "8", "--port", "0",
                 "--num-speculative-tokens", "1", "--api-key", "k", "--host", "0.0.0.0")
    assert (args.max_num_seqs, args.max_model_len, args.page_size, args.port) == (4, 256, 8, 0)
    assert (args.num_speculative_tokens, args.api_key, args.host) == (1, "k", "0.0.0.0")
    assert parse().host == "127.0.0.1"
    with pytest.raises(SystemExit):
        parse("--checkpoint", "a", "--hf-model", "b")  # one model source at a time


@pytest.mark.parametrize("argv,message", [
    (["--quant", "fp8"], r"--quant fp8: unknown quantization recipe 'fp8': expected one of \[.*'w8a8'"),
    (["--quant", "w8a8:bits=3"], r"--quant w8a8:bits=3: recipe override 'bits' is not a recipe setting"),
    (["--quant", "w8a8", "--quant-calib-batches", "0"], r"--quant-calib-batches 0: must be >= 1"),
])
def test_bad_quant_flags_are_rejected_before_loading(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_model", lambda args: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and re.search(message, err), err
    if "fp8" in argv:  # the error names every valid recipe
        from lcjax.quant import RECIPES
        assert all(name in err for name in RECIPES)


def test_config_with_a_checkpoint_is_an_error(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--config", "tiny", "--checkpoint", "runs/x"])
    assert "--config" in capsys.readouterr().err


def test_port_in_use_is_a_one_line_error(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code = cli.main(["--port", str(taken.getsockname()[1]), "--log-level", "warning"])
    assert code == 2 and "error" in capsys.readouterr().err


def test_load_run_and_the_default_run(tiny_model, tmp_path, monkeypatch, capsys):
    from lcjax.train.checkpoint import RunCheckpoints
    from lcjax.train.state import TrainState

    config, variables, _ = tiny_model
    run_dir = tmp_path / "runs" / "stdlib_tiny"  # where `python -m lcjax.train` writes by default
    run_dir.mkdir(parents=True)
    dump_config(config, run_dir / "config.yaml")
    tokenizer = _tokenizer(run_dir)
    state = TrainState(step=jnp.array(3, jnp.int32), params=variables["params"], opt_state={"mu": jnp.zeros(2)},
                       router_bias=variables["router_bias"], rng=jnp.zeros(2, jnp.uint32))
    checkpoints = RunCheckpoints(str(run_dir), keep=1, async_save=False)
    checkpoints.save(3, state, {"position": 0})
    checkpoints.close()

    got_config, got_variables, got_tokenizer = loading.load_run(run_dir)
    assert got_config == config
    _same(got_variables, variables)
    assert got_tokenizer.encode("print(1)") == tokenizer.encode("print(1)")

    monkeypatch.chdir(tmp_path)  # no flags: the default training run, when it has a checkpoint
    model = cli.load_model(parse())
    assert model.config == config and model.name == "stdlib_tiny" and model.run_dir == run_dir

    # --quant calibrates on the run's training batches; random ids once its data is gone.
    from lcjax.config import DataConfig
    from lcjax.quant import get_recipe

    assert cli.calibration_batches(get_recipe("w8a8"), model, 2, 512) == (None, "none needed")
    batches, source = cli.calibration_batches(get_recipe("fptq_w4a8"), model, 2, 512)
    assert source == "2 training batches of stdlib_tiny" and len(batches) == 2
    assert batches[0]["inputs"].shape == (config.data.global_batch, config.data.seq_len)
    assert batches[0]["inputs"].max() < tokenizer.vocab_size
    gone = dataclasses.replace(config, data=DataConfig(source="text", path=str(tmp_path / "gone" / "*.txt")))
    batches, source = cli.calibration_batches(get_recipe("fptq_w4a8"), model._replace(config=gone), 3, 64)
    assert source == "3 batches of random token ids [4, 64]" and batches[0].shape == (4, 64)
    assert "does not load" in capsys.readouterr().err

    with pytest.raises(ValueError, match="config.yaml is missing"):
        loading.load_run(tmp_path)


def test_no_flags_and_no_run_means_random_tiny_with_a_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    seen = {}

    def fake_random_model(config, seed):  # the init itself is covered by the process test
        seen.update(config=config, seed=seed)
        return config, {}, loading.ByteTokenizer()

    monkeypatch.setattr(loading, "random_model", fake_random_model)
    model = cli.load_model(parse("--seed", "5"))
    err = capsys.readouterr().err
    assert "no checkpoint in runs/stdlib_tiny" in err and "RANDOMLY INITIALISED tiny" in err
    assert model.name == "lcjax-random-tiny" and model.run_dir is None
    assert seen["seed"] == 5 and seen["config"].model.hidden_size == 48


def test_byte_tokenizer_of_random_models():
    tokenizer = loading.ByteTokenizer()
    ids = tokenizer.encode("héllo </s>")
    assert min(ids) >= 3 and max(ids) < tokenizer.vocab_size  # never the special ids
    assert tokenizer.decode(ids + [tokenizer.eos_id]) == "héllo </s>"


def test_hf_model_directory(tiny_model, tmp_path):
    from lcjax.convert import save_hf_checkpoint

    config, variables, _ = tiny_model
    hub = tmp_path / "hub"
    save_hf_checkpoint(variables, config, hub)
    tokenizer = _tokenizer(tmp_path)
    tokenizer.save(hub)
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
    (hub / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "</s>"}, "bos_token": "<s>", "chat_template": template}))

    got_config, got_variables, got_tokenizer, name, run_dir = cli.load_model(parse("--hf-model", str(hub)))
    assert name == "hub" and run_dir is None and got_config.model.vocab_size == config.model.vocab_size
    _same(got_variables, variables)
    assert (got_tokenizer.eos_id, got_tokenizer.bos_id, got_tokenizer.chat_template) == (2, 1, template)
    text = "x = [1, 2]"
    assert got_tokenizer.decode(got_tokenizer.encode(text)) == text
    from lcjax.serve.chat_template import resolve_chat_template
    rendered = resolve_chat_template(None, got_tokenizer).render([{"role": "user", "content": "hi"}])
    assert rendered == "[user] hi"


@contextlib.contextmanager
def serve_process(tmp_path, *flags):
    """`python -m lcjax.serve` in a child process on a random model (the tmp cwd holds no
    training run), tiny trimmed to one layer without n-grams, LoZA or MTP so it compiles
    quickly. Yields (process, stdout lines up to the ready line, openai client of its /v1);
    kills it if still running afterwards."""
    (tmp_path / "small.yaml").write_text(
        "model: {num_layers: 1, ngram: {enabled: false}, loza: {layer_pattern: ''}, mtp_layers: 0}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "LCJAX_TYPECHECK": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lcjax.serve", "--port", "0", "--config", "tiny", "--config", "small.yaml",
         "--max-num-seqs", "1", "--max-model-len", "320", "--prefill-chunk", "16", "--log-level", "warning",
         "--served-model-name", "cli-test", *flags],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        timer = threading.Timer(180, proc.kill)  # a hung start fails the test instead of CI
        timer.start()
        for line in proc.stdout:
            lines.append(line)
            if line.strip() == "lcjax.serve: ready":
                break
        timer.cancel()
        assert lines and lines[-1].strip() == "lcjax.serve: ready", (lines, proc.stderr.read())
        url = re.search(r"serving cli-test at (http://127\.0\.0\.1:\d+/v1)", "".join(lines)).group(1)
        yield proc, lines, openai.OpenAI(base_url=url, api_key="none", max_retries=0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_serve_process_ready_serves_and_drains_on_ctrl_c(tmp_path):
    with serve_process(tmp_path) as (proc, _, client):
        # Ctrl-C while a long stream runs: the stream still completes, then the process exits 0.
        stream = client.completions.create(model="cli-test", prompt="drain", max_tokens=300, stream=True,
                                           extra_body={"ignore_eos": True},
                                           stream_options={"include_usage": True})
        chunks = iter(stream)
        first = next(chunks)
        proc.send_signal(signal.SIGINT)
        rest = list(chunks)
        assert rest[-1].usage.completion_tokens == 300
        assert [first, *rest][-2].choices[0].finish_reason == "length"
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "lcjax.serve: stopped" in out and "RANDOMLY INITIALISED tiny + small.yaml" in err


@pytest.mark.slow  # a second server process; quantized serving runs in-process in tests/quant
def test_serve_process_with_quant(tmp_path):
    """--quant with a calibrating recipe (FPTQ W4A8: random-token calibration, int4 groups,
    static and per-token int8 activations) serves completions through the openai client."""
    with serve_process(tmp_path, "--quant", "fptq_w4a8:group_size=8", "--quant-calib-batches", "2") as (
            proc, lines, client):
        text = "".join(lines)
        assert "quantizing with fptq_w4a8:group_size=8 (calibration: 2 batches of random token ids" in text
        assert re.search(r"quantized \d+ weights", text)
        out = client.completions.create(model="cli-test", prompt="int4", max_tokens=5, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "length"
        chat = client.chat.completions.create(model="cli-test", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=3, stream=True, extra_body={"ignore_eos": True},
                                              stream_options={"include_usage": True})
        assert list(chat)[-1].usage.completion_tokens == 3
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err


def test_quant_group_size_error_is_one_line_with_a_hint(tiny_model, capsys):
    config, variables, tokenizer = tiny_model
    model = cli.LoadedModel(config, variables, tokenizer, "t")
    with pytest.raises(ValueError, match=r"layers/\w+/\w+: group_size=128 does not divide .*"
                                         r"--quant w4a16:group_size=G\)"):
        cli.quantize(parse("--quant", "w4a16"), model, 64)


def test_engine_config_from_flags(tiny_model):
    config, _, _ = tiny_model
    ec = cli.engine_config(parse("--max-num-seqs", "3", "--page-size", "8", "--prefill-chunk", "32",
                                 "--max-prefill-seqs", "2"), config)
    assert (ec.max_num_seqs, ec.page_size, ec.prefill_chunk, ec.max_model_len) == (3, 8, 32, 512)
    assert ec.max_prefill_seqs == 2
    small = dataclasses.replace(config, model=dataclasses.replace(config.model, max_position_embeddings=256))
    assert cli.engine_config(parse(), small).max_model_len == 256


def test_compilation_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cli.compilation_cache_dir(None) == tmp_path / "xdg" / "lcjax" / "xla"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))  # a set env var wins
    assert cli.compilation_cache_dir(None) == tmp_path / "env"
    assert cli.compilation_cache_dir(str(tmp_path / "flag")) == tmp_path / "flag"  # the flag wins
    assert cli.compilation_cache_dir("none") is None
    assert parse("--compilation-cache", "none").compilation_cache == "none"
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError, match=r"--compilation-cache .*file/sub: cannot create the folder"):
        cli.enable_compilation_cache(blocker / "sub")
