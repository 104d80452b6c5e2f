"""sparse_gemv dispatch: validation, the default order, no silent fallback, row limits."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sparse_gemv import (KNOWN_IMPLEMENTATIONS, MAX_ROWS, active_rows, api,
                                        default_order, sparse_gemv)


def test_bad_input_is_a_value_error():
    x = jnp.ones((2, 8))
    with pytest.raises(ValueError, match=r"x\(2, 8\) w\(7, 4\)"):
        sparse_gemv(x, jnp.ones((7, 4)))
    with pytest.raises(ValueError, match="expected floats"):
        sparse_gemv(x.astype(jnp.int8), jnp.ones((8, 4)))
    with pytest.raises(ValueError, match="not one of"):
        sparse_gemv(x, jnp.ones((8, 4)), implementation="cuda")


def test_defaults_end_with_the_reference_and_kernels_refuse_prefill():
    for platform in ("cpu", "gpu", "tpu"):
        assert default_order(platform)[-1] == "xla"
    assert set(KNOWN_IMPLEMENTATIONS) >= {"pallas_gpu_interpret", "pallas_tpu_interpret", "xla_gather"}
    x = jnp.ones((MAX_ROWS + 1, 32))
    with pytest.raises(NotImplementedError, match="rows; supported"):
        sparse_gemv(x, jnp.ones((32, 16)), implementation="pallas_gpu_interpret")
    np.testing.assert_allclose(np.asarray(sparse_gemv(x, jnp.ones((32, 16)))), 32.0)


def test_kernels_named_off_their_platform_refuse():
    with pytest.raises(NotImplementedError, match="runs on platform"):
        sparse_gemv(jnp.ones((1, 32)), jnp.ones((32, 16)), implementation="pallas_tpu")


def test_active_rows_lists_nonzero_channels_then_pads_with_the_first():
    x = np.zeros((2, 7), np.float32)
    x[0, 2] = 1.0
    x[1, 5] = -3.0
    idx, count = active_rows(jnp.asarray(x))
    assert int(count[0]) == 2
    assert list(np.asarray(idx)) == [2, 5, 2, 2, 2, 2, 2]
    assert api.MAX_ROWS == MAX_ROWS
