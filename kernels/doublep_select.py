"""Double-P decode, stages 1 and 2 as Triton kernels: cluster scoring and the top-p cuts by histogram.
The definition both follow is the torch twin, kernels/doublep.py (its docstring: units, bins, the cut).

_score_kernel   grid (B*Hkv, NCS [+ 1 with WHOLE]): z = q.C*scale + ln s for the g query heads of a KV group in
                one tl.dot (g padded to 16 rows), kept in fp32 scratch, plus each chunk's base-2 softmax
                partials (max, sum) per head. EST (gauss): z += 1/2 (q*q).var * scale^2, a second dot; SPLIT:
                the centroid z also goes to a second scratch (the pseudo-token logits). WHOLE: program NCS runs
                the same online softmax over the steady tokens' exact logits instead (their K, ~S + tail rows).
_hist_kernel    grid (B*Hkv, NH): program `part` bins its contiguous share of one head's clusters, BLK at a time:
                every unit's bin per cluster (log2 domain), counted with tl.histogram (one call: the g heads of
                union side by side), tokens per bin by int32 atomics (floor, topk); its counts go to the head's
                histograms by integer atomics (exact, in any order). The last program to arrive cuts:
                cumulative sum over the NB bins of count x midpoint weight (one tl.cumsum), n(p) = the number
                of bins below the target, as the twin; the attention kernel classifies by those cuts.
"""

import triton
import triton.language as tl

from .common import LOG2E_C as LOG2E
from .common import NEG_C as NEG

# per (sequence, KV head) plan row, fp32: [0] n1, [1] n2, [2] nf, [3] Rg, [8:] LSE2, [16:] R2h, [24:] n1h,
# [32:] n2h (one entry per query head of the group, g <= 8)
PLAN_W = tl.constexpr(40)


@triton.jit
def _score_kernel(
    q_ptr, c_ptr, ls_ptr, ncl_ptr, z_ptr, ml_ptr, var_ptr, zc_ptr, k_ptr, lens_ptr, ts_ptr, sq_b, sq_h, sc_b, sc_h,
    sc_c, sl_b, sl_h, sn_b, sn_h, sv_b, sv_h, sv_c, sk_b, sk_h, sk_l, sm_scale, HKV, C, NCS, CHUNK, sinks,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_C: tl.constexpr, PREC: tl.constexpr,
    EST: tl.constexpr, SPLIT: tl.constexpr, WHOLE: tl.constexpr, VPREC: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    cs = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    r = tl.arange(0, GP)
    dd = tl.arange(0, D)
    q = tl.load(
        q_ptr + b.to(tl.int64) * sq_b + (h * G + r)[:, None] * sq_h + dd[None, :], mask=(r < G)[:, None], other=0.0
    )
    m = tl.full([GP], NEG, tl.float32)
    l = tl.zeros([GP], tl.float32)
    if cs == NCS:  # only with WHOLE: steady tokens [0, S) u [ts, len), storage index t(p) of stream position p
        ln = tl.load(lens_ptr + b)
        ts = tl.load(ts_ptr + b)
        S = tl.minimum(ts, sinks)
        kb = k_ptr + b.to(tl.int64) * sk_b + h.to(tl.int64) * sk_h
        for p0 in range(0, S + ln - ts, BLOCK_C):
            p = p0 + tl.arange(0, BLOCK_C)
            ok = p < S + ln - ts
            t = tl.where(p < S, p, p - S + ts)
            kt = tl.load(kb + t[:, None] * sk_l + dd[None, :], mask=ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(kt), input_precision=PREC) * (sm_scale * LOG2E)
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
            m = m_new
    else:
        ncl = tl.load(ncl_ptr + b * sn_b + h * sn_h)
        cbase = c_ptr + b.to(tl.int64) * sc_b + h * sc_h
        if EST:
            qf = q.to(tl.float32)
            qq = qf * qf  # (q_j)^2, the weights of the per-dimension variances; fp32 (no fp16 overflow)
            vbase = var_ptr + b.to(tl.int64) * sv_b + h * sv_h
        lo = cs * CHUNK
        hi = tl.minimum(lo + CHUNK, ncl)
        for i0 in range(lo, hi, BLOCK_C):
            i = i0 + tl.arange(0, BLOCK_C)
            ok = i < hi
            c = tl.load(cbase + i[:, None] * sc_c + dd[None, :], mask=ok[:, None], other=0.0)
            ls = tl.load(ls_ptr + b * sl_b + h * sl_h + i, mask=ok, other=0.0)
            # stage 1: size-weighted centroid logits, all g heads of the group in one dot
            z = tl.dot(q, tl.trans(c), input_precision=PREC) * sm_scale + ls[None, :]
            z = tl.where(ok[None, :], z, float("-inf"))
            if SPLIT:
                tl.store(zc_ptr + (bh * G + r[:, None]) * C + i[None, :], z, mask=(r < G)[:, None] & ok[None, :])
            if EST:
                # gauss: ln E e^{q.k} ~ q.C + var(q.k)/2 with var(q.k) = sum_j q_j^2 var_j (dims independent);
                # VPREC: three tf32 products (tf32x3) match the twin's fp32 math to about fp32 rounding on tensor
                # cores (plain tf32 would round q^2 to 10 bits; an "ieee" fp32 dot spilled: 308 us at 128K, B=1)
                vr = tl.load(vbase + i[:, None] * sv_c + dd[None, :], mask=ok[:, None], other=0.0)
                z += tl.dot(qq, tl.trans(vr.to(tl.float32)), input_precision=VPREC) * (0.5 * sm_scale * sm_scale)
            tl.store(z_ptr + (bh * G + r[:, None]) * C + i[None, :], z, mask=(r < G)[:, None] & ok[None, :])
            # online softmax partials over this chunk (base 2): m = max, l = sum 2^(z log2e - m)
            z2 = z * LOG2E
            m_new = tl.maximum(m, tl.max(z2, 1))
            l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(z2 - m_new[:, None]), 1)
            m = m_new
    NCS1 = NCS + WHOLE
    tl.store(ml_ptr + (bh * NCS1 + cs) * 2 * GP + r, m)
    tl.store(ml_ptr + (bh * NCS1 + cs) * 2 * GP + GP + r, l)


