"""The memory plan with A²ATS codes / host offload and sparse-verify page bounds: bytes against a
hand count and against what the engine allocates, device and host budgets, the CLI wiring, and
(slow) an engine that admits 8 sequences with offload where exact serving admits 2."""

import argparse
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.config_io import load_config, resolve_config_path
from lcjax.serve import cli, engine_state, launch_plan
from lcjax.serve.kv_cache import init_serve_cache
from lcjax.serve.plan import check_fits, main, memory_plan, parse_size
from lcjax.serve.plan_kv import HOST_MEMORY_FRACTION, default_host_memory, kv_settings
from lcjax.sparsity.a2ats import A2ATSConfig, Codebook
from lcjax.sparsity.a2ats_calibrate import A2ATSIndex
from lcjax.sparsity import host_offload
from lcjax.sparsity.host_offload import HOST_KIND, device_bytes, host_memory_kind
from lcjax.sparsity.sparse_verify import SparseVerifyConfig

MAX_LEN, PAGE, K = 40, 8, 16
HOST = A2ATSConfig(codebook_size=K, offload="host")


@pytest.fixture(scope="module")
def tiny():
    return load_config([resolve_config_path("tiny")])


def hand_count(cfg, retrieval, bounds=False):
    """(device per seq, device reserved, host per seq, host reserved, codebooks), counted from the
    tiny preset's numbers: 2 full + 2 LoZA sublayers, MTP, float32, latent 16 + rope 4."""
    assert cfg.sparse_layers == (False, True, True, False) and cfg.dtype == "float32"
    width, full, pages = 16 + 4, 2, math.ceil(MAX_LEN / PAGE)
    pool_page = PAGE * width * 4
    ring = 2 * (1 + 2 + 1) * 8 * (width * 4 + 4)  # 2 sparse x (window + spare block) x (row + pos)
    history = 2 * 4  # n-gram: neighbor_num - 1 int32 ids
    codes = full * PAGE * 2 if retrieval else 0  # int16 codes
    bound = full * 2 * width * 4 if bounds else 0  # [2, C+R] float32 per page
    offload = retrieval is not None and retrieval.offload == "host"
    device_page = pool_page * (1 + (0 if offload else full)) + codes + bound  # MTP pool stays
    host_page = full * pool_page if offload else 0
    books = full * (2 * K * width + width * width) * 4 if retrieval else 0
    return pages * device_page + ring + history, device_page, pages * host_page, host_page, books


@pytest.mark.parametrize("retrieval,bounds", [(None, False), (None, True),
                                              (A2ATSConfig(codebook_size=K), False), (HOST, False)])
def test_plan_bytes_equal_a_hand_count(tiny, retrieval, bounds):
    plan = memory_plan(tiny, None, 1, None, MAX_LEN, PAGE, retrieval=retrieval, page_bounds=bounds)
    got = (plan.cache_bytes_per_sequence, plan.cache_reserved_bytes,
           plan.host_cache_bytes_per_sequence, plan.host_cache_reserved_bytes, plan.codebook_bytes)
    assert got == hand_count(tiny.model, retrieval, bounds)
    assert plan.offload == (retrieval is HOST)
    assert plan.bounds_bytes_per_sequence == (5 * 2 * 2 * 20 * 4 if bounds else 0)


def _index(cfg, retrieval):
    width = cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim
    book = Codebook(jnp.zeros((K, width)), jnp.zeros((K, width)), jnp.eye(width))
    return A2ATSIndex(books=tuple(None if s else book for s in cfg.sparse_layers),
                      rope=cfg.mla.rope, config=retrieval)


@pytest.mark.skipif(host_memory_kind() is None, reason="no pinned_host memory on this device")
@pytest.mark.parametrize("retrieval", [A2ATSConfig(codebook_size=K), HOST])
def test_plan_bytes_are_what_the_engine_allocates_on_device_and_host(tiny, retrieval):
    plan = memory_plan(tiny, None, 1, None, MAX_LEN, PAGE, retrieval=retrieval)
    for seqs in (1, 3):
        pages = seqs * plan.pages_per_sequence + 1
        cache = _index(tiny.model, retrieval).attach(
            init_serve_cache(tiny.model, seqs, pages, PAGE), pages, PAGE)
        host = cache.nbytes() - device_bytes(cache)
        assert device_bytes(cache) == (plan.cache_reserved_bytes + plan.codebook_bytes
                                       + seqs * plan.cache_bytes_per_sequence)
        assert host == plan.host_cache_reserved_bytes + seqs * plan.host_cache_bytes_per_sequence
        assert (host > 0) == (retrieval.offload == "host")
        assert all(x.sharding.memory_kind == HOST_KIND for x in cache.layers
                   if isinstance(x, jax.Array)) == (retrieval.offload == "host")



