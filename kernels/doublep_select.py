"""Double-P decode, stages 1 and 2 as Triton kernels: cluster scoring and the top-p cuts.

_score_kernel   grid (B*Hkv, chunks): z = q.C*scale + ln s for the g query heads of a KV group in one
                tl.dot (g padded to 16 rows), z kept in fp32 scratch, plus each chunk's softmax max/sum.
                EST (estimate="gauss"): z += 1/2 (q*q).var * scale^2, a second dot; SPLIT: the centroid
                z (without that term) also goes to a second scratch, for pseudo-token logits.
_select_kernel  grid (B*Hkv,): the group distribution G, the two thresholds by bisection (no sort), and
                the work list the attention kernel reads (see kernels/doublep_attn.py for its layout).
The definition both follow is the torch twin, kernels/doublep.py.
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
NEG = tl.constexpr(-1.0e30)        # "minus infinity" for running maxima: finite, so exp2(NEG - NEG) = 1
INF_BITS = tl.constexpr(0x7F800000)  # bit pattern of +inf; floats >= 0 order like their int32 bits


@triton.jit
def _score_kernel(q_ptr, c_ptr, ls_ptr, ncl_ptr, z_ptr, ml_ptr, var_ptr, zc_ptr,
                  sq_b, sq_h, sc_b, sc_h, sc_c, sl_b, sl_h, sn_b, sn_h, sv_b, sv_h, sv_c,
                  sm_scale, HKV, C, NCS, CHUNK,
                  G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_C: tl.constexpr,
                  PREC: tl.constexpr, EST: tl.constexpr, SPLIT: tl.constexpr):
    bh = tl.program_id(0)
    cs = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    ncl = tl.load(ncl_ptr + b * sn_b + h * sn_h)
    r = tl.arange(0, GP)
    dd = tl.arange(0, D)
    q = tl.load(q_ptr + b.to(tl.int64) * sq_b + (h * G + r)[:, None] * sq_h + dd[None, :],
                mask=(r < G)[:, None], other=0.0)
    cbase = c_ptr + b.to(tl.int64) * sc_b + h * sc_h
    if EST:
        qf = q.to(tl.float32)
        qq = qf * qf            # (q_j)^2, the weights of the per-dimension variances; fp32 (no fp16 overflow)
        vbase = var_ptr + b.to(tl.int64) * sv_b + h * sv_h
    m = tl.full([GP], NEG, tl.float32)
    l = tl.zeros([GP], tl.float32)
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
            # gauss: ln E e^{q.k} ~ q.C + var(q.k)/2 with var(q.k) = sum_j q_j^2 var_j (dims independent)
            vr = tl.load(vbase + i[:, None] * sv_c + dd[None, :], mask=ok[:, None], other=0.0)
            # fp32 "ieee" dot: matches the twin's fp32 math to rounding (tf32 would round q^2 to 10 bits)
            z += tl.dot(qq, tl.trans(vr.to(tl.float32)), input_precision="ieee") * (0.5 * sm_scale * sm_scale)
        tl.store(z_ptr + (bh * G + r[:, None]) * C + i[None, :], z, mask=(r < G)[:, None] & ok[None, :])
        # online softmax statistics over this chunk (base 2): m = max, l = sum 2^(z*log2e - m)
        z2 = z * LOG2E
        m_new = tl.maximum(m, tl.max(z2, 1))
        l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(z2 - m_new[:, None]), 1)
        m = m_new
    tl.store(ml_ptr + (bh * NCS + cs) * 2 * GP + r, m)
    tl.store(ml_ptr + (bh * NCS + cs) * 2 * GP + GP + r, l)


@triton.jit
def _bisect(Gv, W, tgt, lo0):
    """Two searches side by side, one reduction per step (rows of W [2, CPAD], tgt [2], lo0 [2]):
    the largest bit pattern x (as a float) with sum(W[k] over Gv >= x) >= tgt[k]. That x is t(p) of
    the twin: no element lies in [t, x], so {Gv >= x} = {Gv >= t}, ties included. If no x qualifies
    (target never reached) the result stays lo0 = 0: every valid cluster is kept; tgt <= 0 gives +inf:
    none is kept. lo0 may start higher where S(lo0) >= tgt is known; 31 halvings cover [0, INF]."""
    lo = lo0
    hi = tl.zeros_like(lo0) + (INF_BITS + 1)
    for _ in range(31):
        mid = lo + (hi - lo) // 2
        s = tl.sum(tl.where(Gv[None, :] >= mid.to(tl.float32, bitcast=True)[:, None], W, 0.0), 1)
        ok = s >= tgt
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
    return lo.to(tl.float32, bitcast=True)


@triton.jit
def _pick(x, k: tl.constexpr):
    """Element k of a 2-vector, as a scalar."""
    return tl.sum(tl.where(tl.arange(0, 2) == k, x, tl.zeros_like(x)), 0)


@triton.jit
def _group_dist(z_ptr, ml_ptr, bh, i, valid, C, NCS, G: tl.constexpr, GP: tl.constexpr,
                NCSP: tl.constexpr, MAXRULE: tl.constexpr):
    """The group distribution G over clusters i: per head, P_r = softmax_i z[r, i] with the global
    max / sum combined from the score kernel's chunk partials; mean over heads (or renormalised max).
    Invalid slots get -1, so they never pass a threshold >= 0."""
    s = tl.arange(0, NCSP)
    Gv = tl.zeros(i.shape, tl.float32)
    for r in tl.static_range(G):
        mp = tl.load(ml_ptr + (bh * NCS + s) * 2 * GP + r, mask=s < NCS, other=NEG)
        lp = tl.load(ml_ptr + (bh * NCS + s) * 2 * GP + GP + r, mask=s < NCS, other=0.0)
        mx = tl.max(mp, 0)
        tot = tl.sum(lp * tl.exp2(mp - mx), 0)
        z = tl.load(z_ptr + (bh * G + r) * C + i, mask=valid, other=float("-inf"))
        P = tl.exp2(z * LOG2E - mx) * (1.0 / tl.maximum(tot, 1e-30))   # softmax_i z[r, i]
        if MAXRULE:
            Gv = tl.maximum(Gv, P)
        else:
            Gv = Gv + P
    if MAXRULE:
        Gv = Gv / tl.maximum(tl.sum(tl.where(valid, Gv, 0.0), 0), 1e-30)
    else:
        Gv = Gv / G
    return tl.where(valid, Gv, -1.0)   # never -0.0 (sums and maxima of exp2 >= +0): floats >= 0 order like bits


@triton.jit
def _select_kernel(z_ptr, ml_ptr, cst_ptr, ncl_ptr, lens_ptr, ts_ptr,
                   idx_ptr, pid_ptr, xd_ptr, meta_ptr, st_ptr,
                   scs_b, scs_h, sn_b, sn_h,
                   HKV, C, NCS, CAP, NBH, sinks, tgt1, tgt2, est, floor, floor_frac,
                   G: tl.constexpr, GP: tl.constexpr, CPAD: tl.constexpr, NCSP: tl.constexpr,
                   BLK: tl.constexpr, MAXRULE: tl.constexpr, TOPK: tl.constexpr, FLOOR: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // HKV
    h = bh % HKV
    ncl = tl.load(ncl_ptr + b * sn_b + h * sn_h)
    ln = tl.load(lens_ptr + b)
    ts = tl.load(ts_ptr + b)
    S = tl.minimum(ts, sinks)
    cst = cst_ptr + b * scs_b + h * scs_h
    i = tl.arange(0, CPAD)
    valid = i < ncl

    Gv = _group_dist(z_ptr, ml_ptr, bh, i, valid, C, NCS, G, GP, NCSP, MAXRULE)
    st = tl.load(cst + i, mask=valid, other=0)
    sz = tl.where(valid, tl.load(cst + i + 1, mask=valid, other=0) - st, 0)

    # the cuts: t2 (exact) and t1 (exact + pseudo)
    two = tl.arange(0, 2)
    zero2 = tl.zeros([2], tl.int32)
    if TOPK:
        # exact: top clusters until `budget` (= tgt2) tokens; then the next `est` clusters by rank
        W = tl.zeros([2, CPAD], tl.float32) + sz.to(tl.float32)[None, :]
        t2 = _pick(_bisect(Gv, W, tl.zeros([2], tl.float32) + tgt2, zero2), 0)
        n1 = tl.minimum(tl.sum((Gv >= t2).to(tl.int32), 0) + est, ncl)
        W = tl.zeros([2, CPAD], tl.float32) + valid.to(tl.float32)[None, :]
        t1 = _pick(_bisect(Gv, W, tl.zeros([2], tl.float32) + n1.to(tl.float32), zero2), 0)
    else:
        # S(v) >= total - ncl * v, so t >= v0 = (total - p) / (2 ncl): start there when safely positive
        tgt = tl.where(two == 0, tgt1, tgt2)
        total = tl.sum(tl.where(valid, Gv, 0.0), 0)
        v0 = (total - tgt) / (2 * tl.maximum(ncl, 1)).to(tl.float32)
        lo0 = tl.where(total - tgt > 1e-4, v0.to(tl.int32, bitcast=True), 0)
        t = _bisect(Gv, tl.zeros([2, CPAD], tl.float32) + Gv[None, :], tgt, lo0)
        t1 = _pick(t, 0)
        t2 = _pick(t, 1)
        if FLOOR:   # per-head floor: also the top clusters by rank until they hold f tokens (as topk)
            f = tl.maximum(floor, floor_frac * tl.sum(sz, 0).to(tl.float32))
            W = tl.zeros([2, CPAD], tl.float32) + sz.to(tl.float32)[None, :]
            t2 = tl.minimum(t2, _pick(_bisect(Gv, W, tl.zeros([2], tl.float32) + f, zero2), 0))
            t1 = tl.minimum(t1, t2)
    E = Gv >= t2
    need = tl.sum(tl.where(E, sz, 0), 0)
    fb = need > CAP                          # work list too small: this head attends densely
    kept = tl.where(fb, valid, Gv >= tl.minimum(t1, t2))
    mass = tl.sum(tl.where(kept, Gv, 0.0), 0)
    ncx = tl.where(fb, ncl, tl.sum(E.to(tl.int32), 0))
    nX = tl.where(fb, 0, need)
    # marker pass below needs idx[0:nX) zeroed
    for p0 in range(0, nX, BLK):
        p = p0 + tl.arange(0, BLK)
        tl.store(idx_ptr + bh * CAP + p, tl.zeros([BLK], tl.int32), mask=p < nX)
    tl.debug_barrier()

    # Work list. Exact clusters, in storage order, get stream offsets o_i (exclusive prefix sum of
    # their sizes) and ranks e. The token at stream position p of the cluster of rank e is
    # p + delta_e, delta_e = cstart_i - o_i. Mark each o_i with a 1: a prefix sum over the stream gives
    # every position its cluster rank e(p) + 1, then idx[p] = p + delta[e(p)].
    lst = i < tl.where(fb, 0, ncl)           # a fallback head lists nothing
    ex = lst & E & (sz > 0)
    xs = tl.where(ex, sz, 0)
    off = tl.cumsum(xs, 0) - xs
    ec = ex.to(tl.int32)
    rank = tl.cumsum(ec, 0) - ec
    tl.store(idx_ptr + bh * CAP + off, ec, mask=ex)
    tl.store(xd_ptr + bh * C + rank, st - off, mask=ex)
    pc = (lst & (Gv >= t1) & (Gv < t2)).to(tl.int32)     # pseudo clusters, compacted
    tl.store(pid_ptr + bh * C + tl.cumsum(pc, 0) - pc, i, mask=pc > 0)
    nP = tl.sum(pc, 0)
    tl.debug_barrier()
    run = tl.program_id(0) * 0
    for p0 in range(0, nX, BLK):
        p = p0 + tl.arange(0, BLK)
        e = tl.cumsum(tl.load(idx_ptr + bh * CAP + p, mask=p < nX, other=0), 0) + run
        tl.store(idx_ptr + bh * CAP + p, p + tl.load(xd_ptr + bh * C + e - 1, mask=p < nX, other=0), mask=p < nX)
        run = tl.max(e, 0)

    _write_plan(meta_ptr, st_ptr, bh, NBH, fb, ln, ts, S, nX, nP, ncx, need, mass)


@triton.jit
def _write_plan(meta_ptr, st_ptr, bh, NBH, fb, ln, ts, S, nX, nP, ncx, need, mass):
    # per-head plan for the attention kernel: steady ranges [0, S0) and [T0, T1), then nX listed tokens
    S0 = tl.where(fb, ln, S)
    T0 = tl.where(fb, ln, ts)
    tl.store(meta_ptr + bh * 8 + 0, S0)
    tl.store(meta_ptr + bh * 8 + 1, T0)
    tl.store(meta_ptr + bh * 8 + 2, ln)
    tl.store(meta_ptr + bh * 8 + 3, nX)
    tl.store(meta_ptr + bh * 8 + 4, nP)
    # stats, fp32 rows in the order of kernels/doublep.py STAT_KEYS (tl.cast: some callers pass literals)
    tl.store(st_ptr + bh, tl.cast(S0 + (ln - T0) + nX, tl.float32))  # exact_tokens
    tl.store(st_ptr + NBH + bh, tl.cast(nP, tl.float32))              # pseudo_tokens
    tl.store(st_ptr + 2 * NBH + bh, tl.cast(ncx, tl.float32))         # exact_clusters
    tl.store(st_ptr + 3 * NBH + bh, tl.cast(need, tl.float32))        # need_tokens
    tl.store(st_ptr + 4 * NBH + bh, tl.cast(mass, tl.float32))        # est_mass
    tl.store(st_ptr + 5 * NBH + bh, tl.cast(fb, tl.float32))          # fallback
