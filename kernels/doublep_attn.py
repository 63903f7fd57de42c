"""Double-P decode, the fused attention pass and `sparse_triton` (same signature as `sparse_ref`).

Work list (written by _select_kernel, kernels/doublep_select.py), per (sequence, KV head) bh:
  meta[bh] = (S0, T0, T1, nX, nP): the exact stream is the steady ranges [0, S0) and [T0, T1) followed
             by nX listed tokens idx[bh, 0:nX) (storage indices, fixed capacity CAP); then nP
             pseudo-tokens, cluster ids pid[bh, 0:nP) (capacity C, cannot overflow).
  Dense fallback: when the selection needs more than CAP exact clustered tokens, the select kernel
             writes S0 = T0 = T1 = len, nX = nP = 0: the head's whole cache [0, len) becomes one range,
             which needs no list at all, so any length fits and nothing is synchronised with the host.
Launches: score, select, attention (grid B*Hkv x NS splits), combine. Grids depend on shapes and Python
ints only, so a decode step can be captured in a CUDA graph.
"""
import math

import torch
import triton
import triton.language as tl

from .doublep import STAT_KEYS
from .doublep_select import LOG2E, NEG, _score_kernel, _select_kernel
from .doublep_select_fast import VARIANTS, _select_fast_kernel