@pytest.mark.skipif(host_memory_kind() is None, reason="no pinned_host memory on this device")
def test_host_pools_are_born_on_host_and_attach_keeps_them(tiny):
    """init_serve_cache(host_pools=True) puts each full sublayer's pool in host memory and leaves
    rings, the MTP pool and bounds on the device; attach(offload=host) keeps those very arrays
    and ends with the same placement and bytes as moving device pools."""
    cfg, pages = tiny.model, 5
    cache = init_serve_cache(cfg, 2, pages, PAGE, bounds=True, host_pools=True)
    for layer, sparse in zip(cache.layers, cfg.sparse_layers):
        kinds = {x.sharding.memory_kind for x in jax.tree.leaves(layer)}
        assert kinds == ({"device"} if sparse else {host_memory_kind()})
    assert cache.mtp.sharding.memory_kind == "device"
    assert {b.sharding.memory_kind for b in cache.bounds if b is not None} == {"device"}
    assert not any(np.asarray(x).any() for x, s in zip(cache.layers, cfg.sparse_layers) if not s)
    attached = _index(cfg, HOST).attach(cache, pages, PAGE)
    assert all(a is b for a, b in zip(attached.layers, cache.layers))
    moved = _index(cfg, HOST).attach(init_serve_cache(cfg, 2, pages, PAGE, bounds=True), pages,
                                     PAGE)
    placed = lambda c: [(x.shape, x.dtype, x.sharding.memory_kind) for x in jax.tree.leaves(c)]
    assert placed(attached) == placed(moved)
    assert device_bytes(attached) == device_bytes(moved)


@pytest.mark.skipif(host_memory_kind() is None, reason="no pinned_host memory on this device")
@pytest.mark.parametrize("offload", ["none", "host"])
def test_offload_engine_never_moves_a_device_pool(tiny, monkeypatch, offload):
    """Engine(kv_retrieval=offload=host) builds its full pools on host: attach is handed no
    device array to move, so the device never holds them (greedy output equal to exact:
    tests/sparsity/test_a2ats_serve.py, slow)."""
    from lcjax.serve.engine import Engine, EngineConfig
    from lcjax.serve.loading import random_model
    from lcjax.sparsity import a2ats_cache
    handed = []
    monkeypatch.setattr(a2ats_cache, "to_host", lambda x: handed.append(x.sharding.memory_kind)
                        or host_offload.to_host(x))
    config, variables, _ = random_model(tiny)
    index = _index(tiny.model, A2ATSConfig(codebook_size=K, offload=offload))
    engine = Engine(config, variables, None, EngineConfig(max_num_seqs=2, max_model_len=MAX_LEN,
                                                          page_size=PAGE), kv_retrieval=index)
    kinds = {engine.state.cache.layers[i].sharding.memory_kind
             for i, s in enumerate(tiny.model.sparse_layers) if not s}
    assert kinds == {HOST_KIND if offload == "host" else "device"}
    full = sum(not s for s in tiny.model.sparse_layers)
    assert handed == ([HOST_KIND] * full if offload == "host" else [])

