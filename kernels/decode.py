"""Dense decode attention: split-KV flash-decoding (Triton) over the contiguous cache, and its torch twin.

Contract (docs/INTERNALS.md, "Dense decode"):
    q [B, Hq, d], k/v [B, Hkv, L, d], lens [B] int32: query head h of sequence b attends keys
    0 .. lens[b]-1 of KV head h // (Hq // Hkv). `max_len` (python int) only sizes the grid.
"""

import math

import torch
import triton
import triton.language as tl

from .common import LOG2E
from .common import interpreting as _interpreting
from .common import num_sms as _num_sms


def decode_ref(q, k, v, lens, sm_scale=None, max_len=None):
    """The definition: o[b, h] = softmax(k[b, h//g, :lens[b]] . q[b, h] * sm_scale) @ v[b, h//g, :lens[b]]."""
    B, Hq, d = q.shape
    g = Hq // k.shape[1]
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    o = torch.empty_like(q)
    for b in range(B):
        n = int(lens[b])
        kb = k[b, :, :n].float().repeat_interleave(g, dim=0)  # [Hq, n, d]
        vb = v[b, :, :n].float().repeat_interleave(g, dim=0)
        s = (kb @ q[b].float()[:, :, None])[..., 0] * sm_scale  # [Hq, n]
        o[b] = (s.softmax(-1)[:, None, :] @ vb)[:, 0].to(q.dtype)
    return o


@triton.jit
def _combine_head(Mp, Lp, Ap, row0, n_valid, o_ptrs, D: tl.constexpr, S_BLOCK: tl.constexpr):
    """Log-sum-exp combine of one query head's split partials (m_s, l_s, acc_s), base 2:
        M = max_s m_s,  w_s = exp2(m_s - M),  o = sum_s w_s acc_s / sum_s w_s l_s,
    over S_BLOCK splits at a time with the same running-max rescaling as the main loop."""
    offs_s = tl.arange(0, S_BLOCK)
    offs_d = tl.arange(0, D)
    m_run = tl.full([1], float("-inf"), tl.float32)
    l_run = tl.zeros([1], tl.float32)
    o_run = tl.zeros([D], tl.float32)
    for s0 in range(0, n_valid, S_BLOCK):
        s_ok = s0 + offs_s < n_valid
        r = row0 + s0 + offs_s
        m = tl.load(Mp + r, mask=s_ok, other=float("-inf"), cache_modifier=".cg")
        l = tl.load(Lp + r, mask=s_ok, other=0.0, cache_modifier=".cg")
        a = tl.load(Ap + r[:, None] * D + offs_d[None, :], mask=s_ok[:, None], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m_run, tl.max(m, 0))
        w = tl.where(s_ok, tl.math.exp2(m - m_new), 0.0)
        alpha = tl.math.exp2(m_run - m_new)
        l_run = l_run * alpha + tl.sum(l * w, 0)
        o_run = o_run * alpha + tl.sum(a * w[:, None], 0)
        m_run = m_new
    tl.store(o_ptrs, (o_run / l_run).to(o_ptrs.dtype.element_ty))