@triton.jit
def _lae2(a, b):
    """log2(2^a + 2^b), -inf when both are."""
    mx = tl.maximum(a, b)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    return mx + tl.log2(tl.exp2(a - mx) + tl.exp2(b - mx))


@triton.jit
def _scores(z_ptr, zoff, i, ok, C, LSE2, R2h, Rg, BPB, G: tl.constexpr, GP2: tl.constexpr, NB: tl.constexpr,
            MAXRULE: tl.constexpr):  # fmt: skip
    """Clusters i [BLK]: lp = log2 P_r[i] [GP2, BLK] (-inf where invalid), the group unit's fine bin fg [BLK]
    and every head's fh [GP2, BLK] (bins of the twin: floor((R - ln u) * 64 per nat), clamped; NB where invalid).
    Elementwise math and maxima only (the mean's sum runs over the heads in a fixed order): the hist and the
    attention kernel, whatever their layouts, bin every cluster to the same bits."""
    r = tl.arange(0, GP2)
    okr = (r < G)[:, None] & ok[None, :]
    z = tl.load(z_ptr + zoff + r[:, None] * C + i[None, :], mask=okr, other=0.0)
    lp = tl.where(okr, z * LOG2E - LSE2[:, None], float("-inf"))
    if MAXRULE:
        lg = tl.max(lp, 0)
    else:  # log2 mean_r 2^lp, stably (max first)
        mx = tl.where(ok, tl.max(lp, 0), 0.0)
        sm = tl.zeros_like(mx)
        for rr in tl.static_range(G):
            lr = tl.load(z_ptr + zoff + rr * C + i, mask=ok, other=0.0) * LOG2E - tl.sum(tl.where(r == rr, LSE2, 0.0))
            sm += tl.where(ok, tl.exp2(lr - mx), 0.0)
        lg = mx + tl.log2(sm) - tl.log2(G * 1.0)
    # a score of -inf (an empty cluster, a head without clusters; NaN from -inf - -inf) gets bin NB, never kept
    fg = tl.where(ok & (lg > float("-inf")), tl.minimum(tl.maximum(tl.floor((Rg - lg) * BPB), 0.0), NB - 1.0), NB * 1.0)
    fh = tl.where(
        okr & (lp > float("-inf")), tl.minimum(tl.maximum(tl.floor((R2h[:, None] - lp) * BPB), 0.0), NB - 1.0), NB * 1.0
    )
    return lp, fg.to(tl.int32), fh.to(tl.int32)


@triton.jit
def _mass_cut(cnt, R2, S, p, BPB, NB: tl.constexpr):
    """n(p) per unit row (twin: mass_cuts): cnt [U, NB] counts, R2, S [U]; bin k weighs 2^(R2 - (k + 1/2)/BPB)."""
    k = tl.arange(0, NB)
    cum = tl.cumsum(cnt.to(tl.float32) * tl.exp2(R2[:, None] - (k[None, :] + 0.5) / BPB), 1)
    tgt = p * (S + tl.max(cum, 1))
    n = tl.sum((S[:, None] + cum < tgt[:, None]).to(tl.int32), 1)
    n = tl.where(tgt > S, tl.minimum(n, NB - 1), -1)
    return tl.where(p >= 1.0, NB - 1, n)


