"""The GRPO loss and its gradient against a plain-numpy implementation on random inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.rl.objective import ObjectiveConfig, group_advantages, grpo_loss, informative

CFG = ObjectiveConfig(eps_neg_low=0.2, eps_pos_high=0.28, eps_neg_high=1.0, is_cap=1.5)


def numpy_loss_and_grad(logp, logp_old, logp_roll, adv, mask, n_seq, t_max, cfg):
    """Loss and d loss / d logp, written case by case (no autodiff)."""
    r = np.exp(logp - logp_old)
    w = np.minimum(np.exp(logp_old - logp_roll), cfg.is_cap)
    a = np.broadcast_to(adv[:, None], r.shape)
    lo, hi, dual = 1 - cfg.eps_neg_low, 1 + cfg.eps_pos_high, 1 + cfg.eps_neg_high
    obj = np.empty_like(r)
    dobj = np.empty_like(r)  # d obj / d logp = d obj / d r * r
    for idx in np.ndindex(r.shape):
        ri, ai = r[idx], a[idx]
        if ai >= 0 and ri > hi:  # above the upper clip: the clipped side is smaller, constant
            obj[idx], dobj[idx] = hi * ai, 0.0
        elif ai < 0 and ri < lo:  # below the lower clip: lo * A is smaller, constant
            obj[idx], dobj[idx] = lo * ai, 0.0
        elif ai < 0 and ri > dual:  # dual clip: bounded below by dual * A, constant
            obj[idx], dobj[idx] = dual * ai, 0.0
        else:
            obj[idx], dobj[idx] = ri * ai, ai * ri
    denom = max(n_seq, 1) * t_max
    loss = -np.sum(mask * w * obj) / denom
    grad = -mask * w * dobj / denom
    return loss, grad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_and_gradient_match_numpy(seed):
    rng = np.random.default_rng(seed)
    b, t, t_max = 6, 9, 12
    logp = rng.uniform(-3, -0.05, (b, t)).astype(np.float32)
    logp_old = (logp + rng.normal(0, 0.5, (b, t))).astype(np.float32)  # ratios over every clip
    logp_roll = (logp_old + rng.normal(0, 0.6, (b, t))).astype(np.float32)  # some weights capped
    adv = rng.normal(0, 1, (b,)).astype(np.float32)
    mask = (rng.uniform(size=(b, t)) < 0.8).astype(np.float32)
    want_loss, want_grad = numpy_loss_and_grad(logp.astype(np.float64), logp_old.astype(np.float64),
                                               logp_roll.astype(np.float64), adv.astype(np.float64),
                                               mask, b - 1, t_max, CFG)
    fn = lambda lp: grpo_loss(lp, jnp.asarray(logp_old), jnp.asarray(logp_roll), jnp.asarray(adv),
                              jnp.asarray(mask), b - 1, t_max, CFG)[0]
    loss, grad = jax.value_and_grad(fn)(jnp.asarray(logp))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-8)
    r = np.exp(logp - logp_old)
    # The random draw really exercises each branch.
    assert ((adv[:, None] > 0) & (r > 1 + CFG.eps_pos_high)).any()
    assert ((adv[:, None] < 0) & (r < 1 - CFG.eps_neg_low)).any()
    assert ((adv[:, None] < 0) & (r > 1 + CFG.eps_neg_high)).any()
    assert (np.exp(logp_old - logp_roll) > CFG.is_cap).any()


def test_on_policy_gradient_is_advantage_weighted_score():
    """r = 1, w = 1: the gradient is -A / (N T_max) per masked token (policy gradient)."""
    lp = jnp.full((2, 3), -1.0)
    adv = jnp.array([1.0, -2.0])
    mask = jnp.array([[1, 1, 0], [1, 0, 0]], jnp.float32)
    g = jax.grad(lambda x: grpo_loss(x, lp, lp, adv, mask, 2, 4, CFG)[0])(lp)
    np.testing.assert_allclose(g, -adv[:, None] * mask / 8, rtol=1e-6)


def test_group_advantages_and_filter():
    rewards = np.array([[1, 0, 0, 1], [1, 1, 1, 1]], np.float32)
    adv = group_advantages(rewards)
    np.testing.assert_allclose(adv[0], [1, -1, -1, 1], atol=1e-4)
    np.testing.assert_allclose(adv[1], 0, atol=1e-6)
    assert informative(rewards[0]) and not informative(rewards[1]) and not informative([0, 0])
    with pytest.raises(ValueError, match="shape"):
        group_advantages(np.zeros(3))


def test_config_validation_names_key():
    with pytest.raises(ValueError, match="objective.is_cap"):
        ObjectiveConfig(is_cap=0.0)
    with pytest.raises(ValueError, match="objective.eps_neg_high"):
        ObjectiveConfig(eps_neg_high=0.1)


def test_per_token_advantages_equal_per_sequence():
    rng = np.random.default_rng(4)
    lp, old, roll = (jnp.asarray(rng.normal(-1, 0.3, (3, 5)), jnp.float32) for _ in range(3))
    adv = jnp.asarray(rng.normal(size=3), jnp.float32)
    mask = jnp.ones((3, 5))
    a = grpo_loss(lp, old, roll, adv, mask, 3, 6, CFG)[0]
    b = grpo_loss(lp, old, roll, jnp.broadcast_to(adv[:, None], (3, 5)), mask, 3, 6, CFG)[0]
    np.testing.assert_allclose(a, b, rtol=1e-6)
