"""scripts/bench_vs_hf.py: the quick run writes every ratio; BENCHMARKS sections are replaced."""

import json
import os
import subprocess
import sys

import pytest

from . import ROOT, load_script

SCRIPT = ROOT / "scripts" / "bench_vs_hf.py"


def _module():
    return load_script("bench_vs_hf")


@pytest.mark.slow
def test_quick_run_writes_ratios(tmp_path):
    # A subprocess: the script sets XLA_FLAGS before jax is imported (the suite's jax already is).
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--rounds", "1",
                           "--decode-batch", "1", "4", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["ratios"]) == {"forward", "train_step", "decode_b1", "decode_b4"}
    assert all(r > 0 for r in result["ratios"].values())
    assert result["logits_max_abs_diff"] < 1e-3
    assert result["torch_threads"] == 1 and len(result["cpu_affinity"]) == 1
    for task in result["tasks"]:
        assert len(task["ratios"]) == 1 and task["lcjax_s"][0] > 0 and task["hf_s"][0] > 0
    train = next(t for t in result["tasks"] if t["task"] == "train_step")
    assert abs(train["first_step_loss"][0] - train["first_step_loss"][1]) < 1e-4
    decode = [t for t in result["tasks"] if t["task"].startswith("decode")]
    assert all(t["teacher_forced_agreement"] == 1.0 for t in decode)  # same weights, same tokens


def test_write_benchmarks_replaces_its_own_section(tmp_path):
    bench = _module()
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# figures\n\nkept text\n")
    bench.write_benchmarks("first cpu table", "cpu", path)
    bench.write_benchmarks("gpu table", "gpu", path)
    bench.write_benchmarks("second cpu table", "cpu", path)
    text = path.read_text()
    assert text.startswith("# figures\n\nkept text\n")
    assert "first cpu table" not in text
    assert text.count("second cpu table") == 1 and text.count("gpu table") == 1
    assert text.count("<!-- bench_vs_hf:cpu:start -->") == 1


def test_table_marks_targets():
    bench = _module()
    tasks = [{"task": "forward", "lcjax_median_s": 0.01, "hf_median_s": 0.02, "ratios": [1.9, 2.1],
              "median_ratio": 2.0},
             {"task": "decode_b1", "lcjax_tok_s": 10.0, "hf_tok_s": 20.0, "ratios": [0.5],
              "median_ratio": 0.5}]
    lines = bench.table({"tasks": tasks}).splitlines()
    assert "2.00x" in lines[2] and lines[2].endswith("| PASS |")
    assert "0.50x" in lines[3] and lines[3].endswith("| FAIL |")