@triton.jit
def _count_cut(cum, tgt, NB: tl.constexpr):
    """min(#{k: cum_k < tgt}, NB - 1), -1 for tgt <= 0 (twin: cut); cum [NB] non-decreasing, tgt a scalar."""
    n = tl.sum((cum.to(tl.float32) < tgt).to(tl.int32), 0)
    return tl.where(tgt > 0, tl.minimum(n, NB - 1), -1)


@triton.jit
def _head_refs(
    ml_ptr,
    bh,
    NCS,
    G: tl.constexpr,
    GP: tl.constexpr,
    GP2: tl.constexpr,
    NCSP: tl.constexpr,
    WHOLE: tl.constexpr,
    MAXRULE: tl.constexpr,
):
    """The score kernel's chunk partials -> per head r: LSE2 = log2 of the softmax denominator (clusters, + the
    steady tokens with WHOLE), lse2 (clusters only), steady share e, R2h = log2 max_i P_r[i]; the group unit's
    reference Rg and steady share Sg."""
    r = tl.arange(0, GP2)
    rok = r < G
    s = tl.arange(0, NCSP)
    NCS1 = NCS + WHOLE
    row = ml_ptr + (bh * NCS1 + s[None, :]) * 2 * GP + r[:, None]
    mp = tl.load(row, mask=rok[:, None] & (s < NCS)[None, :], other=NEG)
    lp_ = tl.load(row + GP, mask=rok[:, None] & (s < NCS)[None, :], other=0.0)
    M2 = tl.max(mp, 1)
    lse2 = M2 + tl.log2(tl.sum(lp_ * tl.exp2(mp - M2[:, None]), 1))  # -inf without clusters
    if WHOLE:
        mE = tl.load(ml_ptr + (bh * NCS1 + NCS) * 2 * GP + r, mask=rok, other=NEG)
        lE = tl.load(ml_ptr + (bh * NCS1 + NCS) * 2 * GP + GP + r, mask=rok, other=0.0)
        lseE = mE + tl.log2(lE)
        LSE2 = _lae2(lse2, lseE)
        e = tl.where(rok, tl.exp2(lseE - LSE2), 0.0)
    else:
        LSE2 = lse2
        e = tl.zeros([GP2], tl.float32)
    R2h = tl.where(rok, M2 - LSE2, float("-inf"))
    if MAXRULE:
        Rg = tl.max(R2h, 0)
    else:
        rm = tl.max(R2h, 0)
        Rg = rm + tl.log2(tl.sum(tl.exp2(R2h - rm), 0)) - tl.log2(G * 1.0)
    return LSE2, lse2, e, R2h, Rg, tl.sum(e, 0) / G


