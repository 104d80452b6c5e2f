"""ScMoE overlap in a sharded step: the MoE all-to-alls are independent of the dense work.

The shortcut MoE reads the first attention's output and is added only at the end of the layer,
so its dispatch/combine all-to-alls can run while the dense MLP and the second attention
compute. Checked on the compiled, scheduled module: on XLA:CPU collectives are synchronous, so
the test proves the dataflow (no dense dot waits on an all-to-all; the combine is consumed only
by the layer's final add) and the issue order; on a GPU it also checks that the asynchronous
all-to-all start/done pairs bracket dense dots.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from lcjax.config import ParallelConfig
from lcjax.config_io import load_config, resolve_config_path
from lcjax.model import LongCatModel
from lcjax.parallel import use_parallelism

from .conftest import mesh_of

_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = .*? ([\w-]+)\((.*?)\)(?:, |$)")


def _entry(hlo: str):
    """[(name, opcode, operand names, op_name)] of the ENTRY computation, in schedule order."""
    body = hlo[hlo.index("\nENTRY "):].split("\n}\n")[0].splitlines()[1:]
    out = []
    for line in body:
        m = _INSTR.match(line)
        if m:
            op_name = re.search(r'op_name="([^"]*)"', line)
            out.append((m.group(1), m.group(2), re.findall(r"%([\w.-]+)", m.group(3)),
                        op_name.group(1) if op_name else ""))
    return out


def _sharded_step_hlo(mesh):
    cfg = load_config(resolve_config_path("tiny"), ["model.num_layers=1", "model.loza.layer_pattern=00",
                                                    "model.mtp_layers=0", "model.scan_layers=false"]).model
    ids = jax.random.randint(jax.random.key(0), (8, 32), 3, cfg.vocab_size)
    variables = nn.unbox(jax.jit(LongCatModel(cfg).init)(jax.random.key(1), ids))

    def loss(params, ids):
        return jnp.mean(LongCatModel(cfg).apply({**variables, "params": params}, ids) ** 2)

    with use_parallelism(mesh, ParallelConfig(expert_dispatch="all_to_all")):
        return jax.jit(jax.value_and_grad(loss)).lower(variables["params"], ids).compile().as_text()


@pytest.fixture(scope="module")
def schedule():
    return _entry(_sharded_step_hlo(mesh_of(data=2, expert=4)))


def _dense_dots(schedule, sublayer):
    return [i for i, (_, op, _, name) in enumerate(schedule)
            if f"/{sublayer}/" in name and "dot_general" in name and "transpose" not in name
            and op in ("fusion", "dot", "custom-call")]


def test_dense_work_never_waits_on_the_moe_all_to_alls(schedule):
    index = {name: i for i, (name, *_) in enumerate(schedule)}
    deps = {}

    def waits_on_a2a(name):  # transitively, within the forward pass
        if name not in deps:
            i = index.get(name)
            deps[name] = False if i is None else (schedule[i][1].startswith("all-to-all") or any(
                waits_on_a2a(o) for o in schedule[i][2]))
        return deps[name]

    a2a = [i for i, (_, op, _, name) in enumerate(schedule) if op.startswith("all-to-all") and "moe" in name]
    assert len(a2a) >= 3  # forward dispatch (rows + expert ids) and combine, plus the backward's
    forward_dense = [i for s in ("mlp_0", "attn_1", "mlp_1") for i in _dense_dots(schedule, s)]
    assert forward_dense
    assert not any(waits_on_a2a(schedule[i][0]) for i in forward_dense)
    # the dispatch is issued before part of the dense work; the combine lands after all of it
    assert min(a2a) < max(_dense_dots(schedule, "mlp_1"))
    forward_a2a = [i for i in a2a if "transpose" not in schedule[i][3]]

    def ancestors(i, seen=None):
        seen = set() if seen is None else seen
        for o in schedule[i][2]:
            if o in index and index[o] not in seen:
                seen.add(index[o])
                ancestors(index[o], seen)
        return seen

    # ScMoE: the dispatch needs only the first attention, not the dense MLP or second attention
    dispatch_inputs = ancestors(min(forward_a2a))
    assert set(_dense_dots(schedule, "attn_0")) & dispatch_inputs
    assert not set(forward_dense) & dispatch_inputs
    combine = schedule[max(forward_a2a)][0]
    through = {combine} | {n for n, op, ops, _ in schedule if op == "get-tuple-element" and combine in ops}
    users = [i for i, (_, op, ops, _) in enumerate(schedule)
             if op != "get-tuple-element" and through.intersection(ops)]
    assert users and min(users) > max(forward_dense)  # the combine is first read after the dense work


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="async collectives: GPU only")
def test_async_all_to_all_brackets_dense_work_on_gpu(schedule):
    starts = [i for i, (_, op, _, _) in enumerate(schedule) if op == "all-to-all-start"]
    dones = [i for i, (_, op, _, _) in enumerate(schedule) if op == "all-to-all-done"]
    dense = [i for s in ("mlp_0", "attn_1", "mlp_1") for i in _dense_dots(schedule, s)]
    assert starts and dones
    assert any(s < d < e for s, e in zip(starts, dones) for d in dense)
