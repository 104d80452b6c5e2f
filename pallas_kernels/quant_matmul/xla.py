"""The "xla" backend: the reference (reference.py); runs everywhere.

Every backend module exposes the same names, which api.py calls with validated arguments
(x_scale float32 [M] or None; w_scale float32 or int32 [N] / [K/g, N], [E, ...] when grouped):
  Config                 frozen knobs dataclass, or None when there are none
  check(x, w, *, mode, out_dtype, grouped, config, interpret)   NotImplementedError if it can't
  quant_matmul(x, w, w_scale, x_scale, *, mode, alpha, out_dtype, config, interpret) -> [M, N]
  quant_gmm(x, w, group_sizes, w_scale, x_scale, *, mode, alpha, out_dtype, config,
            interpret) -> [M, N]
"""

from __future__ import annotations

from pallas_kernels.quant_matmul.reference import quant_gmm_reference, quant_matmul_reference

Config = None


def check(x, w, *, mode, out_dtype, grouped, config=None, interpret=False) -> None:
    del x, w, mode, out_dtype, grouped, interpret
    if config is not None:
        raise NotImplementedError(f"implementation='xla' takes no config, got {config!r}")


def quant_matmul(x, w, w_scale, x_scale, *, mode, alpha, out_dtype, config=None,
                 interpret=False):
    check(x, w, mode=mode, out_dtype=out_dtype, grouped=False, config=config)
    return quant_matmul_reference(x, w, w_scale, x_scale, mode=mode, alpha=alpha,
                                  out_dtype=out_dtype)


def quant_gmm(x, w, group_sizes, w_scale, x_scale, *, mode, alpha, out_dtype, config=None,
              interpret=False):
    check(x, w, mode=mode, out_dtype=out_dtype, grouped=True, config=config)
    return quant_gmm_reference(x, w, group_sizes, w_scale, x_scale, mode=mode, alpha=alpha,
                               out_dtype=out_dtype)
