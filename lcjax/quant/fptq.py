"""FPTQ (arXiv 2308.15987): logarithmic activation equalization and the layer-wise A8 policy.

LAE, per input channel j with calibrated m_j = max|X_j|:
    s_j = m_j / log2(2 + m_j),   X̂ = X · diag(s)^-1,   Ŵ = diag(s) · W
so an equalized channel peaks at log2(2 + m_j): large channels shrink logarithmically, small ones
(m_j < 2) grow a little. The policy by a layer's input range v = max_j m_j:
    v <= v0        per-tensor static int8
    v0 < v <= v1   LAE, then per-tensor static int8
    v > v1         per-token dynamic int8
with v0 = 15, v1 = 150 (the paper's values). Weights are group-wise symmetric int4.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import numpy.typing as npt

STATIC, LAE, DYNAMIC = "static", "lae_static", "dynamic"


@dataclasses.dataclass(frozen=True)
class FPTQConfig:
    """Activation bounds of the layer policy (FPTQ §3.3: "v0 ... 15 and v1 150")."""

    v0: float = 15.0
    v1: float = 150.0

    def __post_init__(self):
        if not 0 <= self.v0 <= self.v1:
            raise ValueError(f"FPTQConfig: v0={self.v0}, v1={self.v1}: expected 0 <= v0 <= v1")


def lae_scale(absmax: npt.ArrayLike) -> np.ndarray:
    """s_j = m_j / log2(2 + m_j) (1 for a channel never seen non-zero)."""
    m = np.asarray(absmax, np.float64)
    s = m / np.log2(2.0 + m)
    return np.where(m > 0, s, 1.0).astype(np.float32)


def policy(v: npt.ArrayLike, cfg: FPTQConfig = FPTQConfig()) -> np.ndarray:
    """Per layer range v (any shape) -> STATIC / LAE / DYNAMIC (object array of the same shape)."""
    v = np.asarray(v)
    return np.where(v <= cfg.v0, STATIC, np.where(v <= cfg.v1, LAE, DYNAMIC))
