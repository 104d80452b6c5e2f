"""One serving engine sharded over 8 host devices gives the one-device engine's greedy tokens.

XLA fixes the CPU device count when the backend starts, so the 8-device tests run in a child
interpreter with `--xla_force_host_platform_device_count=8` (the two runner tests below); in
the parent they skip. Both runners are in the `slow` pass: one child runs tensor 2 x expert 4,
the other tensor 8, MTP speculation, a quantized recipe and Flash Communication's quantized TP
all-reduce. The one-device flag tests below run in the default pass.
"""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lcjax.config import MeshConfig, ParallelConfig
from lcjax.serve import cli

HERE = pathlib.Path(__file__)
CHILD = "LCJAX_SHARDED_SERVE_CHILD"
NUM_DEVICES = 8
in_child = pytest.mark.skipif(not os.environ.get(CHILD) or jax.device_count() < NUM_DEVICES,
                              reason="runs in the 8-host-device child (test_*_on_8_host_devices)")


def _run_child(marker: str) -> None:
    env = dict(os.environ, **{CHILD: "1"})
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={NUM_DEVICES}").strip()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", "-m", marker, str(HERE)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500, cwd=HERE.parents[2])
    print(out.stdout[-6000:])
    assert out.returncode == 0, f"8-device tests failed:\n{out.stdout[-12000:]}\n{out.stderr[-4000:]}"
    assert " passed" in out.stdout, out.stdout[-2000:]


@pytest.mark.slow  # an 8-host-device child process compiling sharded engines (~75 s on 2 cores)
@pytest.mark.skipif(bool(os.environ.get(CHILD)), reason="the runner itself")
def test_sharded_serving_on_8_host_devices():
    _run_child("not slow")


@pytest.mark.slow
@pytest.mark.skipif(bool(os.environ.get(CHILD)), reason="the runner itself")
def test_sharded_serving_variants_on_8_host_devices():
    _run_child("slow")


# ------------------------------------------------------------------------- flags (one device)


def test_mesh_and_parallel_overrides_layer_on_a_one_device_default(tmp_path):
    mesh, par = cli.serving_settings(cli.build_parser().parse_args([]))
    assert mesh == MeshConfig(data=1) and par == ParallelConfig(rules=cli.SERVING_RULES)
    args = cli.build_parser().parse_args(["--quantized-tp-comm", "int6", "mesh.tensor=2", "mesh.expert=4",
                                          "parallel.rules=fsdp_tp"])
    mesh, par = cli.serving_settings(args)
    assert (mesh.data, mesh.expert, mesh.tensor) == (1, 4, 2)
    assert (par.rules, par.quantized_tp_comm) == ("fsdp_tp", "int6")
    layered = tmp_path / "serve.yaml"
    layered.write_text("mesh: {data: -1, tensor: 4}\n")
    args = cli.build_parser().parse_args(["--config", "tiny", "--config", str(layered), "mesh.tensor=2"])
    mesh, _ = cli.serving_settings(args)
    assert (mesh.data, mesh.tensor) == (-1, 2)  # the file's data=-1, the override's tensor
    with pytest.raises(ValueError, match="mesh.tensr"):
        cli.serving_settings(cli.build_parser().parse_args(["mesh.tensr=2"]))


def test_checkpoint_takes_only_sharding_overrides(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--checkpoint", "runs/x", "model.num_layers=1"])
    assert "only mesh.* and parallel.* keys apply" in capsys.readouterr().err


# ------------------------------------------------------------------ 8 devices (in the child)

ENGINE = dict(max_num_seqs=4, max_model_len=64, page_size=8, prefill_chunk=16, max_prefill_seqs=1)
# (arrival step, prompt length, max_tokens): requests join while others decode; more requests
# than slots, so some wait for a slot to free.
LOAD = [(0, 5, 10), (0, 30, 6), (1, 12, 12), (3, 40, 5), (4, 7, 9), (6, 20, 8)]


def _model(quant=None):
    from lcjax.config_io import load_config, resolve_config_path
    from lcjax.serve.loading import random_model

    config, variables, tokenizer = random_model(load_config(resolve_config_path("tiny")), seed=0)
    if quant is not None:
        from lcjax.quant import quantize_model
        variables = quantize_model(variables, config, quant)
    return config, variables, tokenizer


def _serve(model, mesh_cfg=None, parallel=ParallelConfig(), **engine):
    """Greedy token ids of every LOAD request, run with arrivals between steps; and the engine."""
    from lcjax.serve.engine import Engine, EngineConfig
    from lcjax.serve.sampling import SamplingParams
    from lcjax.serve.sharding import serving_mesh

    config, variables, tokenizer = model
    kw = {} if mesh_cfg is None else dict(mesh=serving_mesh(mesh_cfg), parallel=parallel)
    eng = Engine(config, variables, tokenizer, EngineConfig(**ENGINE, **engine), **kw)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 250, n).tolist() for _, n, _ in LOAD]
    done, step = {}, 0
    while len(done) < len(LOAD):
        for i, (arrive, _, max_tokens) in enumerate(LOAD):
            if arrive == step:
                eng.add_request(prompts[i], SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                           ignore_eos=True), request_id=str(i))
        done.update({o.request_id: o.token_ids for o in eng.step() if o.finished})
        step += 1
    return [done[str(i)] for i in range(len(LOAD))], eng