# The select kernel sparse_triton launches: "base" (_select_kernel) or a name in VARIANTS (same output,
# kernels/doublep_select_fast.py); SELECT_WARPS None = the default warp count. scripts/bench_select.py
# times them all; tests/test_doublep.py runs every kernel test under each. "bisect" is the default on
# static evidence (about 40% fewer instructions per thread than "base", no register spills), not yet
# on a measurement: bench_select decides.
SELECT_VARIANT = "bisect"
SELECT_WARPS = None
SELECT_STOP = 0          # ablation timing only (bench_select): 1 = stop after G, 2 = after the cuts
PLAN_SINK = None         # a list: each call appends its work list (idx, pid, meta, cap) for inspection


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
def _attn_kernel(q_ptr, k_ptr, v_ptr, z_ptr, vm_ptr, idx_ptr, pid_ptr, meta_ptr, po_ptr, pml_ptr,
                 sq_b, sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sm_b, sm_h, sm_c,
                 qk_scale, HKV, C, CAP, NS,
                 G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                 PREC: tl.constexpr):
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
    q = tl.load(q_ptr + b.to(tl.int64) * sq_b + (h * G + r)[:, None] * sq_h + dd[None, :],
                mask=(r < G)[:, None], other=0.0)
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
        j = p - S0 - nT                                    # position in the listed tokens
        sel = tl.load(idx_ptr + bh * CAP + j, mask=ok & (j >= 0), other=0)
        t = tl.where(p < S0, p, tl.where(j < 0, p - S0 + T0, sel))   # storage index
        kt = tl.load(kb + t[:, None] * sk_l + dd[None, :], mask=ok[:, None], other=0.0)
        vt = tl.load(vb + t[:, None] * sv_l + dd[None, :], mask=ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale    # log2 units
        s = tl.where(ok[None, :], s, float("-inf"))
        m, l, acc = _online(m, l, acc, s, vt, PREC)

    # pseudo-tokens: logit = stage-1 score z = q.C*scale + ln s (read back, no centroid reload);
    # the + ln s bias weighs the mean value vmean_i like s_i tokens with key C_i (z_ptr is the centroid z
    # unless pseudo_bias="estimate", which reads the selection's z: see kernels/doublep.py)
    for tile in range(tl.maximum(lo, TE), hi):
        p = (tile - TE) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = p < nP
        cid = tl.load(pid_ptr + bh * C + p, mask=ok, other=0)
        s = tl.load(z_ptr + (bh * G + r[:, None]) * C + cid[None, :], mask=(r < G)[:, None] & ok[None, :],
                    other=0.0) * LOG2E
        s = tl.where(ok[None, :], s, float("-inf"))
        vt = tl.load(vm_ptr + b.to(tl.int64) * sm_b + h * sm_h + cid[:, None] * sm_c + dd[None, :],
                     mask=ok[:, None], other=0.0)
        m, l, acc = _online(m, l, acc, s, vt, PREC)

    part = bh * NS + sp
    tl.store(pml_ptr + part * 2 * GP + r, m)
    tl.store(pml_ptr + part * 2 * GP + GP + r, l)
    tl.store(po_ptr + (part * GP + r[:, None]) * D + dd[None, :], acc, mask=(r < G)[:, None])


@triton.jit
def _combine_kernel(po_ptr, pml_ptr, o_ptr, so_b, so_h, HQ, HKV, NS,
                    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, NSP: tl.constexpr):
    """Log-sum-exp combine of the splits: o = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s."""
    pid = tl.program_id(0)
    b = pid // HQ
    hq = pid % HQ
    bh = b * HKV + hq // G
    r = hq % G
    s = tl.arange(0, NSP)
    dd = tl.arange(0, D)
    part = bh * NS + s
    ms = tl.load(pml_ptr + part * 2 * GP + r, mask=s < NS, other=NEG)
    ls = tl.load(pml_ptr + part * 2 * GP + GP + r, mask=s < NS, other=0.0)
    w = tl.exp2(ms - tl.max(ms, 0))
    acc = tl.load(po_ptr + (part[:, None] * GP + r) * D + dd[None, :], mask=(s < NS)[:, None], other=0.0)
    o = tl.sum(w[:, None] * acc, 0) / tl.sum(w * ls, 0)
    tl.store(o_ptr + b.to(tl.int64) * so_b + hq * so_h + dd, o.to(o_ptr.dtype.element_ty))


def _c(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _num_sms(dev):
    return torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 2


def sparse_triton(q, layer, lens, tail_start, sinks, p1, p2, group_rule="mean", mode="doublep",
                  budget=None, est_clusters=0, capacity=None, sm_scale=None, estimate="centroid",
                  pseudo_bias="centroid", stats_out=None, floor=0, floor_frac=0.0):
    """Triton Double-P decode; same signature, semantics and stats as `sparse_ref`."""
    if estimate not in ("centroid", "gauss"):
        raise ValueError(f"estimate must be 'centroid' or 'gauss', not {estimate!r}")
    if pseudo_bias not in ("centroid", "estimate"):
        raise ValueError(f"pseudo_bias must be 'centroid' or 'estimate', not {pseudo_bias!r}")
    if group_rule not in ("mean", "max"):
        raise ValueError(f"group_rule must be 'mean' or 'max', not {group_rule!r}")
    if mode not in ("doublep", "topk"):
        raise ValueError(f"mode must be 'doublep' or 'topk', not {mode!r}")
    if mode == "topk" and budget is None:
        raise ValueError("mode='topk' needs a token budget")
    q, k, v = _c(q), _c(layer.k), _c(layer.v)
    cent, vmean, logsize, cstart = _c(layer.centroids), _c(layer.vmean), _c(layer.logsize), _c(layer.cstart)
    B, Hq, d = q.shape
    _, Hkv, L, _ = k.shape
    C = cent.shape[2]
    assert d in (16, 32, 64, 128, 256) and Hq % Hkv == 0 and C >= 1
    g = Hq // Hkv
    GP = max(16, triton.next_power_of_2(g))
    BH = B * Hkv
    dev = q.device
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    cap = max(1, L if capacity is None else min(int(capacity), L))
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    nsm = _num_sms(dev)
    lens = lens.to(torch.int32)
    tail_start = tail_start.to(torch.int32)

    # stage 1 chunks: enough programs to fill the GPU at batch 1
    BLOCK_C = 64 if d <= 64 else 32 if dev.type != "cuda" else 64
    per_head = triton.cdiv(C, BLOCK_C)
    chunk = BLOCK_C * max(1, triton.cdiv(per_head, max(1, triton.cdiv(2 * nsm, BH))))
    NCS = triton.cdiv(C, chunk)
    # attention splits: about two programs per SM, at most 64 per head
    NS = max(1, min(64, triton.cdiv(2 * nsm, BH))) if dev.type == "cuda" else 3

    f32 = dict(device=dev, dtype=torch.float32)
    i32 = dict(device=dev, dtype=torch.int32)
    zbuf = torch.empty(BH * g * C, **f32)
    gauss = estimate == "gauss"
    split = gauss and pseudo_bias == "centroid"          # pseudo-tokens read the centroid z, kept apart
    zc = torch.empty(BH * g * C, **f32) if split else zbuf
    kvar = _c(layer.kvar) if gauss else cent
    ml = torch.empty(BH * NCS * 2 * GP, **f32)
    idx = torch.empty(BH * cap, **i32)
    pid = torch.empty(BH * C, **i32)
    xd = torch.empty(BH * C, **i32)
    meta = torch.empty(BH * 8, **i32)
    st = torch.empty(len(STAT_KEYS), B, Hkv, **f32) if stats_out is None else stats_out
    assert st.shape == (len(STAT_KEYS), B, Hkv) and st.dtype == torch.float32 and st.is_contiguous()
    po = torch.empty(BH * NS * GP * d, **f32)
    pml = torch.empty(BH * NS * 2 * GP, **f32)
    o = torch.empty(B, Hq, d, device=dev, dtype=q.dtype)

    _score_kernel[(BH, NCS)](
        q, cent, logsize, layer.ncl, zbuf, ml, kvar, zc,
        q.stride(0), q.stride(1), cent.stride(0), cent.stride(1), cent.stride(2),
        logsize.stride(0), logsize.stride(1), layer.ncl.stride(0), layer.ncl.stride(1),
        kvar.stride(0), kvar.stride(1), kvar.stride(2),
        scale, Hkv, C, NCS, chunk, G=g, GP=GP, D=d, BLOCK_C=BLOCK_C, PREC=prec, EST=gauss, SPLIT=split,
        num_warps=4)

    if mode == "topk":
        tgt1, tgt2, est = 0, int(budget), int(est_clusters)
    else:  # p >= 1 -> a target no sum reaches: keep all; p <= 0 -> keep none
        tgt1, tgt2, est = [2.0 if p >= 1 else float(p) for p in (p1, p2)] + [0]
    CPAD = max(16, triton.next_power_of_2(C))
    nw = SELECT_WARPS or max(4, min(16, CPAD // 512))
    args = (cstart.stride(0), cstart.stride(1), layer.ncl.stride(0), layer.ncl.stride(1),
            Hkv, C, NCS, cap, BH, int(sinks), float(tgt1), float(tgt2), est, float(floor), float(floor_frac))
    consts = dict(G=g, GP=GP, CPAD=CPAD, NCSP=max(2, triton.next_power_of_2(NCS)), BLK=min(1024, CPAD),
                  MAXRULE=group_rule == "max", TOPK=mode == "topk", FLOOR=mode == "doublep" and (floor > 0 or floor_frac > 0),
                  num_warps=nw)
    if SELECT_VARIANT == "base":
        _select_kernel[(BH,)](zbuf, ml, cstart, layer.ncl, lens, tail_start, idx, pid, xd, meta, st,
                              *args, **consts)
    else:
        xo = torch.empty(BH * C, **i32)
        var = dict(VARIANTS[SELECT_VARIANT])
        var["SORTR"] = max(1, CPAD // (32 * nw))                # SEARCH 3: registers per thread
        if var["LIST"] == 2 and C >= 65536:      # 16-bit packed ranks would overflow
            var["LIST"] = 1
        _select_fast_kernel[(BH,)](zbuf, ml, cstart, layer.ncl, lens, tail_start, idx, pid, xd, xo, meta, st,
                                   *args, **consts, **var, TILE_R=64, TILE_J=32, STOP=SELECT_STOP)
    if PLAN_SINK is not None:
        PLAN_SINK.append((idx, pid, meta, cap))

    BLOCK_N = 64 if dev.type == "cuda" else 16
    _attn_kernel[(BH, NS)](
        q, k, v, zc, vmean, idx, pid, meta, po, pml,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), vmean.stride(0), vmean.stride(1), vmean.stride(2),
        scale * LOG2E.value, Hkv, C, cap, NS, G=g, GP=GP, D=d, BLOCK_N=BLOCK_N, PREC=prec,
        num_warps=8 if d >= 128 else 4, num_stages=2)
    _combine_kernel[(B * Hq,)](po, pml, o, o.stride(0), o.stride(1), Hq, Hkv, NS,
                               G=g, GP=GP, D=d, NSP=max(2, triton.next_power_of_2(NS)), num_warps=4)

    if stats_out is not None:   # the engine's per-step slab: no conversion launches
        return o, dict(zip(STAT_KEYS, st))
    stats = {k: st[i].int() for i, k in enumerate(STAT_KEYS[:4])}   # the twin's dtypes
    stats.update(est_mass=st[4], fallback=st[5] != 0)
    return o, stats
