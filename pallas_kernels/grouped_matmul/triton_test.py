"""triton backend: the @triton.jit kernels under TRITON_INTERPRET=1 on torch CPU tensors.

Triton reads TRITON_INTERPRET when a kernel is decorated, so the kernels run in a subprocess
(this module, `python -m`) started with the variable set. There, jax-triton, which needs a GPU
jaxlib, is replaced by a stand-in whose `triton_call` runs the kernel through `jax.pure_callback`:
everything else is the real path — api.gmm with implementation="triton", its custom VJP,
triton.py's wrapper, metadata, the `*_launch` grids and constexprs. Results come back in an .npz
and are checked here against the contract's float64 oracle. Skipped without triton or torch.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pallas_kernels.grouped_matmul import gmm_contract
from pallas_kernels.grouped_matmul.gmm_contract import TOLERANCES, assert_close, case_named

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or importlib.util.find_spec("torch") is None,
    reason="the Triton interpreter tests need triton and torch (pip install -e '.[test]')")

CASES = ("uneven_empty_tail", "all_groups_empty", "bf16_zipf", "bf16_in_f32_out", "odd_dims")
BLOCKS = dict(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=1)
_REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = tmp_path_factory.mktemp("triton_interpret") / "results.npz"
    env = dict(os.environ, TRITON_INTERPRET="1", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(_REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", __name__, str(path), *CASES], env=env, cwd=_REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-2000:]}\n" \
                                 f"{proc.stderr[-6000:]}"
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


@pytest.mark.parametrize("name", CASES)
def test_matches_numpy(results, name):
    case = case_named(name)
    want = gmm_contract.oracle(*gmm_contract.make_inputs(case))
    tol = TOLERANCES[case.dtype]
    for what, ref in zip(("out", "d_lhs", "d_rhs"), want):
        assert str(results[f"{name}/{what}.dtype"]) == (
            case.out_dtype or case.dtype if what == "out" else case.dtype)
        assert_close(results[f"{name}/{what}"], ref, tol["out" if what == "out" else "grad"],
                     what)
    lhs, _, group_sizes, d_out = gmm_contract.make_inputs(case)
    from pallas_kernels.grouped_matmul import reference
    assert_close(results[f"{name}/tgmm"],
                 reference.tgmm_numpy(lhs, d_out.astype(lhs.dtype), group_sizes),
                 tol["grad"], "tgmm")


@pytest.mark.parametrize("name", ["uneven_empty_tail", "all_groups_empty", "odd_dims"])
def test_rows_past_the_groups_are_exactly_zero(results, name):
    tail = gmm_contract.tail_rows(case_named(name))
    assert tail.stop > tail.start
    assert np.all(results[f"{name}/out"][tail] == 0)
    assert np.all(results[f"{name}/d_lhs"][tail] == 0)


def test_deterministic(results):
    for what in ("out", "d_lhs", "d_rhs"):
        np.testing.assert_array_equal(results[f"{CASES[0]}/{what}"],
                                      results[f"{CASES[0]}/{what}.again"])


def test_this_backend_ran(results):
    """Each forward + VJP launched gmm_kernel plain and transposed, then tgmm_kernel."""
    calls = json.loads(str(results["calls"]))
    want = [["gmm_kernel", False], ["gmm_kernel", True], ["tgmm_kernel", None]]
    assert calls[CASES[0]] == want and calls[CASES[-1]] == want


# ---- the subprocess: run the cases under TRITON_INTERPRET=1 ----

def _patch_interpreter_scalars():
    """Triton <= 3.6's interpreter turns a scalar (a shape-[1] array) into a Python int with
    int(array), an error since numpy 2.4; a dynamic `range(start, end)` needs it."""
    try:
        int(np.zeros(1))
        return
    except TypeError:
        pass
    from triton.runtime import interpreter
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patched


def _install_jax_triton_stand_in(calls: list):
    """A `jax_triton` module whose triton_call runs the kernel in the interpreter on the host."""
    import types

    import jax
    import ml_dtypes
    import torch

    def to_torch(x):
        x = np.ascontiguousarray(x)
        if x.dtype == ml_dtypes.bfloat16:
            return torch.from_numpy(x.view(np.uint16)).view(torch.bfloat16)
        return torch.from_numpy(x)

    def to_numpy(t, dtype):
        if dtype == ml_dtypes.bfloat16:
            return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()

    def triton_call(*args, kernel, out_shape, grid, num_warps=None, num_stages=None, name="",
                    **constexprs):
        del num_warps, num_stages, name
        constexprs = dict(constexprs, UPCAST_DOT=True)  # bf16 tl.dot is wrong in the interpreter
        calls.append([kernel.fn.__name__, constexprs.get("TRANSPOSE_RHS")])
        dtype = np.dtype(out_shape.dtype)

        def host(*arrays):
            out = torch.full(out_shape.shape, float("nan"), dtype=to_torch(
                np.zeros(1, dtype)).dtype)  # NaN: an output no program stores shows up
            kernel[grid](*map(to_torch, arrays), out, **constexprs)
            return to_numpy(out, dtype)

        return jax.pure_callback(host, out_shape, *args)

    sys.modules["jax_triton"] = types.SimpleNamespace(triton_call=triton_call)


def _run(path: str, names: list[str]) -> None:
    import jax
    import jax.numpy as jnp

    _patch_interpreter_scalars()
    calls: list = []
    _install_jax_triton_stand_in(calls)
    jax.default_backend = lambda: "gpu"  # the triton backend checks for a GPU platform
    from pallas_kernels.grouped_matmul import api
    # Register the backend as api.py does when jax-triton imports (it did not, at import time).
    triton_backend = importlib.import_module("pallas_kernels.grouped_matmul.triton")
    api.REGISTRY.implementations["triton"] = triton_backend

    config = triton_backend.Config(**BLOCKS)

    @functools.partial(jax.jit, static_argnames="out_dtype")
    def forward_and_vjp(lhs, rhs, group_sizes, d_out, out_dtype):
        out, vjp = jax.vjp(lambda a, b: api.gmm(
            a, b, group_sizes, preferred_element_type=out_dtype, implementation="triton",
            config=config), lhs, rhs)
        return out, *vjp(d_out)

    @jax.jit
    def tgmm(lhs, rhs, group_sizes):
        return api.tgmm(lhs, rhs, group_sizes, implementation="triton", config=config)

    results, calls_by_case = {}, {}
    for name in names:
        case = case_named(name)
        lhs, rhs, group_sizes, d_out = gmm_contract.make_inputs(case)
        calls.clear()
        got = forward_and_vjp(lhs, rhs, group_sizes, d_out, case.out_dtype)
        calls_by_case[name] = list(calls)
        again = (forward_and_vjp(lhs, rhs, group_sizes, d_out, case.out_dtype)
                 if name == names[0] else None)
        for i, what in enumerate(("out", "d_lhs", "d_rhs")):
            results[f"{name}/{what}"] = np.asarray(got[i], np.float32)
            results[f"{name}/{what}.dtype"] = np.array(jnp.dtype(got[i].dtype).name)
            if again is not None:
                results[f"{name}/{what}.again"] = np.asarray(again[i], np.float32)
        results[f"{name}/tgmm"] = np.asarray(tgmm(lhs, d_out.astype(lhs.dtype), group_sizes),
                                             np.float32)
    results["calls"] = np.array(json.dumps(calls_by_case))
    np.savez(path, **results)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1 (set before triton is imported)")
    _run(sys.argv[1], sys.argv[2:])
