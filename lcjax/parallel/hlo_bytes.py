"""Bytes each device sends across devices, counted from a compiled HLO module's text.

`collective_bytes(jax.jit(f).lower(*args).compile().as_text())` finds every all-reduce,
all-to-all, all-gather, reduce-scatter and collective-permute (sync ops, the async `-start`
forms, and ops wrapped in an `async-start` computation, which print as plain ops in their own
computation) and charges each the bandwidth-optimal volume one device sends, P = replica-group
size:

  all-reduce          2(P-1)/P * size     (ring: reduce-scatter then all-gather)
  all-to-all          (P-1)/P * size      (keeps 1/P of its buffer)
  all-gather          (P-1)/P * output size
  reduce-scatter      (P-1)/P * input size  (= (P-1) * output size)
  collective-permute  size, when some pair sends to another device

Static counts: an op inside a while loop (scan) body is counted once. The sizes are those of
the compiled module, so a backend's rewrites show: XLA:CPU, for one, promotes a bf16
all-reduce to float32 (twice the bytes a GPU's bf16 ring would send).
"""

from __future__ import annotations

import dataclasses
import re

KINDS = ("all-reduce", "all-to-all", "all-gather", "reduce-scatter", "collective-permute")

DTYPE_BYTES = {
    "pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2,
    "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8,
    "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e4m3fnuz": 1,
    "f8e5m2fnuz": 1, "f8e4m3b11fnuz": 1, "f8e3m4": 1, "f8e8m0fnu": 1, "f4e2m1fn": 0.5,
    "token": 0,
}

# "%name = <shape> <opcode>[-start](" ; the shape may be a tuple "(u8[1,8]{1,0}, ...)".
_OP_RE = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.+?)\s+"
                    r"(?P<kind>" + "|".join(KINDS) + r")(?P<start>-start)?\(")
_ARRAY_RE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_GROUPS_LIST_RE = re.compile(r"replica_groups=\{(\{[0-9,]*\}(?:,\{[0-9,]*\})*)?\}")
_GROUPS_IOTA_RE = re.compile(r"replica_groups=\[([0-9,]+)\]<=")
_PAIRS_RE = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")
_MODULE_DEVICES_RE = (re.compile(r"\bnum_partitions=(\d+)"), re.compile(r"\breplica_count=(\d+)"))


@dataclasses.dataclass(frozen=True)
class CollectiveOp:
    kind: str  # one of KINDS
    size_bytes: float  # output bytes of the op (the result of a -start form)
    group_size: int  # P; for collective-permute, the number of devices in its pairs
    sent_bytes: float  # bytes one device sends across devices (module docstring)
    line: str


def _array_bytes(shape_text: str) -> list[float]:
    """Bytes of each array in a (possibly tuple) shape string, in order."""
    out = []
    for dtype, dims in _ARRAY_RE.findall(shape_text):
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"unknown HLO element type {dtype!r} in {shape_text!r}")
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        out.append(float(count * DTYPE_BYTES[dtype]))
    return out


def _result_bytes(kind: str, is_start: bool, shape_text: str) -> float:
    arrays = _array_bytes(shape_text)
    if not is_start:
        return sum(arrays)  # a tuple result (CPU's all-to-all): all its operands' results
    if kind in ("all-gather", "collective-permute"):
        # all-gather-start: (operands..., results...); collective-permute-start:
        # (operand, result, u32[] contexts...).
        return arrays[1] if kind == "collective-permute" else sum(arrays[len(arrays) // 2:])
    return sum(arrays)  # all-reduce-start: the results


def _group_size(line: str, module_devices: int) -> int:
    if m := _GROUPS_IOTA_RE.search(line):  # [groups, size]<=[...]
        return int(m.group(1).split(",")[-1])
    if m := _GROUPS_LIST_RE.search(line):
        if m.group(1) is None:  # {}: one group of every device
            return module_devices
        return len(re.findall(r"\d+", m.group(1).split("}")[0]))
    return module_devices


def collective_ops(hlo_text: str) -> list[CollectiveOp]:
    """Every collective in a compiled HLO module's text, in order of appearance."""
    devices = 1
    for pattern in _MODULE_DEVICES_RE:
        if m := pattern.search(hlo_text):
            devices *= int(m.group(1))
    ops = []
    for line in hlo_text.splitlines():
        m = _OP_RE.match(line)
        if not m:
            continue
        kind, size = m["kind"], _result_bytes(m["kind"], bool(m["start"]), m["shape"])
        if kind == "collective-permute":
            pairs_m = _PAIRS_RE.search(line)
            pairs = [(int(a), int(b)) for a, b in
                     re.findall(r"\{(\d+),(\d+)\}", pairs_m.group(1) if pairs_m else "")]
            p = len({d for pair in pairs for d in pair})
            sent = size if any(a != b for a, b in pairs) else 0.0
        else:
            p = _group_size(line, devices)
            frac = (p - 1) / p
            sent = {"all-reduce": 2 * frac * size, "all-to-all": frac * size,
                    "all-gather": frac * size, "reduce-scatter": (p - 1) * size}[kind]
        ops.append(CollectiveOp(kind, size, p, sent, line.strip()))
    return ops


def collective_bytes(hlo_text: str) -> dict:
    """{kind: bytes one device sends across devices, for each of KINDS, "total": their sum}."""
    out = {kind: 0.0 for kind in KINDS}
    for op in collective_ops(hlo_text):
        out[op.kind] += op.sent_bytes
    out["total"] = sum(out[k] for k in KINDS)
    return out
