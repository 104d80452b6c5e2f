"""Shared fixtures: the tiny preset, initialised variables with a random router bias."""

import functools

import flax.linen as nn
import jax
import pytest

from lcjax.config_io import load_config, resolve_config_path
from lcjax.model import BIAS_COLLECTION, LongCatModel


def tiny_config(*overrides: str):
    return load_config(resolve_config_path("tiny"), overrides).model


@functools.lru_cache(maxsize=None)
def jitted_apply(cfg):
    """One compiled `LongCatModel(cfg).apply` per config (configs are frozen, hence hashable)."""
    return jax.jit(LongCatModel(cfg).apply, static_argnames=("return_aux", "return_kv"))


def init_variables(cfg, seed: int = 0, seq: int = 16):
    """Unboxed variables with a random correction bias (HF zero-inits it; random exercises it)."""
    ids = jax.numpy.zeros((1, seq), jax.numpy.int32)
    variables = nn.unbox(jax.jit(LongCatModel(cfg).init)(jax.random.key(seed), ids))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
    variables[BIAS_COLLECTION] = jax.tree.map(
        lambda b: 0.1 * jax.random.normal(next(keys), b.shape), variables[BIAS_COLLECTION])
    return variables


@pytest.fixture(scope="session")
def tiny():
    cfg = tiny_config()
    return cfg, init_variables(cfg)
