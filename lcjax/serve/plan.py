"""Serving memory plan before loading: weights, KV cache and headroom per device, sequences that fit.

Everything is computed from shapes on an abstract mesh (`jax.eval_shape` of the model's init,
the rule table of `parallel.rules`): no device and no weight is touched, so a plan for 8 x H200
runs on a laptop. Per device:
  parameters   every variable's shard under the rules (ceil per split dim); with a recipe, the
               quantized weights as `quant.abstract.abstract_quantize` stores them (int8 / packed
               int4 codes + float32 scales, smoothing, static scales), the rest in param_dtype;
  KV cache     per max_model_len sequence, as `serve.kv_cache` allocates it in the compute dtype:
               ceil((max_model_len + speculative tokens) / page_size) pages of page_size x (C+R)
               in every full-attention sublayer and the MTP layer, a LoZA ring of cache_tokens
               slots (+ int32 positions) per sparse sublayer, the n-gram history; plus one
               reserved page per pool. The engine replicates its cache on every device (the
               MLA latent is shared by every head, so each tensor-parallel device reads all of
               it; lcjax/serve/sharding.py), so every device holds every sequence;
  headroom     a fraction of device memory (default 10 %, vLLM's gpu_memory_utilization=0.9) for
               activations, logits, XLA workspace, compiled programs and fragmentation.
`max_sequences` = floor((device - parameters - headroom - reserved pages) / cache per sequence).
With A²ATS (`retrieval`) the device also holds codes and codebooks; with its host offload the
full-attention pools live in host memory (lcjax/serve/plan_kv.py), and `max_sequences` is the
smaller of what the device and the host budget (`host_bytes`: per process, holding a copy per
device) hold. Page key bounds (sparse verification) are counted when the engine keeps them.
Rules: what the server uses (`serving_plan`): `parallel.rules` when the config or an override
names it, else the weight-stationary `ep_tp`, or `ep_fsdp_tp` when `ep_tp` leaves no room.

`python -m lcjax.serve.plan --config longcat_flash --devices 8 --device-memory h200 --quant w8a8
mesh.data=1 mesh.expert=-1` prints the table; exit 2 with one line when it does not fit.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
from typing import Any, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import yaml
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from lcjax.config import Config, MeshConfig
from lcjax.config_io import load_config, resolve_config_path
from lcjax.model import BIAS_COLLECTION, LongCatModel
from lcjax.parallel.mesh import MESH_AXES, mesh_shape
from lcjax.parallel.rules import Rules, resolve_spec, rules_for, shard_bytes
from lcjax.quant.abstract import abstract_quantize
from lcjax.serve.plan_kv import KVBytes, add_kv_flags, kv_bytes, kv_settings

GB = 10**9
MIB = 2**20
DEFAULT_HEADROOM = 0.10
# Memory one device reports (nvidia-smi totals for GPUs, HBM per chip for TPUs).
DEVICE_MEMORY = {
    "h100": 81559 * MIB, "h200": 143771 * MIB, "h20": 97871 * MIB, "a100": 81920 * MIB,
    "a100-40gb": 40960 * MIB, "v5e": 16 * 2**30, "v5p": 95 * 2**30, "v6e": 32 * 2**30,
}
_UNITS = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
          "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}


def parse_size(text: Union[str, int], what: str = "memory") -> int:
    """Bytes of a size ("141GB", "80GiB", "2TB", 8e10); ValueError names `what` and the text."""
    if isinstance(text, int):
        value = text
    else:
        upper = str(text).strip().upper()
        unit = next((u for u in _UNITS if upper.endswith(u)), None)
        try:
            value = int(float(upper[: -len(unit)] if unit else upper) * (_UNITS[unit] if unit else 1))
        except ValueError:
            raise ValueError(f"{what} {text!r} is not a size like 141GB or 80GiB") from None
    if value <= 0:
        raise ValueError(f"{what} {text!r} must be positive")
    return value


def parse_device_memory(text: Union[str, int]) -> int:
    """Bytes from a device name (h100, h200, ...) or a size ("141GB", "80GiB", 8e10)."""
    key = str(text).strip().lower()
    if key in DEVICE_MEMORY:
        return DEVICE_MEMORY[key]
    try:
        return parse_size(text, "device memory")
    except ValueError as err:
        if "positive" in str(err):
            raise
        raise ValueError(f"device memory {text!r} is neither a device name "
                         f"({', '.join(sorted(DEVICE_MEMORY))}) nor a size like 141GB or "
                         "80GiB") from None


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device of one serving deployment; derived values are properties."""

    num_devices: int
    mesh: tuple  # ((axis, size), ...) in MESH_AXES order
    recipe: Optional[str]
    param_dtype: str
    cache_dtype: str
    max_model_len: int
    page_size: int
    param_bytes: int  # per device
    param_bytes_total: int  # whole model, unsharded
    quantized_bytes: int  # per device, QTensor arrays (0 without a recipe)
    cache_bytes_per_sequence: int  # one max_model_len sequence, on the device that holds it
    cache_reserved_bytes: int  # per device: the reserved page 0 of every pool
    device_bytes: Optional[int] = None
    headroom_fraction: float = DEFAULT_HEADROOM
    num_speculative_tokens: int = 0
    rules: str = ""  # parallel.rules the weights were placed by
    kv_retrieval: str = "none"  # "a2ats", "a2ats offload=host" (where the pools live)
    host_cache_bytes_per_sequence: int = 0  # one device's offloaded pools, in host memory
    host_cache_reserved_bytes: int = 0  # one device's reserved pages of offloaded pools
    codebook_bytes: int = 0  # per device, once: A²ATS codebooks
    bounds_bytes_per_sequence: int = 0  # page key bounds, part of cache_bytes_per_sequence
    host_bytes: Optional[int] = None  # host memory budget of the process; None: unbounded

    @property
    def headroom_bytes(self) -> int:
        return 0 if self.device_bytes is None else int(self.device_bytes * self.headroom_fraction)

    @property
    def cache_budget_bytes(self) -> Optional[int]:
        """Per device, what is left for sequences' pages after params, headroom, reserved pages."""
        if self.device_bytes is None:
            return None
        return (self.device_bytes - self.param_bytes - self.headroom_bytes
                - self.cache_reserved_bytes - self.codebook_bytes)

    @property
    def offload(self) -> bool:
        """Whether pools live in host memory (A²ATS offload=host)."""
        return self.host_cache_bytes_per_sequence > 0

    @property
    def host_copies(self) -> int:
        """Device caches whose offloaded pools one host holds: every device keeps a full copy
        (the engine replicates its cache), and one process holds all the plan's devices."""
        return self.num_devices

    @property
    def host_budget_bytes(self) -> Optional[int]:
        """Host memory left for sequences' offloaded pages (None: no offload or no host budget)."""
        if not self.offload or self.host_bytes is None:
            return None
        return self.host_bytes - self.host_copies * self.host_cache_reserved_bytes

    @property
    def host_sequences(self) -> Optional[int]:
        """max_model_len sequences the host budget holds (None: not bounded by the host)."""
        budget = self.host_budget_bytes
        return None if budget is None else max(
            0, budget // (self.host_copies * self.host_cache_bytes_per_sequence))

    @property
    def device_sequences(self) -> Optional[int]:
        """max_model_len sequences the device budget holds (None without device_bytes)."""
        budget = self.cache_budget_bytes
        return None if budget is None else max(0, budget // self.cache_bytes_per_sequence)

    @property
    def max_sequences(self) -> Optional[int]:
        """max_model_len sequences the deployment holds at once: what the device holds, capped
        by the host with offload (None without device_bytes)."""
        device, host = self.device_sequences, self.host_sequences
        return device if device is None or host is None else min(device, host)

    @property
    def pages_per_sequence(self) -> int:
        return math.ceil((self.max_model_len + self.num_speculative_tokens) / self.page_size)

    @property
    def num_pages(self) -> Optional[int]:
        """Pages of each pool (the engine's num_pages): max_sequences' pages + the reserved one."""
        seqs = self.max_sequences
        return None if seqs is None else seqs * self.pages_per_sequence + 1

    @property
    def fits(self) -> bool:
        return self.device_bytes is None or (self.max_sequences or 0) >= 1

    def summary(self) -> str:
        """One line: the numbers that decide whether the plan fits."""
        text = (f"parameters need {self.param_bytes / GB:.1f} GB per device, one "
                f"{self.max_model_len}-token sequence {self.cache_bytes_per_sequence / GB:.2f} GB of "
                f"cache, headroom {self.headroom_bytes / GB:.1f} GB "
                f"({self.headroom_fraction:.0%})")
        if self.device_bytes is not None:
            text += f"; a device has {self.device_bytes / GB:.1f} GB"
        if self.host_budget_bytes is not None:
            text += (f"; host memory {self.host_bytes / GB:.1f} GB holds {self.host_sequences} "
                     f"sequences' offloaded pages ({self.host_copies} device copies of "
                     f"{self.host_cache_bytes_per_sequence / GB:.2f} GB)")
        return text


def check_fits(plan: MemoryPlan) -> None:
    """ValueError naming the numbers when not one max_model_len sequence fits beside the weights."""
    if not plan.fits and plan.device_sequences and plan.host_sequences == 0:
        raise ValueError(f"memory plan does not fit: {plan.summary()}; give the offloaded KV "
                         "pages more host memory (--host-memory) or use a shorter max_model_len")
    if not plan.fits:
        raise ValueError(f"memory plan does not fit: {plan.summary()} "
                         f"({_mesh_text(plan.mesh)}, {plan.num_devices} devices); use more "
                         "devices, a quantization recipe, a shorter max_model_len or a mesh that "
                         "splits the weights further")


def _mesh_text(mesh: tuple) -> str:
    return "mesh " + " ".join(f"{a}={s}" for a, s in mesh)


@functools.lru_cache(maxsize=16)
def logical_variables(model_cfg) -> tuple:
    """(abstract variables, logical specs) of LongCatModel(model_cfg).init; nothing allocated."""
    boxed = jax.eval_shape(LongCatModel(model_cfg).init, jax.random.key(0),
                           jax.ShapeDtypeStruct((1, 8), jnp.int32))
    keep = ("params", BIAS_COLLECTION)
    specs = nn.get_partition_spec({k: boxed[k] for k in keep})
    return nn.unbox({k: boxed[k] for k in keep}), specs


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def _device_bytes(abstract, logical, sizes: Mapping[str, int], rules: Rules) -> int:
    leaves = jax.tree.leaves(abstract)
    specs = jax.tree.leaves(logical, is_leaf=_is_spec)
    mesh_specs = [resolve_spec(a.shape, tuple(s) + (None,) * (a.ndim - len(s)), sizes, rules)
                  for a, s in zip(leaves, specs, strict=True)]
    return shard_bytes(leaves, mesh_specs, sizes)


def cache_bytes(config: Config, max_model_len: int, page_size: int,
                num_speculative_tokens: int = 0) -> tuple[int, int]:
    """(bytes of one sequence's cache, bytes of the reserved page of every pool), unsharded,
    exact serving (plan_kv.kv_bytes splits them by device / host with A²ATS)."""
    kv = kv_bytes(config.model, max_model_len, page_size, num_speculative_tokens)
    return kv.device_per_sequence, kv.device_reserved


def memory_plan(config: Config, mesh: Union[MeshConfig, Mapping[str, int], None] = None,
                num_devices: int = 1, recipe: Optional[str] = None, max_model_len: Optional[int] = None,
                page_size: int = 16, device_bytes: Optional[int] = None, *,
                headroom: float = DEFAULT_HEADROOM, num_speculative_tokens: int = 0,
                retrieval: Any = None, page_bounds: bool = False,
                host_bytes: Optional[int] = None) -> MemoryPlan:
    """The memory plan of serving `config` on `num_devices` devices; no device is touched.

    Args:
      config: the run Config (model, parallel.rules; `config.mesh` when `mesh` is None).
      mesh: a MeshConfig (its -1 axis filled from num_devices) or axis sizes {"expert": 8, ...}.
      num_devices: devices in the deployment.
      recipe: a lcjax.quant recipe ("w8a8", "w4a16:group_size=64", ...) or None (float).
      max_model_len: prompt + completion tokens per sequence (default max_position_embeddings).
      page_size: tokens per KV page.
      device_bytes: memory of one device (see `parse_device_memory`); None plans bytes only.
      headroom: fraction of device memory kept for activations and workspace.
      num_speculative_tokens: MTP draft tokens per round (pages hold them too).
      retrieval: the A2ATSConfig of --kv-retrieval a2ats (codes, codebooks; offload='host'
        puts the full-attention pools in host memory), or None (exact).
      page_bounds: the engine keeps per-page key bounds (engine_state.page_bounds_needed).
      host_bytes: host memory for offloaded pools, per process (None: not bounded).
    """
    if num_devices < 1:
        raise ValueError(f"num_devices={num_devices} must be >= 1")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom={headroom} must be a fraction in [0, 1)")
    if page_size < 1:
        raise ValueError(f"page_size={page_size} must be >= 1")
    max_model_len = max_model_len or config.model.max_position_embeddings
    if max_model_len < 1:
        raise ValueError(f"max_model_len={max_model_len} must be >= 1")
    if isinstance(mesh, Mapping):
        unknown = set(mesh) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"mesh axes {sorted(unknown)} are not among {list(MESH_AXES)}")
        sizes = {a: int(mesh.get(a, 1)) for a in MESH_AXES}
        if math.prod(sizes.values()) != num_devices:
            raise ValueError(f"mesh {sizes} uses {math.prod(sizes.values())} devices, not "
                             f"num_devices={num_devices}")
    else:
        sizes = dict(zip(MESH_AXES, mesh_shape(mesh or config.mesh, num_devices)))
    rules = rules_for(config)
    abstract, logical = logical_variables(config.model)
    total = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(abstract))
    quantized = 0
    if recipe:
        qparams, qspecs = abstract_quantize(abstract["params"], logical["params"], config, recipe)
        abstract, logical = {**abstract, "params": qparams}, {**logical, "params": qspecs}
        total = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(abstract))
        qt = lambda x: type(x).__name__ == "QTensor"  # noqa: E731
        parts = [(a, s) for a, s in zip(jax.tree.leaves(qparams, is_leaf=qt),
                                        jax.tree.leaves(qspecs, is_leaf=lambda x: qt(x) or _is_spec(x)))
                 if qt(a)]
        quantized = sum(_device_bytes(a, s, sizes, rules) for a, s in parts)
    kv: KVBytes = kv_bytes(config.model, max_model_len, page_size, num_speculative_tokens,
                           retrieval=retrieval, page_bounds=page_bounds)
    placement = "none" if retrieval is None else (
        "a2ats offload=host" if retrieval.offload == "host" else "a2ats")
    return MemoryPlan(
        num_devices=num_devices, mesh=tuple((a, sizes[a]) for a in MESH_AXES),
        recipe=recipe or None, param_dtype=config.model.param_dtype, cache_dtype=config.model.dtype,
        max_model_len=max_model_len, page_size=page_size,
        param_bytes=_device_bytes(abstract, logical, sizes, rules), param_bytes_total=total,
        quantized_bytes=quantized, cache_bytes_per_sequence=kv.device_per_sequence,
        cache_reserved_bytes=kv.device_reserved, device_bytes=device_bytes,
        rules=config.parallel.rules, headroom_fraction=headroom,
        num_speculative_tokens=num_speculative_tokens, kv_retrieval=placement,
        host_cache_bytes_per_sequence=kv.host_per_sequence,
        host_cache_reserved_bytes=kv.host_reserved, codebook_bytes=kv.codebook_bytes,
        bounds_bytes_per_sequence=kv.bounds_per_sequence, host_bytes=host_bytes)