@triton.jit
def _hist_kernel(
    z_ptr, ml_ptr, cst_ptr, ncl_ptr, lens_ptr, ts_ptr, hist_ptr, cnt_ptr, plan_ptr, st_ptr, scs_b, scs_h, sn_b,
    sn_h, HKV, C, NCS, NH, NBH, sinks, p1, p2, budget, est, floor, floor_frac, BPB, G: tl.constexpr,
    GP: tl.constexpr, GP2: tl.constexpr, NCSP: tl.constexpr, NB: tl.constexpr, BLK: tl.constexpr,
    MAXRULE: tl.constexpr, UNION: tl.constexpr, WHOLE: tl.constexpr, TOPK: tl.constexpr, FLOOR: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    part = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    ncl = tl.load(ncl_ptr + b * sn_b + h * sn_h)
    cst = cst_ptr + b * scs_b + h * scs_h
    zoff = bh * G * C
    k = tl.arange(0, NB)
    r = tl.arange(0, GP2)
    rok = r < G
    TOK: tl.constexpr = FLOOR or TOPK
    LSE2, lse2, e, R2h, Rg, Sg = _head_refs(ml_ptr, bh, NCS, G, GP, GP2, NCSP, WHOLE, MAXRULE)

    # this program's share of the clusters: counts per bin of each unit, tokens per bin of the group unit
    hb = hist_ptr + bh * (2 + GP2) * NB  # [group counts | group tokens | per-head counts (union)]
    per = tl.cdiv(tl.cdiv(ncl, NH), BLK) * BLK
    lo = part * per
    hi = tl.minimum(lo + per, ncl)
    cntg = tl.zeros([NB], tl.int32)
    cnth = tl.zeros([GP2 * NB], tl.int32)
    for i0 in range(lo, hi, BLK):
        i = i0 + tl.arange(0, BLK)
        ok = i < hi
        lp, fg, fh = _scores(z_ptr, zoff, i, ok, C, LSE2, R2h, Rg, BPB, G, GP2, NB, MAXRULE)
        if UNION:
            okr = rok[:, None] & ok[None, :]
            # bin NB (never kept) stays out: tl.histogram keeps only the low bits of a bin index on the GPU
            cnth += tl.histogram(
                tl.reshape(fh + r[:, None] * NB, [GP2 * BLK]), GP2 * NB, mask=tl.reshape(okr & (fh < NB), [GP2 * BLK])
            )
        cntg += tl.histogram(fg, NB, mask=ok & (fg < NB))
        if TOK:
            st = tl.load(cst + i, mask=ok, other=0)
            sz = tl.load(cst + i + 1, mask=ok, other=0) - st
            tl.atomic_add(hb + NB + fg, sz, mask=ok & (sz > 0) & (fg < NB), sem="relaxed")
    # merge into the head's histograms: integer adds, exact in any order
    tl.atomic_add(hb + k, cntg, mask=cntg > 0, sem="relaxed")
    if UNION:
        kk = tl.arange(0, GP2 * NB)
        tl.atomic_add(hb + 2 * NB + kk, cnth, mask=cnth > 0, sem="relaxed")

    # the last program of this head to arrive (its acq_rel sees every add) cuts, writes the plan and the
    # stats that need no classification, and zeroes the histograms and the counter for the next launch
    tl.debug_barrier()
    if tl.atomic_add(cnt_ptr + bh, 1, sem="acq_rel") == NH - 1:
        cntg = tl.load(hb + k, volatile=True)
        if TOK:
            cumt = tl.cumsum(tl.load(hb + NB + k, volatile=True), 0)
        if UNION:
            cnt2 = tl.reshape(tl.load(hb + 2 * NB + tl.arange(0, GP2 * NB), volatile=True), [GP2, NB])
        # the cuts, in fine bins: n1 (exact + pseudo), n2 (exact) of the group unit, or per head with UNION
        # (n1h, n2h); nf the floor's; -1 keeps nothing
        pb = plan_ptr + bh * PLAN_W
        if TOPK:
            n2 = _count_cut(cumt, budget * 1.0, NB)
            n1 = _count_cut(tl.cumsum(cntg, 0), tl.sum(tl.where(k <= n2, cntg, 0), 0) + est * 1.0, NB)
        elif UNION:
            tl.store(pb + 24 + r, _mass_cut(cnt2, R2h, e, p1, BPB, NB).to(tl.float32))
            tl.store(pb + 32 + r, _mass_cut(cnt2, R2h, e, p2, BPB, NB).to(tl.float32))
            n1 = -1
            n2 = -1
        else:
            one = tl.zeros([1], tl.float32)
            n1 = tl.max(_mass_cut(cntg[None, :], one + Rg, one + Sg, p1, BPB, NB), 0)
            n2 = tl.max(_mass_cut(cntg[None, :], one + Rg, one + Sg, p2, BPB, NB), 0)
        nf = -1
        if FLOOR:  # at least f exact clustered tokens, by the group unit's bins
            nf = _count_cut(cumt, tl.maximum(floor, floor_frac * tl.max(cumt, 0).to(tl.float32)), NB)
        tl.store(pb + 0, n1 * 1.0)
        tl.store(pb + 1, n2 * 1.0)
        tl.store(pb + 2, nf * 1.0)
        tl.store(pb + 3, Rg)
        tl.store(pb + 8 + r, LSE2)
        tl.store(pb + 16 + r, R2h)
        ln = tl.load(lens_ptr + b)
        ts = tl.load(ts_ptr + b)
        S = tl.minimum(ts, sinks)
        # stats, fp32 rows in the order of kernels/doublep.py STAT_KEYS; the attention kernel adds what its
        # programs classify (exact and pseudo clusters, their tokens, the mass they keep)
        tl.store(st_ptr + bh, (S + ln - ts).to(tl.float32))  # exact_tokens: the steady ones so far
        tl.store(st_ptr + NBH + bh, 0.0)  # pseudo_tokens
        tl.store(st_ptr + 2 * NBH + bh, 0.0)  # exact_clusters
        tl.store(st_ptr + 3 * NBH + bh, 0.0)  # need_tokens
        tl.store(st_ptr + 4 * NBH + bh, Sg)  # est_mass: the steady share so far
        tl.store(st_ptr + 5 * NBH + bh, ncl.to(tl.float32))  # scored_clusters
        tl.store(st_ptr + 6 * NBH + bh, (WHOLE * (S + ln - ts)).to(tl.float32))  # steady_scored
        tl.debug_barrier()
        tl.store(hb + k, tl.zeros([NB], tl.int32))
        tl.store(hb + NB + k, tl.zeros([NB], tl.int32))
        if UNION:
            tl.store(hb + 2 * NB + tl.arange(0, GP2 * NB), tl.zeros([GP2 * NB], tl.int32))
        tl.store(cnt_ptr + bh, 0)