def test_page_bounds_follow_the_engine_rule(tiny, monkeypatch):
    """kv_settings asks engine_state.page_bounds_needed; the counted bounds are what
    init_serve_cache(bounds=True) allocates."""
    args = argparse.Namespace(kv_retrieval="none", a2ats="", sparse_verify="", host_memory=None)
    rule = engine_state.page_bounds_needed(SparseVerifyConfig(), False)
    assert kv_settings(args)["page_bounds"] == rule
    plan = memory_plan(tiny, None, 1, None, MAX_LEN, PAGE, num_speculative_tokens=1,
                       **kv_settings(args))
    pages = 2 * plan.pages_per_sequence + 1
    cache = init_serve_cache(tiny.model, 2, pages, PAGE, bounds=rule)
    assert cache.nbytes() == plan.cache_reserved_bytes + 2 * plan.cache_bytes_per_sequence
    assert (plan.bounds_bytes_per_sequence > 0) == rule
    with_retrieval = argparse.Namespace(kv_retrieval="a2ats", a2ats="", sparse_verify="")
    assert kv_settings(with_retrieval)["page_bounds"] == engine_state.page_bounds_needed(
        SparseVerifyConfig(), True)
    monkeypatch.setattr(engine_state, "page_bounds_needed", lambda sv, kv: False)
    assert kv_settings(args)["page_bounds"] is False
    assert kv_settings(argparse.Namespace(sparse_verify=None))["page_bounds"] is False


def test_max_sequences_is_the_smaller_of_device_and_host(tiny):
    base = memory_plan(tiny, None, 1, None, MAX_LEN, PAGE, retrieval=HOST)
    device = int((base.param_bytes + base.cache_reserved_bytes + base.codebook_bytes
                  + 20.5 * base.cache_bytes_per_sequence) / 0.9) + 1
    roomy = memory_plan(tiny, None, 1, None, MAX_LEN, PAGE, device, retrieval=HOST)
    assert roomy.host_bytes is None and roomy.max_sequences == roomy.device_sequences == 20
    host = base.host_cache_reserved_bytes + 7 * base.host_cache_bytes_per_sequence + 5
    tight = memory_plan(tiny, None, 1, None, MAX_LEN, PAGE, device, retrieval=HOST, host_bytes=host)
    assert (tight.device_sequences, tight.host_sequences, tight.max_sequences) == (20, 7, 7)
    assert tight.num_pages == 7 * tight.pages_per_sequence + 1
    # Two devices keep two copies of the offloaded pools in one host's memory.
    two = memory_plan(tiny, {"expert": 2}, 2, None, MAX_LEN, PAGE, device, retrieval=HOST,
                      host_bytes=host)
    assert two.host_copies == 2 and two.host_sequences == (host - 2 * base.host_cache_reserved_bytes) // (
        2 * base.host_cache_bytes_per_sequence)
    exact = memory_plan(tiny, None, 1, None, MAX_LEN, PAGE, device)
    assert exact.max_sequences < 20 < exact.max_sequences * 3
    none = memory_plan(tiny, None, 1, None, MAX_LEN, PAGE, device, retrieval=HOST, host_bytes=100)
    assert not none.fits
    with pytest.raises(ValueError, match=r"host memory .* holds 0 sequences.*--host-memory"):
        check_fits(none)


def test_default_host_memory_is_a_fraction_of_the_ram():
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert default_host_memory() == int(ram * HOST_MEMORY_FRACTION)
    args = argparse.Namespace(kv_retrieval="a2ats", a2ats="offload=host", host_memory=None)
    assert kv_settings(args)["host_bytes"] == default_host_memory()
    assert kv_settings(argparse.Namespace(kv_retrieval="a2ats", a2ats="offload=host",
                                          host_memory="2TiB"))["host_bytes"] == 2 * 2**40
    assert kv_settings(argparse.Namespace(kv_retrieval="a2ats", a2ats=""))["host_bytes"] is None
    for bad in ("lots", "-1GB"):
        with pytest.raises(ValueError, match="host memory"):
            parse_size(bad, "host memory")


def test_plan_cli_names_host_memory(capsys):
    argv = ["--config", "longcat_flash", "--devices", "8", "--device-memory", "h200", "--quant",
            "w8a8", "--max-model-len", "131072", "mesh.data=1", "mesh.expert=-1"]
    assert main(argv) == 0
    exact = capsys.readouterr().out
    assert "host memory" not in exact
    assert main(argv + ["--kv-retrieval", "a2ats", "--a2ats", "offload=host", "--host-memory",
                        "2TB"]) == 0
    out = capsys.readouterr().out
    assert "KV retrieval a2ats offload=host" in out and "host memory (--host-memory)" in out
    seqs = "max_model_len sequences that fit"
    assert _row(exact, seqs) == 5 and _row(out, seqs) == 29  # 2 TB / 8 copies of 8.46 GB
    assert _row(out, "sequences the device memory holds") == 262


