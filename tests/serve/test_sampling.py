"""Sampling against float64 numpy references written from the spec, and Monte-Carlo checks.

Penalties and filtered distributions are compared with independent references on mixed rows
(ties, -inf logits, extreme temperatures); sampling and speculative acceptance are checked for
their output distributions with chi-square tests at fixed seeds (each with a check that the
same test rejects a wrong distribution, so it can fail).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from lcjax.serve import sampling
from lcjax.serve.sampling import SamplingParams, sampling_tensors

NEG_INF = -np.inf


# ---------------------------------------------------------------- float64 references (from spec)

def ref_penalties(logits, counts, prompt, prev, rp, pres, freq):
    """vLLM penalties at each position; position s also counts prev[:, :s]."""
    b_, s_, _ = logits.shape
    out = logits.astype(np.float64)
    for b in range(b_):
        for s in range(s_):
            c = counts[b].astype(np.int64)
            for j in range(s):
                c[prev[b, j]] += 1
            x = out[b, s]
            seen = prompt[b] | (c > 0)
            x = np.where(seen, np.where(x > 0, x / rp[b], x * rp[b]), x)
            out[b, s] = x - freq[b] * c - pres[b] * (c > 0)
    return out


def ref_logprobs(logits, temp, top_p, top_k, min_p, greedy):
    """(log-probs, smallest distance of any filter decision from its threshold)."""
    b_, s_, v = logits.shape
    out = np.full(logits.shape, NEG_INF)
    margin = np.inf
    for b in range(b_):
        for s in range(s_):
            raw = logits[b, s]
            if greedy[b]:
                out[b, s, int(np.argmax(raw))] = 0.0
                continue
            # The spec scales in float32; everything after is float64.
            z = (raw.astype(np.float32) / np.float32(temp[b])).astype(np.float64)
            keep = z > NEG_INF
            if 0 < top_k[b] < v:
                kth = np.sort(z)[::-1][top_k[b] - 1]
                keep &= z >= kth
            if top_p[b] < 1:
                p = np.where(keep, np.exp(z - z.max()), 0.0)
                p /= p.sum()
                for i in np.flatnonzero(keep):
                    more = p[p > p[i]].sum()  # mass of strictly more probable tokens
                    margin = min(margin, abs(more - top_p[b]))
                    keep[i] = more < top_p[b]
            if min_p[b] > 0:
                ratio = np.exp(z - z.max())  # p_i / p_max, whatever the normalisation
                near = keep & (z < z.max())  # ties with the max are exact, not near a boundary
                margin = min(margin, np.min(np.abs(ratio[near] - min_p[b]), initial=np.inf))
                keep &= ratio >= min_p[b]
            zk = z[keep]
            out[b, s, keep] = zk - (zk.max() + np.log(np.sum(np.exp(zk - zk.max()))))
    return out, margin


def ref_log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def chi2_pvalue(counts, probs):
    """Pearson chi-square p-value; cells of probability 0 must be empty."""
    counts, probs = np.asarray(counts, np.float64).ravel(), np.asarray(probs, np.float64).ravel()
    assert counts[probs == 0].sum() == 0, "sampled a token of probability 0"
    n, nz = counts.sum(), probs > 0
    expected = n * probs[nz]
    stat = np.sum((counts[nz] - expected) ** 2 / expected)
    return stats.chi2.sf(stat, max(nz.sum() - 1, 1))


def assert_logprobs_equal(got, want):
    got = np.asarray(got, np.float64)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------- penalties

apply_penalties = jax.jit(sampling.apply_penalties)
sampling_logprobs = jax.jit(sampling.sampling_logprobs)


def test_penalties_match_reference_and_neutral_rows_are_bit_identical():
    rng = np.random.default_rng(0)
    b, s, v = 7, 3, 16
    logits = rng.normal(0, 3, (b, s, v)).astype(np.float32)
    logits[:, :, 0] = 0.0
    logits[:, :, 1] = -np.inf  # masked vocab entry
    logits[2, :, 2:6] = 1.5  # ties
    counts = rng.integers(0, 4, (b, v)) * (rng.random((b, v)) < 0.3)
    prompt = rng.random((b, v)) < 0.3
    prev = rng.integers(0, v, (b, s))
    prev[:, 1] = prev[:, 0]  # a repeated draft
    params = [SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25),
              SamplingParams(repetition_penalty=0.7),  # < 1 boosts seen tokens
              SamplingParams(temperature=0, repetition_penalty=2.0, frequency_penalty=-2.0),
              SamplingParams(presence_penalty=-1.5),
              SamplingParams(repetition_penalty=100.0, presence_penalty=2.0, frequency_penalty=2.0),
              SamplingParams(top_k=3, min_p=0.2),  # neutral penalties
              None]  # padding row
    t = sampling_tensors(params, b)
    got = apply_penalties(jnp.asarray(logits), jnp.asarray(counts, jnp.int32), jnp.asarray(prompt),
                          jnp.asarray(prev, jnp.int32), t)
    want = ref_penalties(logits, counts, prompt, prev, t.repetition_penalty.astype(np.float64),
                         t.presence_penalty.astype(np.float64), t.frequency_penalty.astype(np.float64))
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-6, atol=1e-6)
    assert not np.allclose(want[:5, 1:], logits[:5, 1:])  # the fixture exercises the penalties
    np.testing.assert_array_equal(np.asarray(got[5:]).view(np.uint32), logits[5:].view(np.uint32))


def test_penalties_single_position_ignores_prev_tokens():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 1, 8)).astype(np.float32)
    counts = np.zeros((2, 8), np.int32)
    t = sampling_tensors([SamplingParams(frequency_penalty=1.0)] * 2, 2)
    got = apply_penalties(jnp.asarray(logits), jnp.asarray(counts), jnp.zeros((2, 8), bool),
                          jnp.asarray([[3], [5]], jnp.int32), t)
    np.testing.assert_array_equal(got, logits)


# ---------------------------------------------------------------- filtered distributions

def _mixed_rows(v):
    P = SamplingParams
    return [P(), P(temperature=0), P(temperature=0), P(temperature=0.7, top_k=5), P(top_k=1),
            P(top_k=v), P(top_k=v - 1), P(top_k=-1, top_p=0.01), P(top_p=0.9, top_k=10),
            P(min_p=0.1), P(min_p=1.0), P(temperature=1.3, top_k=12, top_p=0.8, min_p=0.05),
            P(temperature=100.0, top_p=0.5), P(temperature=1e-3, top_p=0.95), P(top_k=4),
            P(top_p=0.6), P(top_k=7, top_p=0.7), P(temperature=0.5, min_p=0.3)]


def test_sampling_logprobs_match_reference():
    rng = np.random.default_rng(0)
    v, s = 40, 2
    params = _mixed_rows(v)
    b = len(params) + 2  # two padding rows
    logits = rng.normal(0, 2, (b, s, v)).astype(np.float32)
    logits[1:3] = np.round(logits[1:3])  # greedy rows with ties: first index wins
    logits[2, :, [3, 9]] = 50.0
    logits[4:8] = np.round(logits[4:8] * 2) / 2  # ties at the top-k / top-p boundaries
    logits[10] = np.round(logits[10])  # min_p = 1 keeps everything tied with the max
    logits[[4, 7, 10], :, 1:3] = 9.0  # tied maxima: top_k = 1, top_p = 0.01, min_p = 1 keep both
    logits[12:14] *= 1000.0  # extreme logits with extreme temperatures
    logits[14:17, :, :6] = -np.inf  # masked vocabulary
    logits[14, :, 10:16] = 8.0  # six tied maxima: top_k = 4 keeps all six
    t = sampling_tensors(params, b)
    got = sampling_logprobs(jnp.asarray(logits), t)
    want, margin = ref_logprobs(logits, t.temperature, t.top_p, t.top_k, t.min_p, t.greedy)
    assert margin > 1e-4, margin  # no decision sits on a float32 rounding boundary
    assert_logprobs_equal(got, want)
    kept = np.isfinite(want).sum(-1)
    assert (kept[1:3] == 1).all() and (kept[[0, 5]] == v).all()
    assert (kept[[4, 7, 10]] == 2).all() and (kept[14] == 6).all()
    assert np.asarray(got[2, :, 3] == 0).all()  # greedy tie: the first of the two maxima
    np.testing.assert_allclose(np.exp(np.asarray(got, np.float64)).sum(-1), 1.0, rtol=1e-5)


def test_sampling_logprobs_without_filters_is_log_softmax():
    """No row uses top-k/top-p: the sort is skipped and rows are plain tempered log-softmax."""
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 3, (3, 2, 9)).astype(np.float32)
    t = sampling_tensors([SamplingParams(), SamplingParams(temperature=2.0, min_p=0.0), None], 3)
    got = sampling_logprobs(jnp.asarray(logits), t)
    assert_logprobs_equal(got[:2], ref_log_softmax(logits[:2] / t.temperature[:2, None, None]))


@pytest.mark.parametrize("params, kept", [
    (SamplingParams(top_k=3), [1, 1, 1, 1, 1, 0]),  # k-th value 2 is tied: all three 2s kept
    (SamplingParams(top_k=2), [1, 1, 0, 0, 0, 0]),
    (SamplingParams(top_p=0.05), [1, 1, 0, 0, 0, 0]),  # the top token is tied: both kept
    (SamplingParams(top_p=0.75), [1, 1, 1, 1, 1, 0]),  # mass above the 2s is < 0.75: all kept
    (SamplingParams(min_p=1.0), [1, 1, 0, 0, 0, 0]),
    (SamplingParams(top_k=3, top_p=0.05), [1, 1, 0, 0, 0, 0]),
])
def test_tie_rule_by_hand(params, kept):
    logits = jnp.asarray([[[3.0, 3.0, 2.0, 2.0, 2.0, -1.0]]])
    got = sampling_logprobs(logits, sampling_tensors([params], 1))
    np.testing.assert_array_equal(np.isfinite(got[0, 0]), np.asarray(kept, bool))
    kept_z = np.asarray(logits[0, 0])[np.asarray(kept, bool)]
    np.testing.assert_allclose(np.exp(got[0, 0])[np.asarray(kept, bool)],
                               np.exp(kept_z) / np.exp(kept_z).sum(), rtol=1e-6)


# ---------------------------------------------------------------- sampling and keys

def _split_keys(seed, shape):
    n = math.prod(shape)
    return jax.random.key_data(jax.random.split(jax.random.key(seed), n)).reshape(*shape, 2)


@jax.jit
def _sample_many(logprobs, keys):
    """logprobs [B, S, V] sampled N times: keys [N, B, S, 2] -> tokens [N, B, S]."""
    return jax.vmap(sampling.sample, in_axes=(None, 0))(logprobs, keys)


def test_sample_frequencies_match_distribution():
    n = 20000
    probs = np.array([[0.5, 0.25, 0.15, 0.1, 0.0, 0.0], [0.0, 0.05, 0.05, 0.3, 0.3, 0.3]])
    with np.errstate(divide="ignore"):
        lp = np.log(probs).astype(np.float32)
    greedy = np.full((1, 6), NEG_INF, np.float32)
    greedy[0, 4] = 0.0
    logprobs = jnp.asarray(np.stack([lp, np.concatenate([greedy, lp[:1]])]))  # [B=2, S=2, V]
    tokens = np.asarray(_sample_many(logprobs, _split_keys(0, (n, 2, 2))))
    for row, pos, p in ((0, 0, probs[0]), (0, 1, probs[1]), (1, 1, probs[0])):
        counts = np.bincount(tokens[:, row, pos], minlength=6)
        assert chi2_pvalue(counts, p) > 1e-6, (row, pos, counts)
    assert (tokens[:, 1, 0] == 4).all()  # one-hot rows come out as their argmax
    # The same test rejects a slightly wrong distribution: it can fail.
    counts = np.bincount(tokens[:, 0, 0], minlength=6)
    assert chi2_pvalue(counts, [0.45, 0.3, 0.15, 0.1, 0, 0]) < 1e-6


def test_sample_is_deterministic_in_its_keys():
    logprobs = jax.nn.log_softmax(jax.random.normal(jax.random.key(3), (4, 2, 50)))
    keys = sampling.request_keys(jnp.asarray([1, 2, 3, 4], jnp.uint32), jnp.zeros(4, jnp.int32), 2)
    first = sampling.sample(logprobs, keys)
    np.testing.assert_array_equal(first, sampling.sample(logprobs, keys))
    draws = [sampling.sample(logprobs, sampling.request_keys(jnp.full(4, seed, jnp.uint32),
                                                             jnp.zeros(4, jnp.int32), 2))
             for seed in range(1, 6)]
    assert len({np.asarray(d).tobytes() for d in draws}) == 5  # different seeds, different text


def test_request_keys_fold_in_seed_and_step():
    seeds = np.array([0, 7, 2**31 + 5, 2**32 - 1], np.uint32)
    steps = np.array([0, 5, 100, 3], np.int32)
    keys = np.asarray(jax.jit(sampling.request_keys, static_argnums=2)(
        jnp.asarray(seeds), jnp.asarray(steps), 3))
    assert keys.shape == (4, 3, 2) and keys.dtype == np.uint32
    for b in range(4):
        for j in range(3):
            want = jax.random.key_data(jax.random.fold_in(jax.random.PRNGKey(seeds[b]), steps[b] + j))
            np.testing.assert_array_equal(keys[b, j], want)
    shifted = sampling.request_keys(jnp.asarray(seeds), jnp.asarray(steps + 1), 2)
    np.testing.assert_array_equal(keys[:, 1:], shifted)  # key of a token = f(seed, its index)
    assert len({k.tobytes() for k in keys.reshape(-1, 2)}) == 12


def test_token_logprobs_match_log_softmax():
    rng = np.random.default_rng(4)
    logits = rng.normal(0, 4, (2, 3, 11)).astype(np.float32)
    logits[1, 2, [2, 7]] = 20.0  # tie for best: lower id first
    tokens = rng.integers(0, 11, (2, 3))
    fn = jax.jit(sampling.token_logprobs, static_argnums=2)
    chosen, top_ids, top_lp = fn(jnp.asarray(logits), jnp.asarray(tokens, jnp.int32), 4)
    ref = ref_log_softmax(logits)
    np.testing.assert_allclose(chosen, np.take_along_axis(ref, tokens[..., None], -1)[..., 0],
                               atol=1e-5)
    order = np.argsort(-ref, axis=-1, kind="stable")[..., :4]
    np.testing.assert_array_equal(top_ids, order)
    np.testing.assert_allclose(top_lp, np.take_along_axis(ref, order, -1), atol=1e-5)
    assert top_ids[1, 2, 0] == 2 and top_ids[1, 2, 1] == 7
    _, ids0, lp0 = fn(jnp.asarray(logits), jnp.asarray(tokens, jnp.int32), 0)
    assert ids0.shape == (2, 3, 0) and lp0.shape == (2, 3, 0)


# ---------------------------------------------------------------- speculative acceptance

speculative_accept = jax.jit(sampling.speculative_accept)


def _log(p):
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(p, np.float64)).astype(np.float32)


def test_speculative_greedy_target_is_argmax_prefix_matching():
    k, v, b = 3, 7, 6
    rng = np.random.default_rng(5)
    raw = rng.normal(size=(b, k + 1, v)).astype(np.float32)
    target = sampling_logprobs(jnp.asarray(raw), sampling_tensors([None] * b, b))  # one-hot
    best = raw.argmax(-1)
    other = (best + 1) % v
    match = np.array([3, 0, 1, 2, 3, 1])  # drafts agree with the argmax for this many positions
    num_draft = np.array([3, 3, 3, 3, 2, 0])
    drafts = np.where(np.arange(k)[None] < match[:, None], best[:, :k], other[:, :k])
    draft_lp = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(b, k, v)), jnp.float32))
    # A draft distribution certain of the argmax, though its token differs: the residual
    # max(0, p - q) is all zero and the target itself is used.
    draft_lp = draft_lp.at[3, 2].set(jnp.asarray(_log(np.eye(v)[best[3, 2]])))
    want_n = np.minimum(match, num_draft)
    for seed in range(8):
        n, tokens = speculative_accept(target, draft_lp, jnp.asarray(drafts, jnp.int32),
                                       jnp.asarray(num_draft, jnp.int32), _split_keys(seed, (b,)))
        np.testing.assert_array_equal(n, want_n)
        for r in range(b):
            want = list(drafts[r, :want_n[r]]) + [best[r, want_n[r]]]
            want += [0] * (k + 1 - len(want))
            np.testing.assert_array_equal(tokens[r], want)


def _draw(key, logprobs, n):
    """n categorical draws from each of logprobs' rows: [n, J]."""
    keys = jax.random.split(key, n * logprobs.shape[0]).reshape(n, logprobs.shape[0])
    return jax.vmap(jax.vmap(jax.random.categorical))(keys, jnp.broadcast_to(logprobs, (n,) + logprobs.shape))


