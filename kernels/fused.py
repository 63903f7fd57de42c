"""Fused elementwise kernels of a Llama layer, each beside its torch twin (the definition and test oracle).

A batch-1 decode step moves ~0.3 GB of weights but launches hundreds of tiny kernels; in a CUDA graph each
costs ~2 µs, so the step is launch-bound. These three kernels replace the elementwise chains between the
GEMMs of a layer:
    add_rmsnorm  r = x + residual;  y = w * norm(r)            (~8 ops -> 1)
    rope_store   rotate q and k, write k and v into the cache  (~14 ops + 2 index_put -> 1)
    silu_mul     silu(gate) * up on the fused gate_up output   (3 ops -> 1)
Each computes in fp32 and rounds its result once (the kernels exactly as their twins). This is more precise
than Hugging Face's ops, which round after every step in the model dtype: with bf16 weights, keeping the residual
stream in fp32, the normalised row unrounded before the weight, silu(gate) unrounded before the product and
cos/sin in fp32 halves the logit error against fp32 (scripts/precision.py; docs/INTERNALS.md "Precision").
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


# ------------------------------------------------------------------------------------------ residual + RMSNorm
def add_rmsnorm_ref(x, residual, weight, eps):
    """r = x + residual in fp32 (residual None: r = x); y = weight * (r / sqrt(mean(r^2) + eps)), all in fp32 and
    rounded once to the model dtype.  Returns (y, r): r, the residual stream, stays fp32 (x and residual may be
    16-bit or fp32). Hugging Face adds in the model dtype and rounds r / rms before the weight: both cost accuracy."""
    r = x.float() if residual is None else x.float() + residual.float()
    y = weight.float() * (r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps))
    return y.to(torch.promote_types(weight.dtype, x.dtype)), r


@triton.jit
def _add_rmsnorm_kernel(
    X, R, W, Y, RO, n_cols, eps, sx, sr, sy, sro, HAS_RES: tl.constexpr, STORE_RES: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)  # one program per row (token)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(X + row * sx + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RES:
        x += tl.load(R + row * sr + cols, mask=ok, other=0.0).to(tl.float32)
    if STORE_RES:  # the fp32 residual stream
        tl.store(RO + row * sro + cols, x, mask=ok)
    rstd = tl.rsqrt(tl.sum(x * x, 0) / n_cols + eps)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * sy + cols, (w * (x * rstd)).to(Y.dtype.element_ty), mask=ok)


def add_rmsnorm_triton(x, residual, weight, eps):
    H = x.shape[-1]
    x2 = x.reshape(-1, H)
    r2 = x2 if residual is None else residual.reshape(-1, H)
    assert x2.stride(-1) == 1 and r2.stride(-1) == 1 and weight.is_contiguous()
    if residual is not None:
        assert residual.shape == x.shape
    y = torch.empty(x2.shape, device=x.device, dtype=torch.promote_types(weight.dtype, x.dtype))
    store = residual is not None or x.dtype != torch.float32  # an fp32 x alone is its own residual
    ro = torch.empty(x2.shape, device=x.device, dtype=torch.float32) if store else x2
    block = triton.next_power_of_2(H)
    _add_rmsnorm_kernel[(x2.shape[0],)](
        x2,
        r2,
        weight,
        y,
        ro,
        H,
        eps,
        x2.stride(0),
        r2.stride(0),
        y.stride(0),
        ro.stride(0),
        HAS_RES=residual is not None,
        STORE_RES=store,
        BLOCK=block,
        num_warps=min(16, max(1, block // 256)),
    )
    return y.view(x.shape), (ro.view(x.shape) if store else x)


# ------------------------------------------------------------------------------------------------ SwiGLU
def silu_mul_ref(gate_up):
    """gate_up [..., 2I] = [gate | up] -> silu(gate) * up [..., I], in fp32, rounded once (the unfused torch ops
    round silu(gate) too)."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)


