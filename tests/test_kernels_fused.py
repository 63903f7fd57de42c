"""Fused layer kernels (kernels/fused.py) against their torch twins, and the twins against Hugging Face's ops.

On CPU the Triton kernels run in the interpreter (fp16/fp32, small sizes that are not tile multiples); `gpu`
tests run bf16 on CUDA. Every test draws a fresh seed and prints it, so a failure can be replayed.
"""

import random

import pytest
import torch

from nanodp.kernels.fused import (
    add_rmsnorm_ref,
    add_rmsnorm_triton,
    rope_ref,
    rope_store_ref,
    rope_store_triton,
    silu_mul_ref,
    silu_mul_triton,
)

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if CUDA else [])
IDS = ["fp16", "fp32"] + (["bf16"] if CUDA else [])
# a rounding or two of the output apart (fp32 sums in another order, an intermediate cast), nothing more
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}


def seeded(tag):
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    print(f"{tag} seed={seed}")
    return seed


def rand(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, device=DEV) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("H", [100, 576])
def test_add_rmsnorm(dtype, H):
    seeded(f"add_rmsnorm H={H} {dtype}")
    x, res = rand(2, 3, H, dtype=dtype, scale=3.0), rand(2, 3, H, dtype=dtype)
    w = rand(H, dtype=dtype)
    for r in (None, res, res.float()):  # the model's residual stream is fp32
        y, r_out = add_rmsnorm_triton(x, r, w, 1e-5)
        y_ref, r_ref = add_rmsnorm_ref(x, r, w, 1e-5)
        assert y.dtype == y_ref.dtype == dtype and y.shape == y_ref.shape
        assert r_out.dtype == torch.float32 and torch.equal(r_out, r_ref)  # the residual add: one fp32 add
        torch.testing.assert_close(y, y_ref, atol=TOL[dtype][0], rtol=TOL[dtype][1])
    # a strided input (the last position of a [B, T, H] batch) reads the right rows
    y, _ = add_rmsnorm_triton(x[:, -1], res[:, -1], w, 1e-5)
    torch.testing.assert_close(
        y, add_rmsnorm_ref(x[:, -1], res[:, -1], w, 1e-5)[0], atol=TOL[dtype][0], rtol=TOL[dtype][1]
    )


def test_add_rmsnorm_ref_is_hugging_face():
    """fp32: bit-equal to Hugging Face's LlamaRMSNorm. fp16: HF adds the residual in fp16 and rounds r / rms before
    the weight; the twin rounds once, so it is within a rounding or two of HF's and closer to the fp64 value."""
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    seeded("rmsnorm vs HF")
    for dtype in (torch.float16, torch.float32):
        norm = LlamaRMSNorm(70, eps=1e-6).to(device=DEV, dtype=dtype)
        norm.weight.data = rand(70, dtype=dtype)
        x, res = rand(50, 70, dtype=dtype), rand(50, 70, dtype=dtype)
        with torch.no_grad():
            for r_in, hf, r in ((None, norm(x), x.double()), (res, norm(x + res), x.double() + res.double())):
                ours = add_rmsnorm_ref(x, r_in, norm.weight, 1e-6)[0]
                if dtype == torch.float32:
                    assert torch.equal(ours, hf)
                    continue
                torch.testing.assert_close(ours, hf, atol=4e-3, rtol=4e-3)
                exact = norm.weight.double() * r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + 1e-6)
                assert (ours.double() - exact).abs().mean() < (hf.double() - exact).abs().mean()


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("shape", [(1, 1, 1536), (3, 5, 140), (2, 2300)])
def test_silu_mul(dtype, shape):
    seeded(f"silu_mul {shape} {dtype}")
    gu = rand(*shape, dtype=dtype, scale=4.0)
    out, ref = silu_mul_triton(gu), silu_mul_ref(gu)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype
    torch.testing.assert_close(out, ref, atol=TOL[dtype][0], rtol=TOL[dtype][1])
    g, u = gu.double().chunk(2, -1)
    torch.testing.assert_close(ref.double(), g * torch.sigmoid(g) * u, atol=4 * TOL[dtype][0], rtol=4 * TOL[dtype][1])