@jax.jit
def _two_tokens(p_lp, q_lp, num_draft, key):
    """Emit two tokens with speculative rounds of K=2 (a second round if the first emits one)."""
    n = num_draft.shape[0]
    k_draft, k_acc, k_draft2, k_acc2 = jax.random.split(key, 4)
    drafts = _draw(k_draft, q_lp, n)  # [n, 2]
    acc_keys = jax.random.key_data(jax.random.split(k_acc, n))
    target = jnp.broadcast_to(p_lp[:3], (n, 3) + p_lp.shape[1:])
    n_acc, tokens = sampling.speculative_accept(target, jnp.broadcast_to(q_lp, (n,) + q_lp.shape),
                                                drafts, num_draft, acc_keys)
    # Second round from position 1 (p is position- but not context-dependent), one draft.
    drafts2 = _draw(k_draft2, q_lp[1:2], n)
    _, tokens2 = sampling.speculative_accept(
        jnp.broadcast_to(p_lp[1:3], (n, 2) + p_lp.shape[1:]),
        jnp.broadcast_to(q_lp[1:2], (n, 1) + q_lp.shape[1:]), drafts2, jnp.ones(n, jnp.int32),
        jax.random.key_data(jax.random.split(k_acc2, n)))
    second = jnp.where(n_acc >= 1, tokens[:, 1], tokens2[:, 0])
    return n_acc, tokens, second, drafts


