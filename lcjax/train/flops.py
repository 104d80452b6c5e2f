"""Model FLOPs per token (activated experts only, attention per its layout) and MFU."""

from __future__ import annotations

from typing import Optional

import jax

from lcjax.config import ModelConfig
from lcjax.params_count import count_params

# Dense bf16 peak FLOP/s per device kind (vendor figures, no sparsity).
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12,
}


def attended_tokens(seq_len: int, sparse: bool, model: ModelConfig) -> float:
    """Average keys per query in a causal row of seq_len: S/2, or capped by the LoZA window."""
    full = (seq_len + 1) / 2
    return float(min(full, model.loza.window_tokens)) if sparse else full


def train_flops_per_token(model: ModelConfig, seq_len: int, zero_share: float = 0.0) -> float:
    """6 x activated matmul params + attention (QK^T and PV: 6 x H x (Dqk + Dv) x keys, fwd+bwd),
    MTP head included (its layer and the shared lm_head applied to its hidden states)."""
    counts = count_params(model)
    expert = (counts.activated_max - counts.activated_min) / (model.num_layers * model.moe.top_k)
    ffn_slots = model.num_layers * model.moe.top_k * (1.0 - zero_share)
    matmul = counts.activated_min + ffn_slots * expert
    if model.mtp_layers:
        # Its embedding [V, M] is a lookup, but the shared lm_head [M, V] is applied again to
        # its hidden states: the two cancel in the matmul count. Its MLA attends causally.
        matmul += model.mtp_layers * counts.mtp
    a = model.mla
    per_key = a.num_heads * (a.qk_head_dim + a.v_head_dim)
    attended = [attended_tokens(seq_len, s, model) for s in model.sparse_layers]
    attended += [attended_tokens(seq_len, False, model)] * model.mtp_layers
    attn = sum(attended) * per_key
    return 6.0 * matmul + 6.0 * attn


def device_peak_flops(device: Optional[jax.Device] = None) -> Optional[float]:
    kind = (device or jax.devices()[0]).device_kind
    for name, peak in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return peak
    return None
