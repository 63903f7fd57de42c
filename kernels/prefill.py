"""Dense causal prefill attention: a FlashAttention-2 style Triton kernel and its torch twin.

Contract (docs/INTERNALS.md, "Dense prefill"):
    q [B, Hq, T, d], k/v [B, Hkv, L, d] (the cache, already holding this chunk), q_start/q_len [B] int32.
    Row i < q_len[b] of sequence b attends keys j <= q_start[b] + i; rows i >= q_len[b] are never written.
"""

import math

import torch
import triton
import triton.language as tl

from .common import LOG2E
from .common import interpreting as _interpreting


def prefill_ref(q, k, v, q_start, q_len, sm_scale=None):
    """The definition: per sequence, softmax(q k^T * sm_scale + causal mask with offset) v, in fp32."""
    B, Hq, T, d = q.shape
    g = Hq // k.shape[1]
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    o = torch.zeros_like(q)
    for b in range(B):
        s0, n = int(q_start[b]), int(q_len[b])
        if n == 0:
            continue
        qb = q[b, :, :n].float()  # [Hq, n, d]
        kb = k[b, :, : s0 + n].float().repeat_interleave(g, dim=0)  # [Hq, s0+n, d]
        vb = v[b, :, : s0 + n].float().repeat_interleave(g, dim=0)
        s = qb @ kb.transpose(-1, -2) * sm_scale  # [Hq, n, s0+n]
        i = torch.arange(n, device=q.device)[:, None]
        j = torch.arange(s0 + n, device=q.device)[None, :]
        s = s.masked_fill(j > s0 + i, float("-inf"))  # causal with offset
        o[b, :, :n] = (s.softmax(-1) @ vb).to(q.dtype)
    return o


@triton.jit
def _prefill_kernel(
    Q,
    K,
    V,
    O,
    QS,
    QL,
    qk_scale,
    n_m_tiles,
    L,
    sqb,
    sqh,
    sqt,
    sqd,
    skb,
    skh,
    skt,
    skd,
    svb,
    svh,
    svt,
    svd,
    sob,
    soh,
    sot,
    sod,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TMA: tl.constexpr,
    PREC: tl.constexpr,
):
    # Grid (B*Hq, n_m_tiles). The m-tile is the slow grid axis and is reversed, so the first programs
    # the GPU schedules are the last query tiles of every head: the longest causal rows go first and
    # the short ones fill the tail. Heads of one KV group are neighbours (same K/V tiles in L2).
    bh = tl.program_id(0)
    b32 = bh // HQ
    b = b32.to(tl.int64)  # 64-bit offsets: a cache can exceed 2**31 elements
    h = bh % HQ
    kvh = h // (HQ // HKV)
    start_m = n_m_tiles - 1 - tl.program_id(1)
    q_start = tl.load(QS + b)
    q_len = tl.load(QL + b)
    m0 = start_m * BLOCK_M
    if m0 >= q_len:  # tile fully beyond this sequence's q_len: nothing to do
        return

    offs_m = m0 + tl.arange(0, BLOCK_M)  # query rows of this tile (chunk-local index i)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < q_len
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd, mask=row_ok[:, None], other=0.0)
    # K/V tiles: TMA (descriptors over the cache seen as [B*Hkv*L, D] rows) or pointers, with K read
    # transposed, [D, BLOCK_N], so that q @ kT is a plain dot.
    if TMA:
        kv_row = (b32 * HKV + kvh) * L  # int32 row coordinate of key 0 in the [B*Hkv*L, D] view
    else:
        kT_ptrs = K + b * skb + kvh * skh + offs_n[None, :] * skt + offs_d[:, None] * skd
        v_ptrs = V + b * svb + kvh * svh + offs_n[:, None] * svt + offs_d[None, :] * svd

    # Online softmax per row, fp32, base 2: with t = (q.k) * sm_scale * log2(e), exp(q.k * sm_scale) is
    # exp2(t). m = running max of t, l = running sum of exp2(t - m), acc = running sum of exp2(t - m) v.
    # A tile raising the max to m' rescales l and acc by alpha = exp2(m - m'); o = acc / l at the end.
    # (qk_scale is applied inside the exp2 argument, s * qk_scale - m', one FMA per score.)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)

    # Key ranges. Row i sees keys j <= q_start + i. The first row of the tile (i = m0) sees j <= q_start + m0,
    # so every key tile ending at or before q_start + m0 + 1 is visible to all rows: no mask needed.
    # Keys from there up to the last valid row's diagonal (q_start + min(m0 + BLOCK_M, q_len)) straddle
    # the diagonal and are masked; nothing past it is used.
    full_end = ((q_start + m0 + 1) // BLOCK_N) * BLOCK_N
    hi = q_start + tl.minimum(m0 + BLOCK_M, q_len)

    for n0 in range(0, full_end, BLOCK_N):  # stage 1: below the diagonal, unmasked
        if TMA:
            kT = K.load([kv_row + n0, 0]).T
        else:
            kT = tl.load(kT_ptrs + n0 * skt)
        s = tl.dot(q, kT, input_precision=PREC)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if TMA:
            v = V.load([kv_row + n0, 0])
        else:
            v = tl.load(v_ptrs + n0 * svt)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new

    for n0 in range(full_end, hi, BLOCK_N):  # stage 2: the diagonal tile(s), masked
        cols = n0 + offs_n
        col_ok = cols < hi
        if TMA:  # a TMA tile is whole: keys past hi (maybe garbage) are zeroed / masked below
            kT = K.load([kv_row + n0, 0]).T
            v = tl.where(col_ok[:, None], V.load([kv_row + n0, 0]), 0.0)
        else:
            kT = tl.load(kT_ptrs + n0 * skt, mask=col_ok[None, :], other=0.0)
            v = tl.load(v_ptrs + n0 * svt, mask=col_ok[:, None], other=0.0)
        s = tl.dot(q, kT, input_precision=PREC)
        s = tl.where((cols[None, :] <= q_start + offs_m[:, None]) & col_ok[None, :], s, float("-inf"))
        # The first masked tile holds key q_start + m0, visible to every row, so m_new is finite from
        # here on even for rows that see no key of a later masked tile (their p is exp2(-inf) = 0).
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new

    o = acc / l_i[:, None]
    tl.store(
        O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :] * sod,
        o.to(O.dtype.element_ty),
        mask=row_ok[:, None],
    )


