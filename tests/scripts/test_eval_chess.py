"""scripts/eval_chess.py: the weights-read count behind the "active params" column."""

import numpy as np

from tests.model.conftest import tiny_config

from . import load_script


def _seen(cfg, t, mlp_active, qa_active):
    """chess.activity-shaped counts for two scanned layers: dense MLPs, experts, q_a, o, MTP."""
    l, m, f, fe = cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size, cfg.moe.expert_ffn_size
    rows = np.full(l, float(t))
    site = lambda act, r, ch: {"active": np.full(l, act), "rows": r, "channels": ch}  # noqa: E731
    hd = cfg.mla.num_heads * cfg.mla.v_head_dim
    seen = {("layers", f"mlp_{i}", "gate"): site(mlp_active * t * f, rows, f) for i in (0, 1)}
    seen[("layers", "moe", "gate")] = site(2.0 * t * fe, 2 * rows, fe)  # 2 routed slots, all active
    for i in (0, 1):
        seen[("layers", f"attn_{i}", "q_a")] = site(qa_active * t * m, rows, m)
        seen[("layers", f"attn_{i}", "o")] = site(1.0 * t * hd, rows, hd)
    seen[("mtp", "mlp", "gate")] = {"active": np.zeros(()), "rows": np.full((), t), "channels": f}
    return seen


def test_weight_reads_count_skipped_rows_and_columns_only():
    script = load_script("eval_chess")
    cfg = tiny_config()
    t, m, f, q, l = 10, cfg.hidden_size, cfg.ffn_hidden_size, cfg.mla.q_lora_rank, cfg.num_layers
    sparse, dense, ffn = script.weight_reads(cfg, _seen(cfg, t, 1.0, 1.0))
    assert sparse == dense and ffn == 0.0  # all active (and the MTP's zero activity ignored)
    sparse, dense2, ffn = script.weight_reads(cfg, _seen(cfg, t, 0.5, 0.25))
    assert dense2 == dense
    # Half the dense-MLP channels skip their W_up column and W_down row (2 MLPs x L layers);
    # 3/4 of q_a's input channels skip their W_q_a row (2 sublayers x L layers).
    saved = 2 * l * (2 * m * (f // 2) * t) + 2 * l * (0.75 * m * t * q)
    assert dense - sparse == saved
    fe = cfg.moe.expert_ffn_size
    assert np.isclose(ffn, (2 * l * t * f / 2) / (2 * l * t * f + l * 2 * t * fe))