def _size(nbytes: int) -> str:
    """Decimal units: GB = 10^9 bytes (MB, kB below one GB)."""
    for unit, scale in (("GB", GB), ("MB", 10**6), ("kB", 10**3)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:,.2f} {unit}"
    return f"{nbytes} B"


# The server's rule tables: weight-stationary (no weight gathers per step) unless the weights,
# replicated over fsdp x expert, leave no room for a sequence; then the FSDP split.
SERVING_RULES, SERVING_FALLBACK_RULES = "ep_tp", "ep_fsdp_tp"


def rules_named(files: Sequence, overrides: Sequence[str]) -> bool:
    """Whether YAML `files` or dotted `overrides` set parallel.rules (else the server picks)."""
    return any(o.startswith("parallel.rules=") for o in overrides) or any(
        "rules" in ((yaml.safe_load(open(f)) or {}).get("parallel") or {}) for f in files)


def serving_plan(config: Config, mesh: Optional[MeshConfig], num_devices: int, *args,
                 rules_given: bool = False, **kwargs) -> MemoryPlan:
    """`memory_plan` under the rules the server picks: `config.parallel.rules` when
    `rules_given`, else SERVING_RULES, or SERVING_FALLBACK_RULES when that does not fit."""
    if rules_given:
        return memory_plan(config, mesh, num_devices, *args, **kwargs)
    plans = []
    for rules in (SERVING_RULES, SERVING_FALLBACK_RULES):
        parallel = dataclasses.replace(config.parallel, rules=rules)
        plans.append(memory_plan(dataclasses.replace(config, parallel=parallel), mesh, num_devices,
                                 *args, **kwargs))
        if plans[-1].fits:
            return plans[-1]
    return plans[0]


