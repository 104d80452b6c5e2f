"""`triton_kernel` alone: torch CPU tensors through Triton's interpreter against a torch oracle.

Run with TRITON_INTERPRET=1 (triton_test.py starts a child pytest that way); skipped otherwise.
"""

import math
import os

import numpy as np
import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 before triton is imported", allow_module_level=True)
torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from pallas_kernels.block_sparse_attention import masks, sparsity, triton_kernel  # noqa: E402


def _oracle(q, k, v, mask, scale):
    """out [B,S,H,Dv], lse [B,H,S] in float64; GQA by repeating kv heads."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    s = torch.einsum("bshd,bthd->bhst", q.double(), k.double()) * scale
    s = s.masked_fill(~mask[:, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.nan_to_num(torch.exp(s - lse[..., None]))
    return torch.einsum("bhst,bthd->bshd", p, v.double()), lse


@pytest.mark.parametrize("layout, dtype, tol", [
    (masks.CausalLayout(), torch.float32, 1e-5),
    (masks.LozaLayout(16, 1, 2), torch.float16, 2e-2),
    (masks.SlidingWindowLayout(20), torch.float32, 1e-5),
])
def test_forward_kernel_matches_torch(layout, dtype, tol):
    batch, s_len, heads, groups, d_k, d_v, block = 2, 64, 4, 2, 32, 16, 16
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, s_len, heads, d_k, generator=gen).to(dtype)
    k = torch.randn(batch, s_len, groups, d_k, generator=gen).to(dtype)
    v = torch.randn(batch, s_len, groups, d_v, generator=gen).to(dtype)
    pos = torch.arange(s_len, dtype=torch.int32)[None].repeat(batch, 1)
    plan = sparsity.block_plan(layout, s_len, s_len, block, block, s_len, s_len)
    packed = torch.from_numpy(plan.by_q.packed())
    out = torch.empty(batch, s_len, heads, d_v, dtype=dtype)
    lse = torch.empty(batch, heads, s_len, dtype=torch.float32)
    scale = d_k**-0.5
    constants = dict(CAUSAL=True, WINDOW=getattr(layout, "window", 0),
                     LOZA_BLOCK=getattr(layout, "block_size", 0),
                     LOZA_SINK=getattr(layout, "sink_blocks", 0),
                     LOZA_LOCAL=getattr(layout, "local_blocks", 0))
    triton_kernel.interpreted(triton_kernel.attention_fwd)[(plan.num_q_blocks, batch * heads)](
        q, k, v, pos, pos, pos, pos, packed, out, lse, S=s_len, T=s_len, H=heads, G=groups,
        DK=d_k, DV=d_v, BLOCK_Q=block, BLOCK_K=block, PLAN_W=packed.shape[1],
        QK_SCALE=scale * math.log2(math.e), HAS_SEG=False,
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32", **constants)
    mask = torch.from_numpy(layout.to_dense(s_len, s_len))[None].repeat(batch, 1, 1)
    want_out, want_lse = _oracle(q, k, v, mask, scale)
    np.testing.assert_allclose(out.double().numpy(), want_out.numpy(), atol=tol, rtol=tol)
    np.testing.assert_allclose(lse.double().numpy(), want_lse.numpy(), atol=tol, rtol=tol)
    assert plan.density < 1.0 or isinstance(layout, masks.FullLayout)