def _row(table: str, name: str) -> int:
    return int(next(line for line in table.splitlines() if line.strip().startswith(name)).split()[-1])


def _args(*argv):
    return cli.build_parser().parse_args(list(argv))


def test_serve_plan_and_planned_pages_with_offload(capsys):
    flags = ["--config", "tiny", "--max-model-len", "64", "--page-size", "16", "--max-num-seqs", "4"]
    model = ["model.loza.layer_pattern=0000", "model.mtp_layers=0"]  # every pool offloads
    exact_args = _args(*flags, *model)
    mesh, par = cli.serving_settings(exact_args)
    exact, _ = launch_plan.launch_plan(exact_args, mesh, par, None)
    device = str(int((exact.param_bytes + exact.cache_reserved_bytes
                      + 2.5 * exact.cache_bytes_per_sequence) / 0.9) + 1)
    offload = flags + ["--kv-retrieval", "a2ats", "--a2ats", "offload=host,codebook_size=16",
                       "--host-memory", "1GB", "--device-memory", device, *model]
    assert cli.memory_check(_args(*flags, "--device-memory", device, *model), mesh, par) == 2 * 4 + 1
    out = capsys.readouterr().out
    assert "memory plan: 2 sequences" in out and "caps concurrency" not in out
    assert cli.memory_check(_args(*offload), mesh, par) == 4 * 4 + 1  # the slots cap it
    out = capsys.readouterr().out
    assert "(KV pages in host memory)" in out and "--max-num-seqs 4 caps concurrency" in out
    assert cli.main(["--plan", *offload]) == 0
    assert "host memory (--host-memory)" in capsys.readouterr().out


# ------------------------------------------------------------------------------ engine (slow)
@pytest.mark.slow
def test_offload_engine_admits_the_sequences_the_plan_holds():
    """A device budget where exact serving holds 2 sequences: the planned pages admit 2 at a
    time exactly, 8 with host offload, and offload with every key retrieved decodes the same."""
    from lcjax.serve.engine import Engine, EngineConfig
    from lcjax.serve.loading import random_model
    from lcjax.serve.sampling import SamplingParams
    from lcjax.sparsity.a2ats_calibrate import calibrate

    config, variables, _ = random_model(load_config(
        [resolve_config_path("tiny")], ["model.loza.layer_pattern=0000", "model.mtp_layers=0"]))
    toks = jax.random.randint(jax.random.key(1), (1, 64), 3, config.model.vocab_size)
    index = calibrate(config.model, variables, [toks],
                      A2ATSConfig(codebook_size=16, sink_tokens=2, local_window=4,
                                  wrope_position=16, kmeans_iters=5))
    index = index.with_config(topk_fraction=1.0, offload="host")
    max_len, page, slots = 64, 16, 8
    exact = memory_plan(config, None, 1, None, max_len, page)
    device = int((exact.param_bytes + exact.cache_reserved_bytes
                  + 2.5 * exact.cache_bytes_per_sequence) / 0.9) + 1
    plans = {"exact": memory_plan(config, None, 1, None, max_len, page, device),
             "offload": memory_plan(config, None, 1, None, max_len, page, device,
                                    retrieval=index.config, host_bytes=2**30)}
    assert plans["exact"].max_sequences == 2 and plans["offload"].max_sequences >= slots
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(3, 250, 40))) for _ in range(slots)]
    greedy = SamplingParams(max_tokens=max_len - 40, temperature=0.0, ignore_eos=True)
    outputs, peaks = {}, {}
    for name, plan in plans.items():
        ec = EngineConfig(max_num_seqs=slots, max_model_len=max_len, page_size=page,
                          num_pages=launch_plan.planned_num_pages(plan, slots))
        engine = Engine(config, variables, None, ec,
                        kv_retrieval=index if name == "offload" else None)
        ids = [engine.add_request(p, greedy) for p in prompts]
        done, peaks[name] = {}, 0
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.token_ids
            peaks[name] = max(peaks[name], engine.stats().num_running)
        outputs[name] = [done[i] for i in ids]
    assert peaks == {"exact": 2, "offload": slots}
    assert outputs["offload"] == outputs["exact"]