def format_plan(plan: MemoryPlan, title: str = "") -> str:
    """The plan as a small table (GB = 10^9 bytes)."""
    weights = f"{plan.recipe} + {plan.param_dtype}" if plan.recipe else plan.param_dtype
    rows = [("parameters, whole model", _size(plan.param_bytes_total))]
    rows.append(("parameters per device", _size(plan.param_bytes)))
    if plan.recipe:
        rows.append(("  of which quantized weights", _size(plan.quantized_bytes)))
    where = " on the device" if plan.offload else ""
    rows.append((f"KV cache per sequence{where} ({plan.max_model_len} tokens, {plan.cache_dtype})",
                 _size(plan.cache_bytes_per_sequence)))
    if plan.bounds_bytes_per_sequence:
        rows.append(("  of which page key bounds", _size(plan.bounds_bytes_per_sequence)))
    if plan.codebook_bytes:
        rows.append(("A²ATS codebooks per device", _size(plan.codebook_bytes)))
    if plan.offload:
        copies = f"{plan.host_copies} device cop{'ies' if plan.host_copies > 1 else 'y'}"
        rows.append((f"KV cache per sequence in host memory ({copies})",
                     _size(plan.host_copies * plan.host_cache_bytes_per_sequence)))
    if plan.device_bytes is not None:
        rows += [("device memory", _size(plan.device_bytes)),
                 (f"headroom ({plan.headroom_fraction:.0%})", _size(plan.headroom_bytes)),
                 ("left for the KV cache", _size(plan.cache_budget_bytes))]
        if plan.offload:
            rows += [("sequences the device memory holds", str(plan.device_sequences)),
                     ("host memory (--host-memory)",
                      "unbounded" if plan.host_bytes is None else _size(plan.host_bytes))]
            if plan.host_sequences is not None:
                rows.append(("sequences the host memory holds", str(plan.host_sequences)))
        rows += [("max_model_len sequences that fit", str(plan.max_sequences)),
                 ("KV pages per pool (--num-pages)", str(plan.num_pages)),
                 ("fits", "yes" if plan.fits else "NO")]
    head = title or "memory plan"
    head += f": {plan.num_devices} devices, {_mesh_text(plan.mesh)}"
    head += f" (rules {plan.rules})" if plan.rules and plan.num_devices > 1 else ""
    head += f", weights {weights}"
    head += f", KV retrieval {plan.kv_retrieval}" if plan.kv_retrieval != "none" else ""
    width = max(len(r[0]) for r in rows) + 2
    return "\n".join([head] + [f"  {name:<{width}}{value:>14}" for name, value in rows])


