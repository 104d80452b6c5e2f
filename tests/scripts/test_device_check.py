"""scripts/device_check.py: the --smoke run's rows, the budget and the row verdicts."""

import json
import os
import subprocess
import sys

import pytest

from . import ROOT, load_script

SCRIPT = ROOT / "scripts" / "device_check.py"


def _module():
    return load_script("device_check")


@pytest.mark.slow
def test_smoke_run_rows(tmp_path):
    # A subprocess: Triton's interpreter must be chosen before triton is first imported.
    out = tmp_path / "device_check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--budget", "1200",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=1500, env={**os.environ, "PYTHONPATH": str(ROOT)})
    result = json.loads(out.read_text())
    rows = result["rows"]
    errors = [(r["check"], r["status"]) for r in rows if r["passed"] is False]
    assert proc.returncode == 0 and not errors, (errors, proc.stdout[-3000:], proc.stderr[-3000:])
    assert result["smoke"] and result["platform"] == "cpu"
    assert {r["section"] for r in rows} == {
        "attention kernels", "decode kernels", "gmm kernels", "quant kernels",
        "sparse gemv kernels", "model", "sparsity bench", "sparse verify bench", "rl bench",
        "attention bench", "gmm bench", "train bench", "decode bench"}
    assert all(r["status"] == "ok" or r["status"].startswith("unavailable: ") for r in rows)
    ran = {(r["check"].split()[0], r["backend"]) for r in rows
           if r["section"].endswith("kernels") and r["status"] == "ok"}
    # The CPU reference backends and the interpret-mode kernels ran against the references.
    assert {("attention", "xla"), ("attention", "pallas_gpu_interpret"), ("paged", "xla"),
            ("paged", "pallas_gpu_interpret"), ("gmm", "xla"), ("quant_matmul", "xla"),
            ("quant_matmul", "pallas_gpu_interpret"), ("quant_gmm", "xla"),
            ("quant_gmm", "pallas_gpu_interpret"), ("sparse_gemv", "xla_gather"),
            ("sparse_gemv", "pallas_gpu_interpret"), ("sparse_gemv", "pallas_tpu_interpret")} <= ran
    for op in ("quant_matmul", "quant_gmm"):
        modes = {r["check"].split()[2] for r in rows if r["check"].startswith(f"{op} xla")
                 and r["status"] == "ok"}
        assert modes >= {"w8a8", "w4a8_odyssey", "w4a8_int_g128", "w4a8_float_g128",
                         "w4a16_g128", "w4a16"}
    kernel_rows = [r for r in rows if r["section"].endswith("kernels") and r["status"] == "ok"]
    assert all(r["passed"] is True and r["value"] <= 3e-2 for r in kernel_rows)
    model = next(r for r in rows if r["section"] == "model")
    assert model["passed"] is True
    bench = [r for r in rows if r["section"].endswith("bench") and r["status"] == "ok"]
    # CPU: speed targets are not judged; correctness rows ("outputs equal") are.
    assert all(r["passed"] is None for r in bench if r["target"] != "outputs equal")
    assert all(r["passed"] is True for r in bench if r["target"] == "outputs equal")
    scripted = {r["section"] for r in bench if r["backend"] == "script"}
    assert scripted == {"sparsity bench", "sparse verify bench", "rl bench"}
    assert sum(r["check"].startswith("A²ATS decode step") for r in bench) == 3
    assert any(r["check"].startswith("dense causal attention fwd") for r in bench)
    assert sum(r["check"].startswith("tiny decode batch") for r in bench) == 3


def test_budget_exhausted_rows_are_skipped(tmp_path):
    device_check = _module()
    out = tmp_path / "device_check.json"
    assert device_check.main(["--smoke", "--budget", "0.001", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["status"] == "skipped (budget)" for r in rows)


def test_row_verdicts():
    device_check = _module()
    budget = device_check.Budget(100.0)

    def declined():
        raise NotImplementedError("pallas_tpu: platform='cpu' is not supported")

    def broken():
        raise RuntimeError("boom")

    def good():
        return dict(measured="1.0", value=1.0, target=">= 2", passed=False)

    row = device_check.run_item("kernels", "c", "pallas_tpu", declined, 1.0, 50.0, budget)
    assert row["status"].startswith("unavailable: NotImplementedError: pallas_tpu")
    assert row["passed"] is None
    def missing():
        import transformers_that_is_not_installed  # noqa: F401

    row = device_check.run_item("decode bench", "c", "decode", missing, 1.0, 50.0, budget)
    assert row["status"].startswith("unavailable: ModuleNotFoundError") and row["passed"] is None
    row = device_check.run_item("kernels", "c", "xla", broken, 1.0, 50.0, budget)
    assert row["status"] == "error: RuntimeError: boom" and row["passed"] is False
    row = device_check.run_item("kernels", "c", "xla", good, 1.0, 50.0, budget)
    assert row["status"] == "fail" and device_check.verdict(row) == "FAIL"
    row = device_check.run_item("kernels", "c", "xla", good, 60.0, 50.0, budget)  # past the box
    assert row["status"] == "skipped (budget)" and device_check.verdict(row) == "skipped (budget)"


def test_kernel_verdicts_use_relative_error():
    import numpy as np

    _module()  # puts scripts/ on sys.path
    import device_check_kernels as kernels

    want = np.array([[1.0, -4.0], [2.0, 0.5]])
    assert kernels.rel_err(want, want) == 0.0
    assert kernels.rel_err(want + np.array([[0.0, 0.04], [0.0, 0.0]]), want) == pytest.approx(0.01)
    with pytest.raises(AssertionError, match="shape"):
        kernels.rel_err(want[:1], want)
    ok = kernels._verdict({"out": 1e-3, "grad": 2e-2}, "bfloat16")
    assert ok["passed"] and ok["value"] == 2e-2
    assert not kernels._verdict({"out": 1e-3, "grad": 2e-2}, "float32")["passed"]
