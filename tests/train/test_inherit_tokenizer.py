"""A fine-tune started from a training run reads its data with that run's tokenizer."""

import dataclasses

from lcjax.config_io import load_config, resolve_config_path
from lcjax.train.data_setup import inherit_tokenizer


def _config(run_dir, init_from=""):
    cfg = load_config(resolve_config_path("tiny"))
    return dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, run_dir=str(run_dir), init_from=str(init_from)))


def test_copies_the_init_runs_tokenizer_once(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.yaml").write_text("model: {}\n")
    (base / "tokenizer.json").write_text('{"base": true}')
    run = tmp_path / "ft"
    assert inherit_tokenizer(_config(run, base))
    assert (run / "tokenizer.json").read_text() == '{"base": true}'
    (base / "tokenizer.json").write_text('{"changed": true}')
    assert not inherit_tokenizer(_config(run, base))  # a run's own tokenizer is never replaced
    assert (run / "tokenizer.json").read_text() == '{"base": true}'


def test_no_init_run_or_a_hugging_face_directory_copies_nothing(tmp_path):
    assert not inherit_tokenizer(_config(tmp_path / "a"))
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "tokenizer.json").write_text("{}")  # no config.yaml: not an lcjax run
    assert not inherit_tokenizer(_config(tmp_path / "b", hf))
    assert not (tmp_path / "b" / "tokenizer.json").exists()