def main(argv: Optional[Sequence[str]] = None) -> int:
    from lcjax.cli import run_main

    parser = argparse.ArgumentParser(prog="python -m lcjax.serve.plan",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=None,
                        help="preset in configs/models or a YAML path; repeat to layer (default tiny)")
    parser.add_argument("--devices", type=int, default=1, help="devices in the deployment")
    parser.add_argument("--device-memory", default=None,
                        help=f"memory per device: {', '.join(sorted(DEVICE_MEMORY))} or a size (141GB)")
    parser.add_argument("--quant", default=None, metavar="RECIPE", help="lcjax.quant recipe (w8a8, w4a16, ...)")
    parser.add_argument("--dtype", default="bfloat16",
                        help="model.param_dtype and model.dtype before the overrides (default "
                             "bfloat16; 'config' keeps the config's)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="tokens per sequence (default: model.max_position_embeddings)")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--num-speculative-tokens", type=int, default=0)
    parser.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM,
                        help="fraction of device memory kept for activations (default 0.1)")
    add_kv_flags(parser)
    parser.add_argument("--traceback", action="store_true")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. mesh.expert=8")
    args = parser.parse_args(argv)

    def body() -> int:
        names = args.config or ["tiny"]
        dtype = [] if args.dtype == "config" else [f"model.param_dtype={args.dtype}",
                                                   f"model.dtype={args.dtype}"]
        config = load_config([resolve_config_path(c) for c in names], dtype + list(args.overrides))
        device = None if args.device_memory is None else parse_device_memory(args.device_memory)
        rules_given = rules_named([resolve_config_path(c) for c in names], args.overrides)
        plan = serving_plan(config, None, args.devices, args.quant, args.max_model_len,
                            args.page_size, device, headroom=args.headroom,
                            num_speculative_tokens=args.num_speculative_tokens,
                            rules_given=rules_given, **kv_settings(args))
        print(format_plan(plan, " + ".join(names)))
        check_fits(plan)
        return 0

    return run_main("python -m lcjax.serve.plan", body, args.traceback)


if __name__ == "__main__":
    sys.exit(main())
