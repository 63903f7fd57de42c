"""Double-P decode, the fused attention pass and `sparse_triton` (same signature as `sparse_ref`).

Work list (written by _select_kernel, kernels/doublep_select.py), per (sequence, KV head) bh:
  meta[bh] = (S0, T0, T1, nX, nP): the exact stream is the steady ranges [0, S0) and [T0, T1) followed
             by nX listed tokens idx[bh, 0:nX) (storage indices, fixed capacity CAP); then nP
             pseudo-tokens, cluster ids pid[bh, 0:nP) (capacity C, cannot overflow).
  Dense fallback: when the selection needs more than CAP exact clustered tokens, the select kernel
             writes S0 = T0 = T1 = len, nX = nP = 0: the head's whole cache [0, len) becomes one range,
             which needs no list at all, so any length fits and nothing is synchronised with the host.
Launches: score (B*Hkv x chunks [+ the steady pass]), select (B*Hkv), attention (B*Hkv x NS splits) whose last
split per head combines the splits (a counter per head, reset by that program). Grids depend on shapes and
Python ints only, so a decode step can be captured in a CUDA graph.
"""

import math

import torch
import triton
import triton.language as tl

from .common import LOG2E, LOG2E_C, interpreting, num_sms
from .common import NEG_C as NEG
from .doublep import BINS_PER_NAT, NBINS, STAT_KEYS
from .doublep_select import _score_kernel, _select_kernel


@triton.jit
def _online(m, l, acc, s, vt, PREC: tl.constexpr):
    """One online-softmax step (base 2): rescale what was accumulated by 2^(m_old - m_new)."""
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
    return m_new, l, acc


