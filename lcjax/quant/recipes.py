"""Quantization recipes: typed settings, the named presets, and SmoothQuant / clip search.

A recipe says how weights are coded (bits, granularity, group size, symmetric, clip search,
Integer Scale) and how their inputs are (none = weight-only A16, per-token dynamic, per-tensor
static, or FPTQ's per-layer policy; optional SmoothQuant migration). `apply.quantize_model`
runs it on a parameter tree.

Presets (`RECIPES`; `get_recipe("name:key=value,...")` overrides fields, e.g.
"fptq_w4a8:group_size=8"):
  w8a8               int8 per-channel weights, per-token dynamic int8 activations
  w8a8_smoothquant   the same after SmoothQuant migration (strength 0.5)
  fptq_w4a8          int4 group weights; FPTQ layer policy with LAE (v0=15, v1=150)
  w4a8_integer_scale fptq_w4a8 with Integer Scale group scales (α = 2^10)
  w4a16              int4 group weights, float activations (weight-only, memory-bound decode)
  odyssey_w4a8       int4 per-channel weights with a clip search, per-token dynamic int8
  naive_w4a8         int4 group weights, per-tensor static int8, no equalization (FPTQ's
                     "vanilla W4A8" baseline)
  w4a8_dynamic       int4 group weights, per-token dynamic int8, no equalization (context row)
Group size 128 by default (UNCONFIRMED in FPTQ; standard elsewhere); it must divide every
contraction dimension (the tiny model needs 8).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import numpy as np
import numpy.typing as npt

from lcjax.quant.fptq import FPTQConfig
from lcjax.quant.quantizers import GRANULARITIES, qrange

ACT_POLICIES = ("none", "dynamic", "static", "fptq")
DEFAULT_CLIP_GRID = tuple(float(g) for g in np.round(np.linspace(1.0, 0.5, 21), 4))


@dataclasses.dataclass(frozen=True)
class RecipeConfig:
    """How to quantize every quantizable weight (MLA projections, dense / MTP / expert FFNs)."""

    name: str = "custom"
    weight_bits: int = 8
    granularity: str = "channel"  # "tensor" | "channel" | "group"
    group_size: Optional[int] = None  # along K, with granularity="group"
    symmetric: bool = True
    act: str = "dynamic"  # "none" (A16) | "dynamic" | "static" | "fptq"
    act_bits: int = 8  # only 8 runs (int4 activations are refused per layer)
    smoothquant: Optional[float] = None  # SmoothQuant migration strength a, s = m^a / max|W|^(1-a)
    fptq: FPTQConfig = FPTQConfig()
    integer_scale: Union[None, int, str] = None  # α (power of two) or "auto"
    clip_search: bool = False  # OdysseyLLM: per-channel clip ratio minimizing output MSE
    clip_grid: tuple = DEFAULT_CLIP_GRID

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"recipe {self.name}: granularity={self.granularity!r} is not one of "
                             f"{list(GRANULARITIES)}")
        if self.act not in ACT_POLICIES:
            raise ValueError(f"recipe {self.name}: act={self.act!r} is not one of {list(ACT_POLICIES)}")
        if self.smoothquant is not None and not 0 <= self.smoothquant <= 1:
            raise ValueError(f"recipe {self.name}: smoothquant={self.smoothquant} must be in [0, 1]")
        if self.smoothquant is not None and self.act == "fptq":
            raise ValueError(f"recipe {self.name}: smoothquant and act='fptq' (LAE) both equalize")
        if not self.clip_grid or min(self.clip_grid) <= 0 or max(self.clip_grid) > 1:
            raise ValueError(f"recipe {self.name}: clip_grid={self.clip_grid} must be ratios in (0, 1]")

    @property
    def needs_calibration(self) -> bool:
        return self.act in ("static", "fptq") or self.smoothquant is not None or self.clip_search

    @property
    def weight_only(self) -> bool:
        return self.act == "none"


def _group4(name: str, **kw) -> RecipeConfig:
    return RecipeConfig(name=name, weight_bits=4, granularity="group", group_size=128, **kw)


RECIPES: dict[str, RecipeConfig] = {
    "w8a8": RecipeConfig(name="w8a8"),
    "w8a8_smoothquant": RecipeConfig(name="w8a8_smoothquant", smoothquant=0.5),
    "fptq_w4a8": _group4("fptq_w4a8", act="fptq"),
    "w4a8_integer_scale": _group4("w4a8_integer_scale", act="fptq", integer_scale=2**10),
    "w4a16": _group4("w4a16", act="none"),
    "odyssey_w4a8": RecipeConfig(name="odyssey_w4a8", weight_bits=4, clip_search=True),
    "naive_w4a8": _group4("naive_w4a8", act="static"),
    "w4a8_dynamic": _group4("w4a8_dynamic", act="dynamic"),
}


def _parse_value(key: str, text: str, current):
    if text.lower() in ("none", "null"):
        return None
    if isinstance(current, bool):
        if text.lower() not in ("true", "false"):
            raise ValueError(f"recipe override {key}={text!r}: expected true or false")
        return text.lower() == "true"
    if key == "integer_scale":
        return text if text == "auto" else int(float(text))
    if isinstance(current, float) or key == "smoothquant":
        return float(text)
    if isinstance(current, int) or key == "group_size":
        return int(text)
    return text


def get_recipe(recipe: Union[str, RecipeConfig]) -> RecipeConfig:
    """A RecipeConfig, or a preset name with optional overrides: "fptq_w4a8:group_size=8,v1=100"."""
    if isinstance(recipe, RecipeConfig):
        return recipe
    name, _, rest = str(recipe).partition(":")
    if name not in RECIPES:
        raise ValueError(f"unknown quantization recipe {name!r}: expected one of {sorted(RECIPES)}")
    base = RECIPES[name]
    changes, fptq = {}, {}
    for item in filter(None, rest.split(",")):
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq:
            raise ValueError(f"recipe override {item!r} must be key=value")
        if key in ("v0", "v1"):
            fptq[key] = float(text)
            continue
        if key not in {f.name for f in dataclasses.fields(RecipeConfig)} or key in ("fptq", "clip_grid"):
            raise ValueError(f"recipe override {key!r} is not a recipe setting")
        changes[key] = _parse_value(key, text.strip(), getattr(base, key))
    if fptq:
        changes["fptq"] = dataclasses.replace(base.fptq, **fptq)
    if rest:
        changes.setdefault("name", str(recipe))
    return dataclasses.replace(base, **changes)


# ---------------------------------------------------------------------------------------------
# SmoothQuant and the OdysseyLLM clip search


def smoothquant_scale(absmax: npt.ArrayLike, w: npt.ArrayLike, strength: float) -> np.ndarray:
    """s_j = max|X_j|^a / max_n|W[j, n]|^(1-a) per input channel (1 where either is 0).

    absmax [*b, K]; w [*b, K, N] -> s [*b, K]."""
    m = np.asarray(absmax, np.float64)
    wmax = np.abs(np.asarray(w, np.float64)).max(axis=-1)
    ok = (m > 0) & (wmax > 0)
    s = np.where(ok, np.power(np.where(ok, m, 1.0), strength) /
                 np.power(np.where(ok, wmax, 1.0), 1.0 - strength), 1.0)
    return np.clip(s, 1e-5, 1e5).astype(np.float32)


def search_clip(w: np.ndarray, gram: Optional[np.ndarray], *, bits: int,
                grid=DEFAULT_CLIP_GRID) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel symmetric clip ratio γ from `grid` minimizing the output error of column n,
    e_nᵀ H e_n with e_n = w_n - Q_γ(w_n) and H = Σ x xᵀ (identity without calibration).

    w [*b, K, N], gram [*b, K, K] -> (γ [*b, N], error [*b, N] at the chosen γ, error at γ=1).
    """
    w = np.asarray(w, np.float64)
    _, qmax = qrange(bits, True)
    amax = np.abs(w).max(axis=-2)  # [*b, N]
    h = None if gram is None else np.asarray(gram, np.float64)
    errs = []
    for gamma in grid:
        s = np.where(amax > 0, gamma * amax / qmax, 1.0)[..., None, :]
        e = w - np.clip(np.round(w / s), -qmax, qmax) * s
        errs.append((e * e).sum(-2) if h is None else np.einsum("...kn,...kj,...jn->...n", e, h, e))
    errs = np.stack(errs)  # [grid, *b, N]
    best = errs.argmin(axis=0)
    gammas = np.asarray(grid, np.float64)[best].astype(np.float32)
    base = errs[list(grid).index(1.0)] if 1.0 in grid else errs[0]
    return gammas, np.take_along_axis(errs, best[None], 0)[0], base