@triton.jit
def _silu_mul_kernel(GU, O, n, s_gu, s_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n
    g = tl.load(GU + row * s_gu + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(GU + row * s_gu + n + cols, mask=ok, other=0.0).to(tl.float32)
    s = g / (1.0 + tl.exp(-g))  # silu(g) = g * sigmoid(g)
    tl.store(O + row * s_o + cols, (s * u).to(O.dtype.element_ty), mask=ok)


def silu_mul_triton(gate_up):
    n2 = gate_up.shape[-1]
    gu = gate_up.reshape(-1, n2)
    assert n2 % 2 == 0 and gu.stride(-1) == 1
    n = n2 // 2
    out = torch.empty(gu.shape[0], n, device=gu.device, dtype=gu.dtype)
    block = min(1024, triton.next_power_of_2(n))
    _silu_mul_kernel[(gu.shape[0], triton.cdiv(n, block))](
        gu, out, n, gu.stride(0), out.stride(0), BLOCK=block, num_warps=4
    )
    return out.view(*gate_up.shape[:-1], n)


# ------------------------------------------------------------------------------------- RoPE + KV-cache store
def rope_ref(x, cos, sin):
    """x [B, T, H, d], cos/sin [B, T, d] (the model passes fp32 tables): halves (x1, x2) -> (x1 c - x2 s, x2 c + x1 s),
    in fp32, rounded once to x's dtype (Hugging Face rounds cos/sin and each product and sum to the model dtype)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos[:, :, None].float() + rotated * sin[:, :, None].float()).to(x.dtype)


def rope_store_ref(q, k, v, cos, sin, k_cache, v_cache, start, n=None):
    """Rotate q and k; store token t of sequence b (t < n[b]; all T when n is None) at position start[b] + t:
    k_cache[b, :, start[b] + t] = rope(k)[b, t], v_cache likewise with v.  Returns rope(q) [B, T, Hq, d].
    q [B, T, Hq, d]; k, v [B, T, Hkv, d]; cos/sin [B, T, d]; caches [>=B, Hkv, L, d]; start, n [B] ints."""
    q, k = rope_ref(q, cos, sin), rope_ref(k, cos, sin)
    B, T = q.shape[:2]
    t = torch.arange(T, device=q.device).expand(B, T)
    keep = t < (T if n is None else n.to(t.device)[:, None])
    b, t = keep.nonzero(as_tuple=True)
    pos = start.to(t.device).long()[b] + t
    k_cache[b, :, pos] = k[b, t]
    v_cache[b, :, pos] = v[b, t]
    return q


@triton.jit
def _rotate(src, src_half, dst, dst_half, m, c1, c2, s1, s2):
    """Halves x1 (at src) and x2 (at src + src_half) -> x1 c - x2 s (at dst) and x2 c + x1 s (dst + dst_half)."""
    x1 = tl.load(src, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + src_half, mask=m, other=0.0).to(tl.float32)
    tl.store(dst, (x1 * c1 - x2 * s1).to(dst.dtype.element_ty), mask=m)
    tl.store(dst + dst_half, (x2 * c2 + x1 * s2).to(dst.dtype.element_ty), mask=m)


@triton.jit
def _rope_store_kernel(
    Q,
    K,
    V,
    COS,
    SIN,
    KC,
    VC,
    QO,
    START,
    NVALID,
    T,
    sqb,
    sqt,
    sqh,
    sqd,
    skb,
    skt,
    skh,
    skd,
    svb,
    svt,
    svh,
    svd,
    scb,
    sct,
    scd,
    ssb,
    sst,
    ssd,
    skcb,
    skch,
    skcl,
    skcd,
    svcb,
    svch,
    svcl,
    svcd,
    sob,
    sot,
    soh,
    sod,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    HALF: tl.constexpr,
    HQ_PAD: tl.constexpr,
    HKV_PAD: tl.constexpr,
    HALF_PAD: tl.constexpr,
    HAS_N: tl.constexpr,
):
    # One program per token (b, t): all its q heads, k heads and v heads as [heads, d/2] tiles.
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)  # 64-bit offsets: a cache can exceed 2**31 elements
    t = (pid % T).to(tl.int64)
    j = tl.arange(0, HALF_PAD)
    j_ok = j < HALF
    c1 = tl.load(COS + b * scb + t * sct + j * scd, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(COS + b * scb + t * sct + (j + HALF) * scd, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(SIN + b * ssb + t * sst + j * ssd, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(SIN + b * ssb + t * sst + (j + HALF) * ssd, mask=j_ok, other=0.0).to(tl.float32)[None, :]

    # q: rotate every head, write the contiguous output
    hq = tl.arange(0, HQ_PAD)[:, None]
    m = (hq < HQ) & j_ok[None, :]
    _rotate(
        Q + b * sqb + t * sqt + hq * sqh + j[None, :] * sqd,
        HALF * sqd,
        QO + b * sob + t * sot + hq * soh + j[None, :] * sod,
        HALF * sod,
        m,
        c1,
        c2,
        s1,
        s2,
    )

    # k (rotated) and v go to cache position start[b] + t, unless t is padding (t >= n[b])
    n_b = T
    if HAS_N:
        n_b = tl.load(NVALID + b)
    pos = tl.load(START + b).to(tl.int64) + t
    hk = tl.arange(0, HKV_PAD)[:, None]
    m = (hk < HKV) & j_ok[None, :] & (hk * 0 + t < n_b)  # (broadcast first: the interpreter rejects a scalar mask)
    _rotate(
        K + b * skb + t * skt + hk * skh + j[None, :] * skd,
        HALF * skd,
        KC + b * skcb + hk * skch + pos * skcl + j[None, :] * skcd,
        HALF * skcd,
        m,
        c1,
        c2,
        s1,
        s2,
    )
    src = V + b * svb + t * svt + hk * svh + j[None, :] * svd
    dst = VC + b * svcb + hk * svch + pos * svcl + j[None, :] * svcd
    tl.store(dst, tl.load(src, mask=m, other=0.0), mask=m)
    tl.store(dst + HALF * svcd, tl.load(src + HALF * svd, mask=m, other=0.0), mask=m)


def rope_store_triton(q, k, v, cos, sin, k_cache, v_cache, start, n=None):
    B, T, Hq, d = q.shape
    Hkv = k.shape[2]
    assert d % 2 == 0 and k.shape == v.shape == (B, T, Hkv, d) and cos.shape == sin.shape == (B, T, d)
    assert k_cache.shape[0] >= B and k_cache.shape[1] == Hkv and k_cache.shape[-1] == d
    qo = torch.empty(B, T, Hq, d, device=q.device, dtype=q.dtype)
    nv = start if n is None else n  # unread when n is None
    _rope_store_kernel[(B * T,)](
        q,
        k,
        v,
        cos,
        sin,
        k_cache,
        v_cache,
        qo,
        start,
        nv,
        T,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *cos.stride(),
        *sin.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *qo.stride(),
        HQ=Hq,
        HKV=Hkv,
        HALF=d // 2,
        HQ_PAD=triton.next_power_of_2(Hq),
        HKV_PAD=triton.next_power_of_2(Hkv),
        HALF_PAD=triton.next_power_of_2(d // 2),
        HAS_N=n is not None,
        num_warps=4 if Hq * d >= 2048 else 2,
    )
    return qo
