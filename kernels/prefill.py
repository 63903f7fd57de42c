"""Dense causal prefill attention: a FlashAttention-2 style Triton kernel and its torch twin.

Contract (docs/INTERNALS.md, "Dense prefill"):
    q [B, Hq, T, d], k/v [B, Hkv, L, d] (the cache, already holding this chunk), q_start/q_len [B] int32.
    Row i < q_len[b] of sequence b attends keys j <= q_start[b] + i; rows i >= q_len[b] are never written.
"""
import math
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


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
        qb = q[b, :, :n].float()                                         # [Hq, n, d]
        kb = k[b, :, :s0 + n].float().repeat_interleave(g, dim=0)       # [Hq, s0+n, d]
        vb = v[b, :, :s0 + n].float().repeat_interleave(g, dim=0)
        s = qb @ kb.transpose(-1, -2) * sm_scale                         # [Hq, n, s0+n]
        i = torch.arange(n, device=q.device)[:, None]
        j = torch.arange(s0 + n, device=q.device)[None, :]
        s = s.masked_fill(j > s0 + i, float("-inf"))                     # causal with offset
        o[b, :, :n] = (s.softmax(-1) @ vb).to(q.dtype)
    return o


@triton.jit
def _prefill_kernel(Q, K, V, O, QS, QL, qk_scale, n_m_tiles,
                    sqb, sqh, sqt, sqd, skb, skh, skt, skd,
                    svb, svh, svt, svd, sob, soh, sot, sod,
                    HQ: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    # Grid (B*Hq, n_m_tiles). The m-tile is the slow grid axis and is reversed, so the first programs
    # the GPU schedules are the last query tiles of every head: the longest causal rows go first and
    # the short ones fill the tail. Heads of one KV group are neighbours (same K/V tiles in L2).
    bh = tl.program_id(0)
    b = bh // HQ
    h = bh % HQ
    kvh = h // GROUP
    start_m = n_m_tiles - 1 - tl.program_id(1)
    q_start = tl.load(QS + b)
    q_len = tl.load(QL + b)
    m0 = start_m * BLOCK_M
    if m0 >= q_len:                       # tile fully beyond this sequence's q_len: nothing to do
        return

    offs_m = m0 + tl.arange(0, BLOCK_M)   # query rows of this tile (chunk-local index i)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < q_len
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
                mask=row_ok[:, None], other=0.0)
    # K is read transposed, [D, BLOCK_N], so that q @ kT is a plain dot.
    kT_ptrs = K + b * skb + kvh * skh + offs_n[None, :] * skt + offs_d[:, None] * skd
    v_ptrs = V + b * svb + kvh * svh + offs_n[:, None] * svt + offs_d[None, :] * svd

    # Online softmax state per row, in fp32 and in base 2: logits are t = (q.k) * sm_scale * log2(e),
    # so exp(x * sm_scale) == exp2(t). m = running max of t, l = running sum of exp2(t - m),
    # acc = running sum of exp2(t - m) * v. A new tile with max m' rescales l and acc by exp2(m - m').
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)

    # Key ranges. Row i sees keys j <= q_start + i. The first row of the tile (i = m0) sees j <= q_start + m0,
    # so every key tile ending at or before q_start + m0 + 1 is visible to all rows: no mask needed.
    # Keys from there up to the last valid row's diagonal (q_start + min(m0 + BLOCK_M, q_len)) straddle
    # the diagonal and are masked; nothing past it is touched.
    full_end = ((q_start + m0 + BLOCK_N) // BLOCK_N) * BLOCK_N
    hi = q_start + tl.minimum(m0 + BLOCK_M, q_len)

    for n0 in range(0, full_end, BLOCK_N):                   # stage 1: below the diagonal, unmasked
        kT = tl.load(kT_ptrs + n0 * skt)
        s = tl.dot(q, kT, input_precision=PREC) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs + n0 * svt)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new

    for n0 in range(full_end, hi, BLOCK_N):                  # stage 2: the diagonal tile(s), masked
        cols = n0 + offs_n
        col_ok = cols < hi
        kT = tl.load(kT_ptrs + n0 * skt, mask=col_ok[None, :], other=0.0)
        s = tl.dot(q, kT, input_precision=PREC) * qk_scale
        s = tl.where(cols[None, :] <= q_start + offs_m[:, None], s, float("-inf"))
        # The first masked tile holds key q_start + m0, visible to every row, so m_new is finite from
        # here on even for rows that see no key of a later masked tile (their p is exp2(-inf) = 0).
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs + n0 * svt, mask=col_ok[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new

    o = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :] * sod,
             o.to(O.dtype.element_ty), mask=row_ok[:, None])


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def prefill_config(d, dtype, interpret=None):
    """Tiles by rule, no run-time autotune. Hopper, d=128 16-bit: a 128x64 tile with 8 warps (two
    warpgroups of 64 rows each) keeps the fp32 acc (128x128) plus the s/p tile (128x64) in registers
    without spills, and 3 stages of K/V (2 x 3 x 16 KB) fit in shared memory. d=64 has half the
    registers and bytes per tile, so the key tile doubles to 128. fp32 inputs: half the tile."""
    interpret = _interpreting() if interpret is None else interpret
    if interpret:      # small tiles keep numpy fast; BLOCK_M != BLOCK_N exercises multi-tile diagonals
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=32 if d > 64 else 64, num_warps=4, num_stages=2)
    if d <= 64:
        return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)


def prefill_triton(q, k, v, q_start, q_len, sm_scale=None, out=None, *, config=None):
    """Causal flash attention forward; same semantics as prefill_ref. `config` overrides the tile rule."""
    B, Hq, T, d = q.shape
    Hkv = k.shape[1]
    assert Hq % Hkv == 0 and d in (16, 32, 64, 128, 256), (Hq, Hkv, d)
    assert k.shape[0] == B and k.shape[-1] == d and v.shape == k.shape
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    o = torch.empty_like(q) if out is None else out
    if T == 0 or B == 0:
        return o
    cfg = dict(config or prefill_config(d, q.dtype))
    bm, bn = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    q_start = q_start.to(device=q.device, dtype=torch.int32)
    q_len = q_len.to(device=q.device, dtype=torch.int32)
    n_m = triton.cdiv(T, bm)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"   # exact fp32 dots; 16-bit ignores it
    _prefill_kernel[(B * Hq, n_m)](
        q, k, v, o, q_start, q_len, sm_scale * LOG2E, n_m,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        HQ=Hq, GROUP=Hq // Hkv, D=d, BLOCK_M=bm, BLOCK_N=bn, PREC=prec, **cfg)
    return o
