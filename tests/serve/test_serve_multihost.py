"""Multi-host serving: two processes x 4 host devices (gloo on localhost) serve like one process
x 8 devices, driven by the openai client against process 0; a dead follower stops process 0
with one line instead of a hang. The fast tests check the batch-plan packing in one process.
"""

import dataclasses
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
_DIST_VARS = ("LCJAX_DISTRIBUTED", "LCJAX_COORDINATOR_ADDRESS", "LCJAX_NUM_PROCESSES",
              "LCJAX_PROCESS_ID", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
SERVE = ["--max-num-seqs", "4", "--max-model-len", "64", "--page-size", "8", "--prefill-chunk", "16",
         "--max-prefill-seqs", "1", "--compilation-cache", "none", "mesh.expert=4", "mesh.tensor=2"]
PROMPTS = ["Hello, multi-host world", "a", "The quick brown fox jumps over the dog"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args, devices: int, log_dir: pathlib.Path, name: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    flags = env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    env.update(XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu", LCJAX_TYPECHECK="0")
    with open(log_dir / f"{name}.out", "w") as out, open(log_dir / f"{name}.err", "w") as err:
        return subprocess.Popen([sys.executable, "-m", "lcjax.serve", *args], env=env, cwd=ROOT,
                                stdout=out, stderr=err)


def _logs(log_dir: pathlib.Path, names) -> str:
    return "\n".join(f"--- {n}:\n{(log_dir / f'{n}.out').read_text()[-1500:]}"
                     f"{(log_dir / f'{n}.err').read_text()[-3000:]}" for n in names)


def _wait_ready(procs: dict, log_dir: pathlib.Path, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while "lcjax.serve: ready" not in (log_dir / f"{name}.out").read_text():
        dead = [n for n, p in procs.items() if p.poll() is not None]
        assert not dead and time.monotonic() < deadline, f"not ready:\n{_logs(log_dir, procs)}"
        time.sleep(0.5)


def _stop(procs: dict) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _pair(log_dir: pathlib.Path, http_port: int, *extra: str) -> dict:
    address = f"127.0.0.1:{_free_port()}"
    return {f"host{i}": _start(["--port", str(http_port), "--coordinator-address", address,
                                "--num-processes", "2", "--process-id", str(i),
                                "--heartbeat-timeout", "5", *SERVE, *extra], 4, log_dir, f"host{i}")
            for i in (0, 1)}


def _completions(port: int) -> list:
    """(text, tokens) of greedy completions, one of them streamed, several in flight at once."""
    import concurrent.futures

    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id

    def one(prompt):
        r = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0,
                                      logprobs=1)
        return r.choices[0].text, r.choices[0].logprobs.tokens

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(one, PROMPTS))
    stream = client.chat.completions.create(model=model, max_tokens=10, temperature=0, stream=True,
                                            messages=[{"role": "user", "content": "hi there"}])
    results.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
    return results


@pytest.mark.slow
def test_two_processes_serve_like_one_and_a_dead_follower_stops_the_leader(tmp_path):
    one_port, pair_port = _free_port(), _free_port()
    procs = {"one": _start(["--port", str(one_port), *SERVE], 8, tmp_path, "one"),
             **_pair(tmp_path, pair_port)}
    try:
        for name in ("one", "host0"):
            _wait_ready(procs, tmp_path, name, timeout=600)
        want, got = _completions(one_port), _completions(pair_port)
        assert got == want
        assert all(len(tokens) == 12 for _, tokens in got[:-1])
        assert "sharding over 8 of 8 devices of 2 processes" in (tmp_path / "host0.out").read_text()
        assert "following process 0" in (tmp_path / "host1.out").read_text()
        assert "ready" not in (tmp_path / "host1.out").read_text()  # no HTTP on process 1

        # kill -9 the follower: the leader exits on its own, with one line, in bounded time.
        procs["host1"].send_signal(signal.SIGKILL)
        start = time.monotonic()
        rc = procs["host0"].wait(timeout=60)
        elapsed = time.monotonic() - start
        err = (tmp_path / "host0.err").read_text()
        assert rc == 3, _logs(tmp_path, ["host0"])
        assert "process 0 (leader): the process group is broken" in err, err[-3000:]
        assert elapsed < 30
        print(f"leader exited {rc} {elapsed:.1f} s after the follower was killed")
    finally:
        _stop(procs)


@pytest.mark.slow
def test_leader_shutdown_stops_the_follower(tmp_path):
    port = _free_port()
    procs = _pair(tmp_path, port)
    try:
        _wait_ready(procs, tmp_path, "host0", timeout=600)
        procs["host0"].send_signal(signal.SIGINT)
        assert procs["host0"].wait(timeout=60) == 0, _logs(tmp_path, procs)
        assert procs["host1"].wait(timeout=60) == 0, _logs(tmp_path, procs)
    finally:
        _stop(procs)


@pytest.mark.slow
def test_a_dead_leader_stops_the_follower(tmp_path):
    procs = _pair(tmp_path, _free_port(), "--no-warmup")  # idle: only keep-alives run
    try:
        _wait_ready(procs, tmp_path, "host0", timeout=300)
        time.sleep(2)
        procs["host0"].send_signal(signal.SIGKILL)
        assert procs["host1"].wait(timeout=60) == 3, _logs(tmp_path, ["host1"])
        err = (tmp_path / "host1.err").read_text()
        assert "process 1 (follower): the process group is broken" in err, err[-3000:]
    finally:
        _stop(procs)


# ------------------------------------------------------------------ one process (fast)


def test_batch_plan_round_trips_through_the_wire_format():
    from lcjax.config import MeshConfig
    from lcjax.config_io import load_config, resolve_config_path
    from lcjax.serve import multihost
    from lcjax.serve.engine import Engine, EngineConfig
    from lcjax.serve.loading import random_model
    from lcjax.serve.sharding import serving_mesh

    config, variables, tok = random_model(load_config(resolve_config_path("tiny")), seed=0)
    engine = Engine(config, variables, tok, EngineConfig(max_num_seqs=2, max_model_len=32, page_size=8,
                                                         prefill_chunk=16),
                    mesh=serving_mesh(MeshConfig(data=1)))
    plan = multihost._Plan(engine)
    template = plan.template(multihost.PREFILL, 2, 16)
    # the largest step (prefill 2 rows x 16 tokens) fills the message exactly
    assert plan.size == multihost.HEADER_SIZE + sum(
        x.size for x in jax.tree.leaves((template[0].replace(bias=None), template[1])))
    rng = np.random.default_rng(0)
    args = jax.tree.map(lambda x: (rng.integers(0, 2, x.shape).astype(x.dtype) if x.dtype == bool
                                   else (rng.standard_normal(x.shape) * 7).astype(x.dtype)), template)
    header = [multihost.PREFILL, 2, 16, 1, 0, 0, 0, 0]
    message = plan.encode(header, args)
    assert message.dtype == np.int32 and message.shape == (plan.size,)
    for bias in (None, args[0].bias):
        back = plan.decode(message, header, bias)
        for field in dataclasses.fields(args[0]):
            a, b = getattr(args[0], field.name), getattr(back[0], field.name)
            if field.name == "bias" and bias is None:
                assert not np.any(b)  # zeros: not sent
                continue
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
                assert x.dtype == y.dtype and np.array_equal(x, y), field.name
        assert np.array_equal(back[1], args[1])
    small = plan.encode([multihost.DECODE, 1, 1, 0, 0, 0, 0, 0], plan.template(multihost.DECODE, 1, 1))
    assert small.shape == (plan.size,)  # every message has the one size


def test_a_mesh_short_of_the_devices_is_refused_for_multi_host():
    from lcjax.config import MeshConfig
    from lcjax.serve.multihost import check_mesh
    from lcjax.serve.sharding import serving_mesh

    mesh = serving_mesh(MeshConfig(data=1))
    if jax.device_count() == 1:
        check_mesh(mesh)  # one device, a mesh of one: fine
    else:
        with pytest.raises(ValueError, match="mesh over all"):
            check_mesh(mesh)