def prefill_config(d, dtype, interpret=None):
    """Tiles by rule, no run-time autotune. Hopper, 16-bit: a 128x64 tile with 8 warps (two warpgroups
    of 64 query rows each) keeps the fp32 acc (128 x d) plus the scores (128x64) in registers without
    spills (184 registers at d=128), and 3 stages of K/V tiles fit in shared memory (1 program per SM).
    Measured on H200 (d=128): 128x64 s3 ~ 128x128 s3 > s4 > s2; TMA descriptors for K/V (TMA=True)
    were 5-10% slower than plain pointer loads, so they are off. fp32 inputs: half the tile.
    Interpreter: small tiles (fast numpy), BLOCK_M != BLOCK_N."""
    interpret = _interpreting() if interpret is None else interpret
    if interpret:
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1, TMA=False)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=32 if d > 64 else 64, num_warps=4, num_stages=2, TMA=False)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, TMA=False)


def _flat_rows(t):
    """t [B, H, L, d] as a [B*H*L, d] row matrix, if its strides allow (TMA needs 16-byte aligned rows)."""
    B, H, L, d = t.shape
    ok = (
        t.stride(3) == 1
        and t.stride(1) == L * t.stride(2)
        and t.stride(0) == H * t.stride(1)
        and (t.stride(2) * t.element_size()) % 16 == 0
        and t.data_ptr() % 16 == 0
        and B * H * L < 2**31
    )
    return torch.as_strided(t, (B * H * L, d), (t.stride(2), 1)) if ok else None


def prefill_triton(q, k, v, q_start, q_len, sm_scale=None, out=None, *, config=None):
    """Causal flash attention forward; same semantics as prefill_ref. `config` overrides the tile rule."""
    B, Hq, T, d = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    assert Hq % Hkv == 0 and d in (16, 32, 64, 128, 256), (Hq, Hkv, d)
    assert k.shape[0] == B and k.shape[-1] == d and v.shape == k.shape
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    o = torch.empty_like(q) if out is None else out
    if T == 0 or B == 0:
        return o
    cfg = dict(config or prefill_config(d, q.dtype))
    bm, bn, tma = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("TMA", False)
    q_start = q_start.to(device=q.device, dtype=torch.int32)
    q_len = q_len.to(device=q.device, dtype=torch.int32)
    kk, vv = k, v
    if tma:  # TMA descriptors over the flattened cache; a layout TMA cannot take falls back to pointers
        k2, v2 = _flat_rows(k), _flat_rows(v)
        tma = k2 is not None and v2 is not None
        if tma:
            from triton.tools.tensor_descriptor import TensorDescriptor

            kk = TensorDescriptor(k2, list(k2.shape), list(k2.stride()), [bn, d])
            vv = TensorDescriptor(v2, list(v2.shape), list(v2.stride()), [bn, d])
    n_m = triton.cdiv(T, bm)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"  # exact fp32 dots; 16-bit ignores it
    _prefill_kernel[(B * Hq, n_m)](
        q,
        kk,
        vv,
        o,
        q_start,
        q_len,
        sm_scale * LOG2E,
        n_m,
        L,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *o.stride(),
        HQ=Hq,
        HKV=Hkv,
        D=d,
        BLOCK_M=bm,
        BLOCK_N=bn,
        TMA=tma,
        PREC=prec,
        **cfg,
    )
    return o