_REFERENCE: dict = {}


def _reference(key, model, **engine):
    if key not in _REFERENCE:
        _REFERENCE[key] = _serve(model, **engine)[0]
    return _REFERENCE[key]


@pytest.fixture(scope="module")
def tiny():
    return _model()


@in_child
def test_tensor2_expert4_matches_one_device(tiny):
    want = _reference("float", tiny)
    got, eng = _serve(tiny, MeshConfig(data=1, expert=4, tensor=2))
    assert got == want
    params = eng.variables["params"]
    assert params["layers"]["moe"]["gate"].sharding.spec == P(None, "expert", None, "tensor")
    assert params["layers"]["attn_0"]["o"].sharding.spec[1] == "tensor"
    pool = eng.state.cache.layers[0]
    assert pool.sharding.is_fully_replicated and len(pool.sharding.device_set) == NUM_DEVICES
    assert eng.stats().num_compilations == 4  # prefill 1 row; decode 1, 2, 4 rows


@pytest.mark.slow
@in_child
def test_tensor8_matches_one_device(tiny):
    got, eng = _serve(tiny, MeshConfig(data=1, tensor=8))
    assert got == _reference("float", tiny)
    assert eng.variables["params"]["layers"]["mlp_0"]["down"].sharding.spec[1] == "tensor"


@pytest.mark.slow
@in_child
def test_mtp_speculative_k2_matches_one_device(tiny):
    want = _reference("mtp", tiny, num_speculative_tokens=2)
    got, eng = _serve(tiny, MeshConfig(data=1, expert=4, tensor=2), num_speculative_tokens=2)
    assert got == want
    assert eng.stats().spec_rounds_total > 0


@pytest.mark.slow
@in_child
def test_quantized_w8a8_matches_one_device():
    model = _model("w8a8")
    want = _reference("w8a8", model)
    got, eng = _serve(model, MeshConfig(data=1, expert=4, tensor=2))
    assert got == want
    gate = eng.variables["params"]["layers"]["moe"]["gate"]
    assert gate.q.sharding.spec == P(None, "expert", None, "tensor")  # [L, E, K, N]
    assert eng.parallelism.config.expert_dispatch == "gspmd"  # quantized experts: no all-to-all


@pytest.mark.slow
@in_child
def test_quantized_tp_comm_runs_and_sends_fewer_bytes(tiny):
    from lcjax.parallel import collective_bytes
    from lcjax.serve.sharding import compiled_decode_text

    mesh = MeshConfig(data=1, expert=2, tensor=4)  # heads (4) and MLP columns split: o and down
    sent, outputs = {}, {}
    for mode in ("none", "int8"):
        parallel = ParallelConfig(quantized_tp_comm=mode, comm_group_size=16)
        outputs[mode], eng = _serve(tiny, mesh, parallel)
        hlo = compiled_decode_text(eng, rows=4)
        sent[mode] = collective_bytes(hlo)
        lines = hlo.splitlines()
        # 4 decode rows split over expert=2: `auto` dispatches tokens to experts by all-to-all
        assert any("all-to-all" in line and "f32[" in line for line in lines)
        if mode == "int8":
            assert any("all-to-all" in line and "u8[" in line for line in lines)
    assert sent["int8"]["total"] < sent["none"]["total"], sent
    assert [len(t) for t in outputs["int8"]] == [n for _, _, n in LOAD]
    agree = np.mean([a == b for x, y in zip(outputs["int8"], outputs["none"]) for a, b in zip(x, y)])
    assert agree > 0.5, agree