@triton.jit
def _attn_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    z_ptr,
    vm_ptr,
    idx_ptr,
    pid_ptr,
    meta_ptr,
    po_ptr,
    pml_ptr,
    o_ptr,
    cnt_ptr,
    sq_b,
    sq_h,
    sk_b,
    sk_h,
    sk_l,
    sv_b,
    sv_h,
    sv_l,
    sm_b,
    sm_h,
    sm_c,
    so_b,
    so_h,
    qk_scale,
    HKV,
    C,
    CAP,
    NS,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NSP: tl.constexpr,
    PREC: tl.constexpr,
):
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    S0 = tl.load(meta_ptr + bh * 8 + 0)
    T0 = tl.load(meta_ptr + bh * 8 + 1)
    T1 = tl.load(meta_ptr + bh * 8 + 2)
    nX = tl.load(meta_ptr + bh * 8 + 3)
    nP = tl.load(meta_ptr + bh * 8 + 4)
    nT = T1 - T0
    nE = S0 + nT + nX
    r = tl.arange(0, GP)
    dd = tl.arange(0, D)
    q = tl.load(
        q_ptr + b.to(tl.int64) * sq_b + (h * G + r)[:, None] * sq_h + dd[None, :], mask=(r < G)[:, None], other=0.0
    )
    kb = k_ptr + b.to(tl.int64) * sk_b + h.to(tl.int64) * sk_h
    vb = v_ptr + b.to(tl.int64) * sv_b + h.to(tl.int64) * sv_h
    m = tl.full([GP], NEG, tl.float32)
    l = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)

    # Split-K over one list of tiles: TE exact tiles, then TP pseudo tiles; split sp takes a contiguous
    # share, so at small batch most programs run just one short dependent chain of loads.
    TE = tl.cdiv(nE, BLOCK_N)
    TT = TE + tl.cdiv(nP, BLOCK_N)
    per = tl.cdiv(TT, NS)
    lo = sp * per
    hi = tl.minimum(lo + per, TT)
    for tile in range(lo, tl.minimum(hi, TE)):
        p = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = p < nE
        j = p - S0 - nT  # position in the listed tokens
        sel = tl.load(idx_ptr + bh * CAP + j, mask=ok & (j >= 0), other=0)
        t = tl.where(p < S0, p, tl.where(j < 0, p - S0 + T0, sel))  # storage index
        kt = tl.load(kb + t[:, None] * sk_l + dd[None, :], mask=ok[:, None], other=0.0)
        vt = tl.load(vb + t[:, None] * sv_l + dd[None, :], mask=ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale  # log2 units
        s = tl.where(ok[None, :], s, float("-inf"))
        m, l, acc = _online(m, l, acc, s, vt, PREC)

    # pseudo-tokens: logit = the centroid z = q.C*scale + ln s (read back from the score kernel's scratch, no
    # centroid reload): the + ln s weighs the mean value vmean_i like s_i tokens with key C_i
    for tile in range(tl.maximum(lo, TE), hi):
        p = (tile - TE) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = p < nP
        cid = tl.load(pid_ptr + bh * C + p, mask=ok, other=0)
        s = (
            tl.load(z_ptr + (bh * G + r[:, None]) * C + cid[None, :], mask=(r < G)[:, None] & ok[None, :], other=0.0)
            * LOG2E_C
        )
        s = tl.where(ok[None, :], s, float("-inf"))
        vt = tl.load(
            vm_ptr + b.to(tl.int64) * sm_b + h * sm_h + cid[:, None] * sm_c + dd[None, :], mask=ok[:, None], other=0.0
        )
        m, l, acc = _online(m, l, acc, s, vt, PREC)

    part = bh * NS + sp
    tl.store(pml_ptr + part * 2 * GP + r, m)
    tl.store(pml_ptr + part * 2 * GP + GP + r, l)
    tl.store(po_ptr + (part * GP + r[:, None]) * D + dd[None, :], acc, mask=(r < G)[:, None])

    # the last split of this (sequence, KV head) to finish combines all of them (no combine launch): the
    # barrier orders every thread's partial stores before the counter's release; acq_rel makes them
    # visible to the program that draws NS - 1, which resets the counter for the next launch / graph replay
    tl.debug_barrier()
    if tl.atomic_add(cnt_ptr + bh, 1, sem="acq_rel") == NS - 1:
        tl.store(cnt_ptr + bh, 0)
        for rr in tl.static_range(G):
            _combine(po_ptr, pml_ptr, o_ptr, so_b, so_h, bh, b, h * G + rr, rr, NS, GP, D, NSP)


@triton.jit
def _combine(
    po_ptr, pml_ptr, o_ptr, so_b, so_h, bh, b, hq, r, NS, GP: tl.constexpr, D: tl.constexpr, NSP: tl.constexpr
):
    """Log-sum-exp combine of the splits of query head hq (row r of KV head bh):
    o = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s."""
    s = tl.arange(0, NSP)
    dd = tl.arange(0, D)
    part = bh * NS + s
    ms = tl.load(pml_ptr + part * 2 * GP + r, mask=s < NS, other=NEG)
    ls = tl.load(pml_ptr + part * 2 * GP + GP + r, mask=s < NS, other=0.0)
    w = tl.exp2(ms - tl.max(ms, 0))
    acc = tl.load(po_ptr + (part[:, None] * GP + r) * D + dd[None, :], mask=(s < NS)[:, None], other=0.0)
    o = tl.sum(w[:, None] * acc, 0) / tl.sum(w * ls, 0)
    tl.store(o_ptr + b.to(tl.int64) * so_b + hq * so_h + dd, o.to(o_ptr.dtype.element_ty))


_COUNTERS = {}


def _counters(dev, n):
    """Per-(sequence, KV head) split counters, zero between launches (the combining program resets its own):
    allocated once per device and grown, never freed, so CUDA graphs keep their address. One stream at a time."""
    buf = _COUNTERS.get(str(dev))
    if buf is None or buf.numel() < n:
        buf = _COUNTERS[str(dev)] = torch.zeros(max(n, 1024), device=dev, dtype=torch.int32)
    return buf


def _c(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def sparse_triton(q, layer, lens, tail_start, sinks, sp, stats_out=None, plan_out=None):
    """Triton Double-P decode; same signature, semantics and stats as `sparse_ref` (sp: a SparseConfig).
    plan_out (a dict, for tests and inspection) receives the work list: idx, pid, meta, cap."""
    q, k, v = _c(q), _c(layer.k), _c(layer.v)
    cent, vmean, logsize, cstart = _c(layer.centroids), _c(layer.vmean), _c(layer.logsize), _c(layer.cstart)
    B, Hq, d = q.shape
    _, Hkv, L, _ = k.shape
    C = cent.shape[2]
    assert d in (16, 32, 64, 128, 256) and Hq % Hkv == 0 and C >= 1
    g = Hq // Hkv
    GP = max(16, triton.next_power_of_2(g))
    GP2 = max(2, triton.next_power_of_2(g))
    BH = B * Hkv
    dev = q.device
    scale = 1.0 / math.sqrt(d)
    cap = max(1, L if sp.capacity is None else min(int(sp.capacity), L))
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    interp = interpreting()
    nsm = 2 if interp else num_sms(dev)
    lens = lens.to(torch.int32)
    tail_start = tail_start.to(torch.int32)
    topk = sp.mode == "topk"
    whole = sp.whole and not topk
    union = sp.group_rule == "union" and not topk
    floor = not topk and (sp.floor > 0 or sp.floor_frac > 0)

    # stage 1 chunks: enough programs to fill the GPU at batch 1
    BLOCK_C = 64 if d <= 64 else 32 if interp else 64
    per_head = triton.cdiv(C, BLOCK_C)
    chunk = BLOCK_C * max(1, triton.cdiv(per_head, max(1, triton.cdiv(2 * nsm, BH))))
    NCS = triton.cdiv(C, chunk)
    # attention splits: about two programs per SM, at most 64 per head
    NS = 3 if interp else max(1, min(64, triton.cdiv(2 * nsm, BH)))

    f32 = dict(device=dev, dtype=torch.float32)
    i32 = dict(device=dev, dtype=torch.int32)
    zbuf = torch.empty(BH * g * C, **f32)
    gauss = sp.estimate == "gauss"
    zc = torch.empty(BH * g * C, **f32) if gauss else zbuf  # pseudo-tokens read the centroid z
    kvar = _c(layer.kvar) if gauss else cent
    ml = torch.empty(BH * (NCS + whole) * 2 * GP, **f32)
    tok = torch.empty(BH * NBINS, **i32)
    idx = torch.empty(BH * cap, **i32)
    pid = torch.empty(BH * C, **i32)
    xd = torch.empty(BH * C, **i32)
    xo = torch.empty(BH * C, **i32)
    meta = torch.empty(BH * 8, **i32)
    st = torch.empty(len(STAT_KEYS), B, Hkv, **f32) if stats_out is None else stats_out
    assert st.shape == (len(STAT_KEYS), B, Hkv) and st.dtype == torch.float32 and st.is_contiguous()
    po = torch.empty(BH * NS * GP * d, **f32)
    pml = torch.empty(BH * NS * 2 * GP, **f32)
    o = torch.empty(B, Hq, d, device=dev, dtype=q.dtype)

    _score_kernel[(BH, NCS + whole)](
        q,
        cent,
        logsize,
        layer.ncl,
        zbuf,
        ml,
        kvar,
        zc,
        k,
        lens,
        tail_start,
        q.stride(0),
        q.stride(1),
        cent.stride(0),
        cent.stride(1),
        cent.stride(2),
        logsize.stride(0),
        logsize.stride(1),
        layer.ncl.stride(0),
        layer.ncl.stride(1),
        kvar.stride(0),
        kvar.stride(1),
        kvar.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        scale,
        Hkv,
        C,
        NCS,
        chunk,
        int(sinks),
        G=g,
        GP=GP,
        D=d,
        BLOCK_C=BLOCK_C,
        PREC=prec,
        EST=gauss,
        SPLIT=gauss,
        WHOLE=whole,
        num_warps=4,
    )

    # select: one program per (sequence, KV head), BLK clusters per step of its two passes: a [GP2, BLK] z tile
    # of ~8K fp32 (32 registers a thread at 8 warps), so 8K clusters take 4 dependent steps a pass on the GPU;
    # the interpreter keeps 256 so that small tests cross block boundaries
    BLK = 256 if interp else max(16, min(8192 // GP2, triton.next_power_of_2(C)))
    _select_kernel[(BH,)](
        zbuf,
        ml,
        cstart,
        layer.ncl,
        lens,
        tail_start,
        tok,
        idx,
        pid,
        xd,
        xo,
        meta,
        st,
        cstart.stride(0),
        cstart.stride(1),
        layer.ncl.stride(0),
        layer.ncl.stride(1),
        Hkv,
        C,
        NCS,
        cap,
        BH,
        int(sinks),
        float(sp.p1),
        float(sp.p2),
        int(sp.budget),
        int(sp.est_clusters),
        float(sp.floor),
        float(sp.floor_frac),
        BINS_PER_NAT / LOG2E,
        G=g,
        GP=GP,
        GP2=GP2,
        NCSP=max(2, triton.next_power_of_2(NCS)),
        NB=NBINS,
        BLK=BLK,
        MAXRULE=sp.group_rule == "max",
        UNION=union,
        WHOLE=whole,
        TOPK=topk,
        FLOOR=floor,
        TILE_R=64,
        TILE_J=32,
        num_warps=8,
    )

    if plan_out is not None:
        plan_out.update(idx=idx.view(BH, cap), pid=pid.view(BH, C), meta=meta.view(BH, 8), cap=cap)

    BLOCK_N = 16 if interp else 64
    _attn_kernel[(BH, NS)](
        q,
        k,
        v,
        zc,
        vmean,
        idx,
        pid,
        meta,
        po,
        pml,
        o,
        _counters(dev, BH),
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        vmean.stride(0),
        vmean.stride(1),
        vmean.stride(2),
        o.stride(0),
        o.stride(1),
        scale * LOG2E,
        Hkv,
        C,
        cap,
        NS,
        G=g,
        GP=GP,
        D=d,
        BLOCK_N=BLOCK_N,
        NSP=max(2, triton.next_power_of_2(NS)),
        PREC=prec,
        num_warps=8 if d >= 128 else 4,
        num_stages=2,
    )

    if stats_out is not None:  # the engine's per-step slab: no conversion launches
        return o, dict(zip(STAT_KEYS, st))
    stats = {key: st[i].int() for i, key in enumerate(STAT_KEYS)}  # the twin's dtypes
    stats.update(est_mass=st[4], fallback=st[5] != 0)
    return o, stats
