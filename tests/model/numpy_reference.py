"""Float64 NumPy forward of the whole LongCat model, written from the spec, for parity tests.

Independent of lcjax's modules: it reads only the param tree (names and shapes) and the config.
Loops over tokens where that makes the math plainer (router, experts, n-gram history).
"""

from __future__ import annotations

import math

import numpy as np


def rmsnorm(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def silu(x):
    return x / (1.0 + np.exp(-x))


def rope_interleaved(x, pos, theta):
    """Rotate pairs (x[2i], x[2i+1]) by pos*theta^(-2i/d), HF output layout [evens | odds]."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = pos[..., None].astype(np.float64) * inv  # [S, d/2]
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * ang)[:, None, :]
    return np.concatenate([z.real, z.imag], axis=-1)


def allowed(q, k, sparse, loza):
    if k > q:
        return False
    if not sparse:
        return True
    b = loza.block_size
    return k // b < loza.sink_blocks or k // b >= q // b - (loza.local_blocks - 1)


def mla(x, p, pos, seg, sparse, cfg):
    a = cfg.mla
    s = x.shape[0]
    q = np.einsum("sq,qhd->shd", rmsnorm(x @ p["q_a"], p["q_a_norm"]["scale"], a.latent_norm_eps), p["q_b"])
    q = q * math.sqrt(cfg.hidden_size / a.q_lora_rank)
    ckv = x @ p["kv_a"]
    c = rmsnorm(ckv[:, : a.kv_lora_rank], p["kv_a_norm"]["scale"], a.latent_norm_eps)
    c = c * math.sqrt(cfg.hidden_size / a.kv_lora_rank)
    k_rope = rope_interleaved(ckv[:, None, a.kv_lora_rank:], pos, a.rope.theta)  # [S, 1, R]
    q_rope = rope_interleaved(q[..., a.qk_nope_head_dim:], pos, a.rope.theta)
    kv = np.einsum("sc,chd->shd", c, p["kv_b"])
    k = np.concatenate([kv[..., : a.qk_nope_head_dim],
                        np.broadcast_to(k_rope, (s, a.num_heads, a.qk_rope_head_dim))], -1)
    v = kv[..., a.qk_nope_head_dim:]
    qq = np.concatenate([q[..., : a.qk_nope_head_dim], q_rope], -1)
    out = np.zeros((s, a.num_heads, a.v_head_dim))
    for i in range(s):
        keys = [j for j in range(s) if seg[j] == seg[i] and allowed(pos[i], pos[j], sparse, cfg.loza)]
        sc = np.einsum("hd,jhd->hj", qq[i], k[keys]) * a.qk_head_dim ** -0.5
        w = np.exp(sc - sc.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        out[i] = np.einsum("hj,jhd->hd", w, v[keys])
    return np.einsum("shd,hdm->sm", out, p["o"])


def dense_mlp(x, p):
    return (silu(x @ p["gate"]) * (x @ p["up"])) @ p["down"]


def moe(x, p, bias, cfg):
    m = cfg.moe
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        logits = x[t] @ p["classifier"]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        ids = np.argsort(-(probs + bias), kind="stable")[: m.top_k]
        for e in ids:
            w = probs[e] * m.routed_scaling_factor
            if e >= m.num_experts:
                out[t] += w * x[t] if m.zero_expert_type == "identity" else 0.0
            else:
                h = silu(x[t] @ p["gate"][e]) * (x[t] @ p["up"][e])
                out[t] += w * (h @ p["down"][e])
    return out


def ngram_embed(ids, seg, p, cfg):
    """Token embedding averaged with the hashed n-gram tables (int64 ids, EOS/segment resets)."""
    v, ng = cfg.vocab_size, cfg.ngram
    tok = p["tokens"]["embedding"]
    out = tok[ids].copy()
    if not ng.enabled:
        return out
    s = len(ids)
    start = np.zeros(s, int)
    for t in range(1, s):
        start[t] = t if (ids[t - 1] == cfg.eos_token_id or seg[t] != seg[t - 1]) else start[t - 1]
    for j in range(ng.num_tables):
        n, mod = j // ng.split_num + 2, ng.vocab_size_ratio * v + 2 * j + 1
        for t in range(s):
            h = int(ids[t])
            for d in range(1, n):
                if t - d >= start[t]:
                    h += int(ids[t - d]) * pow(v, d, mod)
            out[t] += p["ngram"][f"table_{j}"][h % mod] @ p["ngram"][f"proj_{j}"]
    return out / (1 + ng.num_tables)


def forward(params, router_bias, cfg, ids, seg=None, pos=None):
    """Logits [S, V] (and MTP logits) for one row of token ids."""
    ids = np.asarray(ids)
    s = len(ids)
    seg = np.zeros(s, int) if seg is None else np.asarray(seg)
    if pos is None:
        pos = np.zeros(s, int)
        for t in range(1, s):
            pos[t] = pos[t - 1] + 1 if seg[t] == seg[t - 1] else 0
    eps = cfg.rms_norm_eps
    x = ngram_embed(ids, seg, params["embed"], cfg)
    sparse = cfg.sparse_layers
    for l in range(cfg.num_layers):
        p = {k: _index(v, l) for k, v in params["layers"].items()}
        bias = router_bias["layers"]["moe"]["e_score_correction_bias"][l]
        x1 = x + mla(rmsnorm(x, p["input_norm_0"]["scale"], eps), p["attn_0"], pos, seg, sparse[2 * l], cfg)
        n1 = rmsnorm(x1, p["post_norm_0"]["scale"], eps)
        m = moe(n1, p["moe"], bias, cfg)
        x2 = x1 + dense_mlp(n1, p["mlp_0"])
        x3 = x2 + mla(rmsnorm(x2, p["input_norm_1"]["scale"], eps), p["attn_1"], pos, seg, sparse[2 * l + 1], cfg)
        x = (x3 + dense_mlp(rmsnorm(x3, p["post_norm_1"]["scale"], eps), p["mlp_1"])) + m
    h = rmsnorm(x, params["final_norm"]["scale"], eps)
    logits = h @ params["lm_head"]
    if not cfg.mtp_layers:
        return logits, None
    mp = params["mtp"]
    nxt = np.concatenate([ids[1:], [cfg.pad_token_id]])
    e = rmsnorm(mp["embed"]["embedding"][nxt], mp["enorm"]["scale"], eps)
    z = np.concatenate([e, rmsnorm(h, mp["hnorm"]["scale"], eps)], -1) @ mp["eh_proj"]
    z = z + mla(rmsnorm(z, mp["input_norm"]["scale"], eps), mp["attn"], pos, seg, False, cfg)
    z = z + dense_mlp(rmsnorm(z, mp["post_norm"]["scale"], eps), mp["mlp"])
    return logits, rmsnorm(z, mp["final_norm"]["scale"], eps) @ params["lm_head"]


def _index(tree, l):
    if isinstance(tree, dict):
        return {k: _index(v, l) for k, v in tree.items()}
    return np.asarray(tree, np.float64)[l]