def test_speculative_preserves_target_distribution():
    n, v = 120000, 5
    p = np.array([[0.4, 0.3, 0.2, 0.1, 0.0],  # p_0, p_1, p_2: position-dependent targets
                  [0.05, 0.0, 0.15, 0.5, 0.3],
                  [0.2, 0.2, 0.2, 0.2, 0.2]])
    q = np.array([[0.1, 0.1, 0.0, 0.3, 0.5],  # q puts mass where p has none and vice versa
                  [0.3, 0.3, 0.3, 0.05, 0.05]])
    num_draft = np.arange(n) % 3  # 0, 1 and 2 drafts
    n_acc, tokens, second, drafts = map(np.asarray, _two_tokens(
        jnp.asarray(_log(p)), jnp.asarray(_log(q)), jnp.asarray(num_draft, jnp.int32),
        jax.random.key(11)))
    joint = np.zeros((v, v))
    np.add.at(joint, (tokens[:, 0], second), 1)
    assert chi2_pvalue(joint, np.outer(p[0], p[1])) > 1e-6
    for nd in range(3):
        rows = num_draft == nd
        assert chi2_pvalue(np.bincount(tokens[rows, 0], minlength=v), p[0]) > 1e-6, nd
        assert chi2_pvalue(np.bincount(second[rows], minlength=v), p[1]) > 1e-6, nd
        assert (n_acc[rows] <= nd).all()
    bonus = n_acc == 2  # after two acceptances the bonus token follows p_2
    assert chi2_pvalue(np.bincount(tokens[bonus, 2], minlength=v), p[2]) > 1e-6
    assert (tokens[np.arange(3)[None] > n_acc[:, None]] == 0).all()  # zeros after the last
    # Acceptance rates are sum(min(p, q)) per position (Leviathan et al., Theorem 3.5).
    two = num_draft == 2
    a0, a1 = np.minimum(p[0], q[0]).sum(), np.minimum(p[1], q[1]).sum()
    for got, want in (((n_acc[two] >= 1).mean(), a0), ((n_acc[two] == 2).mean(), a0 * a1)):
        assert abs(got - want) < 5 * math.sqrt(want * (1 - want) / two.sum()), (got, want)
    # The same test rejects the raw drafts, which follow q: it can fail.
    draft_joint = np.zeros((v, v))
    np.add.at(draft_joint, (drafts[:, 0], drafts[:, 1]), 1)
    assert chi2_pvalue(draft_joint * (np.outer(p[0], p[1]) > 0), np.outer(p[0], p[1])) < 1e-6


