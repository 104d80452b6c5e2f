"""The "xla" backend: the reference (a dense matmul); runs everywhere, any number of rows.

Every backend module exposes the same names, which api.py calls with validated arguments:
  Config                                   frozen knobs dataclass, or None when there are none
  check(x, w, *, config, interpret)        NotImplementedError if it cannot run the case
  sparse_gemv(x, w, *, config, interpret) -> [T, N] in x.dtype
"""

from __future__ import annotations

from pallas_kernels.sparse_gemv.reference import sparse_gemv_reference

Config = None


def check(x, w, *, config=None, interpret=False) -> None:
    del x, w, interpret
    if config is not None:
        raise NotImplementedError(f"implementation='xla' takes no config, got {config!r}")


def sparse_gemv(x, w, *, config=None, interpret=False):
    check(x, w, config=config)
    return sparse_gemv_reference(x, w)