@triton.jit
def _decode_split_kernel(
    Q,
    K,
    V,
    O,
    Mp,
    Lp,
    Ap,
    CNT,
    LENS,
    qk_scale,
    chunk,
    n_splits,
    sqb,
    sqh,
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
    sod,
    HKV: tl.constexpr,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FUSED: tl.constexpr,
    S_BLOCK: tl.constexpr,
    PREC: tl.constexpr,
):
    # Program (b*Hkv + kv head, split) owns keys [split*chunk, split*chunk + chunk) of one KV head and
    # all GROUP query heads that share it: each K/V tile is loaded once and serves the whole group.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // HKV).to(tl.int64)  # 64-bit offsets: a cache can exceed 2**31 elements
    kvh = (pid % HKV).to(tl.int64)
    n_len = tl.load(LENS + b)
    start = split * chunk
    if start >= n_len:  # chunk beyond this sequence's length: nothing to read
        return
    end = tl.minimum(start + chunk, n_len)

    # The group's queries as the rows of one [G_PAD, D] tile; G_PAD >= 16 because tl.dot needs M >= 16,
    # rows >= GROUP are zeros (masked loads) and are never stored.
    rows = tl.arange(0, G_PAD)
    row_ok = rows < GROUP
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    h = kvh * GROUP + rows
    q = tl.load(Q + b * sqb + h[:, None] * sqh + offs_d[None, :] * sqd, mask=row_ok[:, None], other=0.0)
    kT_ptrs = K + b * skb + kvh * skh + offs_n[None, :] * skt + offs_d[:, None] * skd  # [D, BLOCK_N]
    v_ptrs = V + b * svb + kvh * svh + offs_n[:, None] * svt + offs_d[None, :] * svd  # [BLOCK_N, D]

    # Online softmax over the chunk, base 2 (t = q.k * sm_scale * log2 e): running max m, sum l, acc.
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < end
        kT = tl.load(kT_ptrs + n0 * skt, mask=col_ok[None, :], other=0.0)
        v = tl.load(v_ptrs + n0 * svt, mask=col_ok[:, None], other=0.0)
        s = tl.dot(q, kT, input_precision=PREC)  # [G_PAD, BLOCK_N]
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # finite: every tile holds >= 1 valid key
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new

    # Partial state of this split, un-normalised, fp32: scratch [B*Hq, n_splits] (+ [.., D] for acc).
    row = (b * HKV * GROUP + h) * n_splits + split
    tl.store(Mp + row, m_i, mask=row_ok)
    tl.store(Lp + row, l_i, mask=row_ok)
    tl.store(Ap + row[:, None] * D + offs_d[None, :], acc, mask=row_ok[:, None])

    if FUSED:
        # The last program of this (b, kv head) to finish combines all its splits (no second launch).
        # The barrier orders every thread's partial stores before the counter's release; acq_rel makes
        # them visible to the program that draws the count n_valid - 1.
        tl.debug_barrier()
        n_valid = tl.minimum(tl.cdiv(n_len, chunk), n_splits)
        if tl.atomic_add(CNT + pid, 1, sem="acq_rel") == n_valid - 1:
            tl.store(CNT + pid, 0)  # reset for the next launch / CUDA graph replay
            for r in tl.static_range(GROUP):
                hr = kvh * GROUP + r
                _combine_head(
                    Mp,
                    Lp,
                    Ap,
                    (b * HKV * GROUP + hr) * n_splits,
                    n_valid,
                    O + b * sob + hr * soh + offs_d * sod,
                    D,
                    S_BLOCK,
                )


@triton.jit
def _decode_combine_kernel(
    Mp, Lp, Ap, O, LENS, chunk, n_splits, sob, soh, sod, HQ: tl.constexpr, D: tl.constexpr, S_BLOCK: tl.constexpr
):
    # One program per (b, query head). Only splits s < cdiv(lens[b], chunk) ran; the others wrote
    # nothing and are never read.
    pid = tl.program_id(0)
    b = pid // HQ
    h = pid % HQ
    n_valid = tl.minimum(tl.cdiv(tl.load(LENS + b), chunk), n_splits)
    _combine_head(
        Mp, Lp, Ap, pid * n_splits, n_valid, O + b.to(tl.int64) * sob + h * soh + tl.arange(0, D) * sod, D, S_BLOCK
    )


