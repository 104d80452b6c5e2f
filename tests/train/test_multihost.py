"""Multi-host: settings resolution, and two processes on localhost (gloo) training like one."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lcjax.config_io import dump_config
from lcjax.parallel import distributed

from .conftest import train_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_DIST_VARS = ("LCJAX_DISTRIBUTED", "LCJAX_COORDINATOR_ADDRESS", "LCJAX_NUM_PROCESSES",
              "LCJAX_PROCESS_ID", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


@pytest.fixture
def calls(monkeypatch):
    """Record jax.distributed.initialize / jax.config.update instead of running them."""
    seen = {"initialize": [], "config": []}
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: seen["initialize"].append(kw))
    monkeypatch.setattr(jax.config, "update", lambda k, v: seen["config"].append((k, v)))
    return seen


@pytest.mark.parametrize("kwargs, env", [
    ({}, {}),
    ({"num_processes": 1}, {}),
    ({}, {"LCJAX_NUM_PROCESSES": "1", "LCJAX_PROCESS_ID": "0"}),
    ({"distributed": "off"}, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2",
                              "JAX_PROCESS_ID": "0"}),
])
def test_single_process_settings_do_nothing(calls, kwargs, env):
    assert distributed.initialize(**kwargs, environ=env) is False
    assert calls["initialize"] == []


def test_flags_win_over_lcjax_env_over_jax_env_and_gloo_is_set_first(calls):
    env = {"LCJAX_COORDINATOR_ADDRESS": "lc:1", "JAX_COORDINATOR_ADDRESS": "jx:2",
           "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.initialize(process_id=1, environ=env) is True
    assert calls["initialize"] == [{"coordinator_address": "lc:1", "num_processes": 4,
                                    "process_id": 1, "local_device_ids": None}]
    assert calls["config"] == [("jax_cpu_collectives_implementation", "gloo")]


def test_auto_leaves_unset_values_to_jax_cluster_detection(calls):
    assert distributed.initialize(environ={"LCJAX_DISTRIBUTED": "auto"}) is True
    assert calls["initialize"] == [{"coordinator_address": None, "num_processes": None,
                                    "process_id": None, "local_device_ids": None}]


@pytest.mark.parametrize("kwargs, env, message", [
    ({"process_id": 1}, {}, r"--process-id=1 are missing --coordinator-address .* --num-processes"),
    ({}, {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, r"\$JAX_NUM_PROCESSES=2.*missing "
                                                            r"--coordinator-address"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, {},
     r"--process-id=2 is invalid: expected an integer in \[0, --num-processes=2\)"),
    ({"coordinator_address": "nohost", "num_processes": 2, "process_id": 0}, {},
     "--coordinator-address='nohost' is invalid: expected host:port"),
    ({}, {"LCJAX_NUM_PROCESSES": "two"}, r"\$LCJAX_NUM_PROCESSES='two' is invalid"),
    ({}, {"LCJAX_DISTRIBUTED": "yes"}, r"\$LCJAX_DISTRIBUTED='yes' is invalid"),
])
def test_partial_or_bad_settings_name_the_value(calls, kwargs, env, message):
    with pytest.raises(ValueError, match=message):
        distributed.initialize(**kwargs, environ=env)
    assert calls["initialize"] == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args, devices: int, log_dir, name: str, cache_dir=None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    flags = env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    env.update(XLA_FLAGS=flags, JAX_PLATFORMS="cpu", LCJAX_TYPECHECK="0")
    if cache_dir:  # the resumed pair reuses the first pair's executables (same mesh, same shapes)
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    with open(log_dir / f"{name}.out", "w") as out, open(log_dir / f"{name}.err", "w") as err:
        return subprocess.Popen([sys.executable, "-m", "lcjax.train", *args], env=env, cwd=ROOT,
                                stdout=out, stderr=err)


def _wait(procs: dict, log_dir, timeout: float) -> None:
    """All of `procs` exit 0 within `timeout` seconds, else kill them all and fail with the logs."""
    deadline = time.monotonic() + timeout
    try:
        for proc in procs.values():
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    failed = {n: p.returncode for n, p in procs.items() if p.returncode != 0}
    logs = "\n".join(f"--- {n} (rc {rc}):\n{(log_dir / f'{n}.err').read_text()[-2000:]}"
                     for n, rc in failed.items())
    assert not failed, f"timed out or failed:\n{logs}"


def _pair(yaml, run_dir, log_dir, tag: str, cache_dir) -> dict:
    """Two processes of 2 devices, the hosts on the DCN part of `data` (hybrid mesh, as on a
    cluster)."""
    address = f"127.0.0.1:{_free_port()}"
    return {f"{tag}{i}": _start(["--config", str(yaml), "--coordinator-address", address,
                                 "--num-processes", "2", "--process-id", str(i),
                                 f"train.run_dir={run_dir}", "mesh.data=1", "mesh.dcn_data=2"],
                                2, log_dir, f"{tag}{i}", cache_dir)
            for i in (0, 1)}


def _losses(run_dir) -> dict:
    """Step -> train loss from metrics.jsonl (a resumed run's rows replace earlier ones)."""
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.mark.slow
def test_two_processes_match_one_process_and_resume(corpus, tmp_path):
    # 2 processes x 2 host devices = the same 4-device (data=2, fsdp=2) mesh as one process x 4.
    cfg = train_config(corpus, tmp_path / "unused", "mesh.data=2", "mesh.fsdp=2", "train.steps=4",
                       "train.checkpoint_every=2")
    yaml = tmp_path / "run.yaml"
    dump_config(cfg, yaml)
    one, two, logs, cache = tmp_path / "one", tmp_path / "two", tmp_path / "logs", tmp_path / "xla"
    logs.mkdir()
    procs = {"one": _start(["--config", str(yaml), f"train.run_dir={one}"], 4, logs, "one"),
             **_pair(yaml, two, logs, "first", cache)}
    _wait(procs, logs, timeout=420)

    single, multi = _losses(one), _losses(two)
    assert sorted(multi) == [1, 2, 3, 4]  # process 1 wrote no metrics rows of its own
    np.testing.assert_allclose([multi[s] for s in range(1, 5)], [single[s] for s in range(1, 5)],
                               rtol=1e-5)  # only the all-reduce order differs (seen: 1.3e-7)
    assert sorted(os.listdir(two / "checkpoints")) == ["2", "4"]
    assert "step      4  loss" in (logs / "first0.out").read_text()
    assert "step " not in (logs / "first1.out").read_text()  # rank-0-only console output

    # Resume both processes from step 2: each restores its own rows of the data stream.
    shutil.rmtree(two / "checkpoints" / "4")
    _wait(_pair(yaml, two, logs, "resumed", cache), logs, timeout=240)
    resumed = _losses(two)
    assert [resumed[3], resumed[4]] == [multi[3], multi[4]]  # bit for bit
    assert sorted(os.listdir(two / "checkpoints")) == ["2", "4"]