def test_speculative_accepts_everything_when_draft_equals_target():
    n, k, v = 4000, 3, 6
    p = jax.nn.log_softmax(2 * jax.random.normal(jax.random.key(0), (k + 1, v)))
    p = p.at[:, 0].set(-jnp.inf)
    q = jnp.broadcast_to(p[:k], (n, k, v))
    drafts = _draw(jax.random.key(1), p[:k], n)
    n_acc, tokens = speculative_accept(jnp.broadcast_to(p, (n, k + 1, v)), q, drafts,
                                       jnp.full((n,), k, jnp.int32), _split_keys(2, (n,)))
    assert (np.asarray(n_acc) == k).all()
    np.testing.assert_array_equal(tokens[:, :k], drafts)
    counts = np.bincount(np.asarray(tokens[:, k]), minlength=v)
    assert chi2_pvalue(counts, np.exp(np.asarray(p[k], np.float64))) > 1e-6


def test_speculative_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="drafts"):
        sampling.speculative_accept(jnp.zeros((1, 2, 4)), jnp.zeros((1, 2, 4)),
                                    jnp.zeros((1, 2), jnp.int32), jnp.zeros((1,), jnp.int32),
                                    jnp.zeros((1, 2), jnp.uint32))


# ---------------------------------------------------------------- params and tensors

