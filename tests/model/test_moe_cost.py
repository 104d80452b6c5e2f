"""XLA's cost analysis of the whole model: the MoE does useful work only on the default backend.

A tiny model widened so the experts dominate (32 routed + 16 zero experts, top-4), with layers
unrolled (`scan_layers=false`): XLA's cost analysis counts a scan / while body once, so a scanned
stack would report one layer. The compiled forward and train step (loss + gradient) must cost at
most 1.3x the analytic active FLOPs (lcjax.train.flops: 2 x activated matmul parameters per token
for the routed slots, attention over the causal half; x3 for training). ragged_dot, the old CPU
path, contracts every row against every expert and costs ~24x here.

On CPU the default runs training-shape tiles in a `lax.scan` (segments.Config.loop), whose body
XLA's cost analysis counts once. The test runs the same tiles as one batched einsum instead
(loop=False): segments_test checks that the loop is exactly those tiles, one per step.

Routing is made deterministic: the zero experts' correction bias is -1e9, so every top-k slot goes
to a routed expert and the routed-slot count is T x K (checked from the model's routing stats).
With zero experts chosen, a dropless static-shape MoE still provisions rows for all T x K slots
(which slots are zero is known only at run time), so its FLOPs exceed the routed ones by the
factor 1 / (1 - zero share); this test measures the grouped matmul's own overhead.
"""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from lcjax.model import BIAS_COLLECTION, LongCatModel, decode_step, init_cache
from lcjax.train.flops import train_flops_per_token
from pallas_kernels.grouped_matmul import api, segments
from .conftest import init_variables, tiny_config

pytestmark = pytest.mark.slow  # about 30 s of compiles on one core

BATCH, SEQ = 4, 512  # 2,048 tokens
MAX_RATIO = 1.3
WIDE_MOE = ("model.scan_layers=false", "model.hidden_size=128", "model.moe.num_experts=32",
            "model.moe.num_zero_experts=16", "model.moe.top_k=4", "model.moe.expert_ffn_size=256",
            "model.ngram.enabled=false", "model.mtp_layers=0", "model.loza.layer_pattern=0000")


@pytest.fixture(scope="module")
def wide():
    cfg = tiny_config(*WIDE_MOE)
    variables = init_variables(cfg)
    e = cfg.moe.num_experts
    variables[BIAS_COLLECTION] = jax.tree.map(lambda b: b.at[..., e:].set(-1e9),
                                              variables[BIAS_COLLECTION])
    ids = jax.random.randint(jax.random.key(3), (BATCH, SEQ), 3, cfg.vocab_size)
    return cfg, variables, ids


def _forward(cfg):
    return lambda variables, ids: LongCatModel(cfg).apply(variables, ids, return_aux=True)


def _train(cfg):
    def loss(params, variables, ids):
        logits = LongCatModel(cfg).apply({**variables, "params": params}, ids)
        target = jnp.take_along_axis(logits, ids[..., None], axis=-1)[..., 0]
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - target)

    return lambda variables, ids: jax.value_and_grad(loss)(variables["params"], variables, ids)


def _flops(fn, *args) -> float:
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


@pytest.fixture
def batched_tiles(monkeypatch):
    """segments' default tiles, run as one batched einsum (countable) rather than a loop."""
    default = segments.default_config
    monkeypatch.setattr(segments, "default_config", lambda *args, **kwargs: dataclasses.replace(
        default(*args, **kwargs), loop=False))


def test_forward_and_train_step_cost_at_most_1_3x_the_active_flops(wide, batched_tiles):
    cfg, variables, ids = wide
    assert api.default_order("cpu")[0] == "segments"
    _, aux = jax.jit(_forward(cfg))(variables, ids)
    zero_share = float(jnp.mean(aux.routing.zero_share))
    assert zero_share == 0.0  # every slot routed: the active FLOPs are deterministic
    train_active = BATCH * SEQ * train_flops_per_token(cfg, SEQ, zero_share)
    forward_ratio = _flops(_forward(cfg), variables, ids) / (train_active / 3)
    train_ratio = _flops(_train(cfg), variables, ids) / train_active
    assert forward_ratio <= MAX_RATIO and train_ratio <= MAX_RATIO, (forward_ratio, train_ratio)


def test_decode_step_reads_fewer_bytes_than_the_expert_weights(wide, monkeypatch):
    """Batch 1: the whole compiled step touches fewer bytes than all experts' weights (the old
    path reads and masks every expert at every step, so it touches more)."""
    cfg, variables, _ = wide
    cache = init_cache(cfg, 1, 64)
    token = jnp.ones((1, 1), jnp.int32)

    def bytes_accessed():  # a fresh function each time: a cached trace would keep the backend
        step = jax.jit(lambda v, c, t: decode_step(cfg, v, c, t))
        return step.lower(variables, cache, token).compile().cost_analysis()["bytes accessed"]

    moe = cfg.moe
    expert_bytes = cfg.num_layers * moe.num_experts * 3 * cfg.hidden_size * moe.expert_ffn_size * 4
    ours = bytes_accessed()
    monkeypatch.setitem(api.REGISTRY.orders, "cpu", ("xla",))
    ragged = bytes_accessed()
    assert ours < expert_bytes < ragged and ragged - ours > expert_bytes, (
        ours, expert_bytes, ragged)
