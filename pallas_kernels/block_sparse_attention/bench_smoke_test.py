"""scripts/bench_attention.py --smoke runs on CPU and writes its JSON."""

import importlib.util
import json
import pathlib

import pytest

_SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "bench_attention.py"


@pytest.mark.slow
@pytest.mark.skipif(not _SCRIPT.exists(), reason="scripts/ not shipped with the kernel library")
def test_bench_smoke_writes_json(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_attention", _SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--smoke", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["impl"] for r in rows} >= {"xla", "pallas_gpu_interpret"}
    assert all(r["ms"] > 0 for r in rows)
