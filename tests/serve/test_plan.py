"""Serving memory plans: exact bytes for the tiny model, the published deployments, the CLI.

The 8-device check (plan == bytes actually placed per device, float and int4) runs in the
child process of tests/convert/test_sharded_load.py.
"""

import jax
import numpy as np
import pytest

from lcjax.config import MeshConfig
from lcjax.config_io import load_config, resolve_config_path
from lcjax.quant.apply import quantize_model
from lcjax.serve.kv_cache import init_serve_cache
from lcjax.serve.loading import random_model
from lcjax.serve.plan import (DEVICE_MEMORY, GB, check_fits, format_plan, main, memory_plan,
                              parse_device_memory)

SERVE = ("model.param_dtype=bfloat16", "model.dtype=bfloat16")


@pytest.fixture(scope="module")
def tiny():
    config, variables, _ = random_model(load_config([resolve_config_path("tiny")]))
    return config, variables


def nbytes(tree) -> int:
    return sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("recipe", [None, "w8a8", "w4a16:group_size=8"])
def test_one_device_plan_is_the_bytes_of_the_variables(tiny, recipe):
    config, variables = tiny
    if recipe:
        variables = {**variables, "params": quantize_model(variables["params"], config, recipe)}
    plan = memory_plan(config, None, 1, recipe)
    assert plan.param_bytes == plan.param_bytes_total == nbytes(variables)


def test_eight_device_plan_splits_the_weights(tiny):
    config, _ = tiny
    one = memory_plan(config, None, 1)
    eight = memory_plan(config, MeshConfig(data=1, expert=4, tensor=2), 8)
    assert eight.param_bytes_total == one.param_bytes
    assert one.param_bytes / 8 <= eight.param_bytes < one.param_bytes / 3
    assert eight.cache_bytes_per_sequence == one.cache_bytes_per_sequence  # replicated


@pytest.mark.parametrize("spec_tokens", [0, 3])
def test_cache_bytes_are_what_the_engine_allocates(tiny, spec_tokens):
    config, _ = tiny
    max_len, page = 40, 8
    plan = memory_plan(config, None, 1, None, max_len, page, num_speculative_tokens=spec_tokens)
    for seqs in (1, 3):
        pages = seqs * plan.pages_per_sequence + 1
        cache = init_serve_cache(config.model, seqs, pages, page)
        assert cache.nbytes() == plan.cache_reserved_bytes + seqs * plan.cache_bytes_per_sequence


def test_sequences_that_fit_and_the_page_pool(tiny):
    config, _ = tiny
    base = memory_plan(config, None, 1, None, 64, 16)
    device = int((base.param_bytes + base.cache_reserved_bytes + 5.5 * base.cache_bytes_per_sequence) / 0.9) + 1
    plan = memory_plan(config, None, 1, None, 64, 16, device)
    assert plan.max_sequences == 5 and plan.fits
    assert plan.num_pages == 5 * plan.pages_per_sequence + 1
    check_fits(plan)
    assert not memory_plan(config, None, 1, None, 64, 16, plan.param_bytes).fits


DEPLOYMENTS = [  # (config, recipe, devices, device, max_model_len)
    ("longcat_flash", "w8a8", 8, "h200", None),
    ("longcat_flash", "w4a16", 8, "h100", None),
    ("longcat_flash_lite", None, 2, "h100", 32768),
]


@pytest.mark.parametrize("name,recipe,devices,device,max_len", DEPLOYMENTS)
def test_published_deployments_fit(name, recipe, devices, device, max_len):
    config = load_config([resolve_config_path(name)], SERVE)
    plan = memory_plan(config, MeshConfig(data=1, expert=-1), devices, recipe, max_len,
                       device_bytes=parse_device_memory(device))
    check_fits(plan)
    assert plan.max_sequences >= 2
    assert plan.param_bytes < 1.01 * plan.param_bytes_total / devices  # every big weight is split
    assert f"{devices} devices" in format_plan(plan)


def test_flash_bf16_on_one_h100_names_the_numbers():
    config = load_config([resolve_config_path("longcat_flash")], SERVE)
    plan = memory_plan(config, None, 1, device_bytes=parse_device_memory("h100"))
    assert 1100 * GB < plan.param_bytes < 1150 * GB  # 560B parameters x 2 bytes
    with pytest.raises(ValueError, match=r"parameters need 1123\.7 GB per device.*a device has 85\.5 GB"):
        check_fits(plan)


def test_cli_prints_the_table_and_exits_2_when_it_does_not_fit(capsys):
    assert main(["--config", "longcat_flash", "--devices", "8", "--device-memory", "141GB",
                 "--quant", "w8a8", "mesh.data=1", "mesh.expert=-1"]) == 0
    out = capsys.readouterr().out  # the server's weight-stationary default: dense weights whole
    assert "(rules ep_tp)" in out and "parameters per device" in out and "91.06 GB" in out
    assert main(["--config", "longcat_flash", "--devices", "8", "--device-memory", "141GB",
                 "--quant", "w8a8", "mesh.data=1", "mesh.expert=-1", "parallel.rules=ep_fsdp_tp"]) == 0
    out = capsys.readouterr().out  # dense weights split over expert: 8x smaller
    assert "(rules ep_fsdp_tp)" in out and "70.65 GB" in out
    assert main(["--config", "longcat_flash", "--devices", "1", "--device-memory", "h100"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "1123.7 GB per device" in err and "85.5 GB" in err


def test_device_memory_names_and_sizes():
    assert parse_device_memory("H200") == DEVICE_MEMORY["h200"]
    assert parse_device_memory("141GB") == 141 * 10**9
    assert parse_device_memory("80GiB") == 80 * 2**30
    for bad in ("h300", "-1GB", "lots"):
        with pytest.raises(ValueError, match="device memory"):
            parse_device_memory(bad)