def decode_config(B, Hkv, max_len, d, dtype, device, interpret=None):
    """Tiles and splits by rule. Decode is memory bound: each program streams its chunk of K and V once,
    so the grid must keep enough bytes in flight to saturate HBM while each program runs long enough to
    amortise its pipeline fill and partial write. Measured on H200 (bf16, both model shapes, B 1-32,
    8K-128K): best at about 2 programs per SM, and 10-15% worse when the grid overshoots that by a
    fraction of a wave, so splits = floor(2 * SMs / (B * Hkv)) (1 when B * Hkv is already >= 2 * SMs),
    and chunks of at least 4 tiles. Tiles of 16 KB per K or V load (64 keys at d=128, 128 at d=64),
    3 stages. The chunk is a multiple of BLOCK_N, so only a sequence's last tile is ragged. The fused
    last-program combine (FUSED=True) saves a launch but measured no faster, so it is off."""
    interpret = _interpreting() if interpret is None else interpret
    if interpret:
        block_n, stages, target, min_tiles = 32, 1, 8, 2
    else:
        block_n = 64 if d >= 128 or dtype == torch.float32 else 128
        stages, target, min_tiles = 3, 2 * _num_sms(device), 4
    n_tiles = max(1, triton.cdiv(max_len, block_n))
    splits = max(1, min(target // (B * Hkv), n_tiles // min_tiles))
    chunk_tiles = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, chunk_tiles)
    return dict(
        BLOCK_N=block_n, num_warps=4, num_stages=stages, splits=splits, chunk=chunk_tiles * block_n, FUSED=False
    )


_scratch = {}


def _get_scratch(device, B, Hkv, Hq, splits, d):
    """Partial (m, l, acc) buffers and split counters, allocated once per shape and reused (also by
    CUDA graphs, which keep their addresses: so they are never freed). One stream at a time: concurrent
    calls of the same shape would share them."""
    key = (str(device), B, Hkv, Hq, splits, d)
    buf = _scratch.get(key)
    if buf is None:
        ml = torch.empty(2, B * Hq * splits, device=device, dtype=torch.float32)
        acc = torch.empty(B * Hq * splits, d, device=device, dtype=torch.float32)
        cnt = torch.zeros(B * Hkv, device=device, dtype=torch.int32)  # the fused combine resets it
        buf = _scratch[key] = (ml[0], ml[1], acc, cnt)
    return buf


def decode_triton(q, k, v, lens, sm_scale=None, max_len=None, *, out=None, config=None):
    """Split-KV flash decoding; same semantics as decode_ref for lens[b] in [1, max_len]. No host sync:
    the grid depends only on shapes and max_len, so one launch can be captured per length bucket.
    `out` (optional, [B, Hq, d]) receives the result; `config` overrides the tile/split rule."""
    B, Hq, d = q.shape
    _, Hkv, L, _ = k.shape
    assert Hq % Hkv == 0 and v.shape == k.shape and k.shape[0] == B and k.shape[-1] == d
    group = Hq // Hkv
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    max_len = L if max_len is None else int(max_len)
    cfg = dict(config or decode_config(B, Hkv, max_len, d, q.dtype, q.device))
    splits, chunk, block_n = cfg.pop("splits"), cfg.pop("chunk"), cfg.pop("BLOCK_N")
    fused = cfg.pop("FUSED", False)
    assert chunk % block_n == 0 and splits * chunk >= max_len
    o = torch.empty_like(q) if out is None else out
    mp, lp, ap, cnt = _get_scratch(q.device, B, Hkv, Hq, splits, d)
    if lens.dtype != torch.int32 or lens.device != q.device:
        lens = lens.to(device=q.device, dtype=torch.int32)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    # splits combined per step: all of them in one step when the [S_BLOCK, d] fp32 tile stays small
    # (each extra step is a dependent round trip to memory at the very end of the kernel)
    s_block = min(8192 // d, max(2, triton.next_power_of_2(splits)))
    _decode_split_kernel[(B * Hkv, splits)](
        q,
        k,
        v,
        o,
        mp,
        lp,
        ap,
        cnt,
        lens,
        sm_scale * LOG2E,
        chunk,
        splits,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *o.stride(),
        HKV=Hkv,
        GROUP=group,
        G_PAD=max(16, triton.next_power_of_2(group)),
        D=d,
        BLOCK_N=block_n,
        FUSED=fused,
        S_BLOCK=s_block,
        PREC=prec,
        **cfg,
    )
    if not fused:
        _decode_combine_kernel[(B * Hq,)](
            mp, lp, ap, o, lens, chunk, splits, *o.stride(), HQ=Hq, D=d, S_BLOCK=s_block, num_warps=4
        )
    return o