def test_rope_ref_is_hugging_face():
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    seeded("rope vs HF")
    q, k, cos, sin = (
        rand(2, 3, 4, 32, dtype=torch.float32),
        rand(2, 3, 2, 32, dtype=torch.float32),
        rand(2, 3, 32, dtype=torch.float32),
        rand(2, 3, 32, dtype=torch.float32),
    )
    hq, hk = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # HF: [B, H, T, d]
    torch.testing.assert_close(rope_ref(q, cos, sin), hq.transpose(1, 2))
    torch.testing.assert_close(rope_ref(k, cos, sin), hk.transpose(1, 2))


def rope_case(B, T, Hq, Hkv, d, L, dtype, table_dtype=torch.float32):
    """q/k/v as strided views of one fused qkv projection output; caches one slot larger, NaN everywhere;
    cos/sin in table_dtype (the model's are fp32)."""
    qkv = rand(B, T, Hq + 2 * Hkv, d, dtype=dtype)
    q, k, v = qkv.split([Hq, Hkv, Hkv], dim=2)
    ang = torch.rand(B, T, d // 2, device=DEV) * 6.3
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(table_dtype), torch.cat([ang.sin()] * 2, -1).to(table_dtype)
    caches = [torch.full((B + 1, Hkv, L, d), float("nan"), device=DEV, dtype=dtype) for _ in range(4)]
    return q, k, v, cos, sin, caches


def check_rope_store(q, k, v, cos, sin, caches, start, n, dtype):
    kc, vc, kc_ref, vc_ref = caches
    qo = rope_store_triton(q, k, v, cos, sin, kc, vc, start, n)
    qo_ref = rope_store_ref(q, k, v, cos, sin, kc_ref, vc_ref, start, n)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(qo, qo_ref, atol=atol, rtol=rtol)
    assert torch.equal(kc.isnan(), kc_ref.isnan()), "written cache positions differ"
    torch.testing.assert_close(kc.nan_to_num(), kc_ref.nan_to_num(), atol=atol, rtol=rtol)
    assert torch.equal(vc.nan_to_num(), vc_ref.nan_to_num())  # v is copied, not computed
    return kc_ref


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("Hq,Hkv,d", [(9, 3, 64), (4, 4, 24), (6, 1, 128)], ids=["gqa3-d64", "mha-d24", "gqa6-d128"])
def test_rope_store_prefill_ragged(dtype, Hq, Hkv, d):
    seeded(f"rope_store prefill Hq={Hq} Hkv={Hkv} d={d} {dtype}")
    q, k, v, cos, sin, caches = rope_case(3, 7, Hq, Hkv, d, 30, dtype)
    i32 = dict(device=DEV, dtype=torch.int32)
    start, n = torch.tensor([0, 11, 23], **i32), torch.tensor([7, 1, 4], **i32)  # padding rows t >= n[b]
    kc = check_rope_store(q, k, v, cos, sin, caches, start, n, dtype)
    written = (~kc.isnan()).all(-1).all(1)  # [B + 1, L]: positions written in every KV head
    want = torch.zeros_like(written)
    for b in range(3):
        want[b, start[b] : start[b] + n[b]] = True
    assert torch.equal(written, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_rope_store_decode(dtype):
    """One token per sequence at its own write position (int64 from the cache lengths), no n."""
    seeded(f"rope_store decode {dtype}")
    q, k, v, cos, sin, caches = rope_case(4, 1, 9, 3, 64, 50, dtype, table_dtype=dtype)  # 16-bit tables work too
    start = torch.tensor([0, 49, 17, 3], device=DEV, dtype=torch.long)
    kc = check_rope_store(q, k, v, cos, sin, caches, start, None, dtype)
    assert (~kc.isnan()).all(-1).all(1).sum(1).tolist() == [1, 1, 1, 1, 0]
