"""`python -m lcjax.serve --plan` and the memory check every launch runs before loading weights."""

import dataclasses

import pytest

from lcjax.serve import cli, launch_plan
from lcjax.serve.plan import GB


@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to load weights fails the test."""
    def refuse(*_args, **_kw):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(cli, "load_model", refuse)


def test_plan_prints_the_table_and_loads_nothing(no_loading, capsys):
    assert cli.main(["--plan", "--config", "tiny", "--max-model-len", "64", "--page-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "tiny (random): 1 devices, mesh data=1" in out
    assert "KV cache per sequence (64 tokens" in out
    assert "fits" not in out  # no device memory on CPU unless given


def test_plan_of_a_large_model_on_a_mesh_with_a_recipe(no_loading, capsys):
    argv = ["--plan", "--config", "longcat_flash", "--device-memory", "h200", "--quant", "w8a8",
            "--max-model-len", "4096", "mesh.expert=8"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "8 devices, mesh data=1 fsdp=1 expert=8 tensor=1 (rules ep_tp), weights w8a8" in out
    fits = out.splitlines()[-1].split()
    assert fits == ["fits", "yes"], out


def test_a_plan_that_does_not_fit_is_exit_2_with_one_line(no_loading, capsys):
    assert cli.main(["--plan", "--config", "longcat_flash", "--device-memory", "h100"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lcjax.serve: error: memory plan does not fit: "
                                               "parameters need")
    # A normal launch stops the same way, before loading anything.
    assert cli.main(["--config", "tiny", "--device-memory", "1MB"]) == 2
    assert "memory plan does not fit" in capsys.readouterr().err


def test_bad_device_memory_is_one_line(no_loading, capsys):
    assert cli.main(["--plan", "--device-memory", "lots"]) == 2
    assert "device memory 'lots' is neither a device name" in capsys.readouterr().err


def test_checkpoint_plan_reads_only_the_config(tmp_path, no_loading, capsys):
    assert cli.main(["--plan", "--checkpoint", str(tmp_path)]) == 2
    assert "config.yaml is missing" in capsys.readouterr().err


def _args(*argv):
    return cli.build_parser().parse_args(list(argv))


def test_num_pages_rule_takes_the_smaller_of_slots_and_memory():
    args = _args("--config", "tiny", "--max-model-len", "64", "--page-size", "8",
                 "--max-num-seqs", "8")
    mesh, par = cli.serving_settings(args)
    plan, _ = launch_plan.launch_plan(args, mesh, par, None)
    assert launch_plan.planned_num_pages(plan, 8) is None  # no device memory: the engine's default
    per_seq = plan.pages_per_sequence
    assert per_seq == 8
    # Memory for exactly 3 sequences beside the weights and the 10 % headroom.
    need = plan.param_bytes + plan.cache_reserved_bytes + 3 * plan.cache_bytes_per_sequence
    device = int(need / 0.9) + 2
    small = dataclasses.replace(plan, device_bytes=device)
    assert small.max_sequences == 3
    assert launch_plan.planned_num_pages(small, 8) == 3 * per_seq + 1
    big = dataclasses.replace(plan, device_bytes=100 * GB)
    assert launch_plan.planned_num_pages(big, 8) == 8 * per_seq + 1

    pages = cli.memory_check(_args("--config", "tiny", "--max-model-len", "64", "--page-size", "8",
                                   "--device-memory", str(device)), mesh, par)
    assert pages == 3 * per_seq + 1
    ec = cli.engine_config(args, plan_config(args), pages)
    assert ec.num_pages == pages
    explicit = _args("--config", "tiny", "--num-pages", "50")
    assert cli.engine_config(explicit, plan_config(explicit), pages).num_pages == 50


def plan_config(args):
    return launch_plan.model_config(args)[0]


def test_weight_stationary_rules_by_default_and_the_fsdp_split_when_they_do_not_fit(capsys):
    sharding = ("mesh.expert=4", "mesh.tensor=2")
    flags = ("--config", "tiny", "--max-model-len", "64", "--page-size", "8")
    args = _args(*flags, *sharding)
    mesh, par = cli.serving_settings(args)
    assert par.rules == cli.SERVING_RULES == "ep_tp"
    stationary, _ = launch_plan.launch_plan(args, mesh, par, None)
    split, _ = launch_plan.launch_plan(
        args, mesh, dataclasses.replace(par, rules=cli.SERVING_FALLBACK_RULES), None)
    assert split.param_bytes < stationary.param_bytes  # dense weights split over expert
    # Room for one sequence with the split weights, none with the replicated ones.
    need = split.param_bytes + split.cache_reserved_bytes + split.cache_bytes_per_sequence
    device = str(int(need / 0.9) + 2)
    assert not dataclasses.replace(stationary, device_bytes=int(device)).fits
    chosen = cli.fit_rules(_args(*flags, "--device-memory", device, *sharding), mesh, par)
    assert chosen.rules == "ep_fsdp_tp" and "splitting them (ep_fsdp_tp)" in capsys.readouterr().out
    roomy = cli.fit_rules(_args(*flags, "--device-memory", str(100 * GB), *sharding), mesh, par)
    assert roomy.rules == "ep_tp"
    # Rules the user names are kept (memory_check then reports the misfit).
    named = _args(*flags, "--device-memory", device, *sharding, "parallel.rules=ep_tp")
    mesh, par = cli.serving_settings(named)
    assert cli.fit_rules(named, mesh, par).rules == "ep_tp"
