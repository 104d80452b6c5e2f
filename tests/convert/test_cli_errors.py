"""CLI failures: one line `<prog> <command>: error: ...` on stderr and exit status 2;
LCJAX_TRACEBACK=1 re-raises with the whole traceback."""

import json
import shutil

import pytest

from lcjax.convert.__main__ import main

PROG = "python -m lcjax.convert"


def _one_error_line(capsys, command):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{PROG} {command}: error: "), lines[0]
    return lines[0]


@pytest.fixture
def bad_config(hub_checkpoint, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(hub_checkpoint[0], src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "hidden_size": "4096"}))
    return src


def test_bad_input_is_one_line_and_status_2(bad_config, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LCJAX_TRACEBACK", raising=False)
    assert main(["hf-to-lcjax", str(bad_config), str(tmp_path / "dst")]) == 2
    line = _one_error_line(capsys, "hf-to-lcjax")
    assert f"{bad_config / 'config.json'}: field 'hidden_size' = '4096' is not an integer" in line
    assert main(["lcjax-to-hf", str(tmp_path / "nothing"), str(tmp_path / "hf")]) == 2
    assert "is not an lcjax checkpoint" in _one_error_line(capsys, "lcjax-to-hf")
    assert not (tmp_path / "dst").exists() and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("text, message", [
    ("model:\n  hidden_size: '64'\n", "config key 'model.hidden_size' expects an integer, got '64'"),
    ("model: {hidden_size: 64\n", "not valid YAML"),
])
def test_bad_config_yaml_names_the_file(tmp_path, capsys, monkeypatch, text, message):
    monkeypatch.delenv("LCJAX_TRACEBACK", raising=False)
    (tmp_path / "lc" / "variables").mkdir(parents=True)
    (tmp_path / "lc" / "config.yaml").write_text(text)
    assert main(["lcjax-to-hf", str(tmp_path / "lc"), str(tmp_path / "hf")]) == 2
    assert f"{tmp_path / 'lc' / 'config.yaml'}: {message}" in _one_error_line(capsys, "lcjax-to-hf")


def test_existing_destination_is_one_line(hub_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LCJAX_TRACEBACK", raising=False)
    (tmp_path / "dst").mkdir()
    assert main(["hf-to-lcjax", str(hub_checkpoint[0]), str(tmp_path / "dst")]) == 2
    assert "already exists (pass overwrite=True / --overwrite)" in _one_error_line(capsys, "hf-to-lcjax")


def test_traceback_env_reraises(bad_config, tmp_path, monkeypatch):
    monkeypatch.setenv("LCJAX_TRACEBACK", "1")
    with pytest.raises(ValueError, match="field 'hidden_size' = '4096' is not an integer"):
        main(["hf-to-lcjax", str(bad_config), str(tmp_path / "dst")])


def test_usage_errors_return_2(capsys):
    assert main(["lcjax-to-hf", "only-src"]) == 2
    assert "the following arguments are required: dst" in capsys.readouterr().err
    assert main(["--help"]) == 0
