"""scripts/bench_quant_matmul.py --smoke runs on CPU and writes its JSON."""

import importlib.util
import json
import pathlib

import pytest

_SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "bench_quant_matmul.py"


@pytest.mark.slow
@pytest.mark.skipif(not _SCRIPT.exists(), reason="scripts/ not shipped with the kernel library")
def test_bench_smoke_writes_json(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_quant_matmul", _SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--smoke", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["impl"] for r in rows} >= {"xla bf16", "xla int8 lax.dot", "xla",
                                         "pallas_gpu_interpret"}
    assert {r["mode"] for r in rows} >= {"w8a8", "w4a8_int_g128", "w4a8_float_g128",
                                         "w4a16_g128"}
    assert all(r["us"] > 0 for r in rows)
    assert all(r["max_rel_err"] < 1e-3 for r in rows if "max_rel_err" in r)