def test_sampling_tensors_rows_and_padding():
    t = sampling_tensors([SamplingParams(temperature=0.5, top_k=-1, top_p=0.9, min_p=0.1,
                                         repetition_penalty=1.2),
                          SamplingParams(temperature=0, top_k=5, presence_penalty=1.0), None], 5)
    np.testing.assert_array_equal(t.greedy, [False, True, True, True, True])
    np.testing.assert_array_equal(t.temperature, [0.5, 1, 1, 1, 1])
    np.testing.assert_array_equal(t.top_k, [0, 0, 0, 0, 0])
    np.testing.assert_allclose(t.top_p, [0.9, 1, 1, 1, 1])
    np.testing.assert_allclose(t.min_p, [0.1, 0, 0, 0, 0])
    np.testing.assert_allclose(t.repetition_penalty, [1.2, 1, 1, 1, 1])
    np.testing.assert_allclose(t.presence_penalty, [0, 1, 0, 0, 0])
    assert t.top_k.dtype == np.int32 and t.temperature.dtype == np.float32 and t.greedy.dtype == bool
    with pytest.raises(ValueError, match="pad_to"):
        sampling_tensors([None] * 3, 2)


BAD = [
    ("temperature", -0.1), ("temperature", 100.5), ("temperature", float("nan")),
    ("temperature", "hot"), ("top_p", 0.0), ("top_p", 1.01), ("top_p", float("nan")),
    ("top_k", -2), ("top_k", 101), ("top_k", 2.5), ("min_p", -0.01), ("min_p", 1.5),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", 101.0),
    ("presence_penalty", 2.5), ("presence_penalty", -2.01), ("frequency_penalty", 3.0),
    ("frequency_penalty", -2.5), ("max_tokens", 0), ("max_tokens", 513), ("max_tokens", 1.5),
    ("stop_token_ids", (5, 100)), ("stop_token_ids", (-1,)), ("stop", tuple("abcdefghijklmnopq")),
    ("stop", ("ok", "")), ("stop", ("ok", 3)), ("logprobs", 21), ("logprobs", -1), ("seed", -1),
    ("seed", 2**63), ("min_tokens", -1), ("min_tokens", 17), ("ignore_eos", "yes"),
]


@pytest.mark.parametrize("field, value", BAD)
def test_validate_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value}).validate(vocab_size=100, max_tokens_limit=512)


def test_validate_accepts_edge_values():
    for kw in (dict(), dict(temperature=0), dict(temperature=100.0, top_p=1e-6), dict(top_k=-1),
               dict(top_k=100), dict(min_p=1.0), dict(repetition_penalty=100.0, seed=2**63 - 1),
               dict(presence_penalty=-2.0, frequency_penalty=2.0), dict(max_tokens=512),
               dict(stop=tuple("abcdefghijklmnop"), stop_token_ids=(0, 99), logprobs=20),
               dict(logprobs=0, min_tokens=16)):
        SamplingParams(**kw).validate(vocab_size=100, max_tokens_limit=512)
    SamplingParams(max_tokens=10**6).validate(vocab_size=100)  # no limit given


def test_create_coerces_and_rejects_unknown_keys():
    p = SamplingParams.create(stop="END", stop_token_ids=[3, 4], temperature=0, top_p=None, seed=5)
    assert p.stop == ("END",) and p.stop_token_ids == (3, 4) and p.top_p == 1.0 and p.seed == 5
    assert isinstance(p.temperature, float) and p.greedy
    assert SamplingParams.create(stop=["a", "b"], stop_token_ids=None).stop == ("a", "b")
    assert not SamplingParams.create(temperature=0.3).greedy
    with pytest.raises(ValueError, match="temprature"):
        SamplingParams.create(temprature=0.3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.top_p = 0.5
