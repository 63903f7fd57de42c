"""Double-P stage 2, faster variants of `_select_kernel` (kernels/doublep_select.py) with the same output.

Same grid (one program per (sequence, KV head)), same group distribution, same work list, stats and
fallback. What differs (constexpr switches, so scripts/bench_select.py can time each):

  SEARCH  how t(p) = the largest bit pattern x with S(x) = sum(W_i : G_i >= x) >= tgt is found.
          Every variant keeps the invariant S(lo) >= tgt > S(hi) (or the base's special cases: lo = 0
          when tgt is never reached, +inf when tgt <= 0) and stops at hi = lo + 1, so it returns the
          base's x exactly; they differ in how many dependent block reductions that takes:
    0  bisection on bits as the base, but only while some interval is wider than one pattern, and
       from hi = bits(max G) + 1 instead of +inf (about 26 steps instead of 31).
    1  contracting bisection: each step also finds the data values next to mid (smallest G >= mid,
       largest G < mid) and moves the bound onto them. The interval halves at least, and whenever it
       holds few data values it jumps past the empty gaps: about log2(#values near the cut) + a few.
    3  sort (_sort_search): the int32 bit patterns of G sorted descending (tl.sort of all CPAD
       slots), a prefix sum of the sorted weights, and one reduction: x = the largest sorted value
       whose inclusive prefix sum reaches tgt (a data value, as the bisection's result always is). No
       chain of dependent block reductions; the bitonic network costs ~log2(CPAD)^2 / 2 cheap steps,
       most in registers or warp shuffles. The prefix sum adds in rank order (as the twin), the
       bisection in a tree: they can differ by ulps, so a head
       whose cumulative sum lies within float rounding of p may cut differently ("near" in bench_select).
       Weights other than G itself (topk mode: cluster sizes) travel in the low 32 bits of an int64 key.
  LIST    how the exact-token list idx[0:nX) is written (the three prefix sums over all CPAD slots
          are the base's largest block of straight-line code).
    1  one tuple scan for the base's three full-length prefix sums; compacted exact clusters (stream
       offset, delta) to scratch, then [TILE_R, TILE_J] store tiles (TILE_R clusters x TILE_J
       tokens): no zeroing pass, no second scan over the stream.
    2  one int32 scan for both ranks (exact in the low 16 bits, pseudo above; C < 65536, else the
       launcher uses 1); stream offsets by a prefix sum over the short compacted list only.
  STOP    ablation timing only: 1 stop after G, 2 after the cuts, writing a dense-fallback plan.
(A k-ary search, the base's list build and a top-256 sort, once SEARCH 2, LIST 0 and SORTK, were
removed: slower on an H200, docs/INTERNALS.md.)
"""
import triton
import triton.language as tl

from .doublep_select import INF_BITS, _group_dist, _pick, _write_plan

BIG = tl.constexpr(0x7FFFFFFF)


@triton.jit
def _search(Gb, W, tgt, lo0, SEARCH: tl.constexpr):
    """Rows k = 0, 1 side by side: the largest x with sum(W over Gb >= x) >= tgt[k] (bit patterns; Gb
    the int32 bits of G, negative for invalid slots). Returns x as a float [2]."""
    hi = tl.where(tgt > 0, tl.maximum(tl.max(Gb, 0), 0) + 1, INF_BITS + 1)   # S(hi) = 0 < tgt
    lo = tl.minimum(lo0, hi - 1)
    while tl.max(hi - lo, 0) > 1:
        mid = lo + (hi - lo) // 2      # a row already at hi = lo + 1 re-tests lo and stays put
        up = Gb[None, :] >= mid[:, None]
        if SEARCH == 1:
            # one reduction also gives a = smallest value >= mid: S(a) = S(mid), so lo may jump to
            # it (BIG if none: only when tgt <= 0, then lo -> hi - 1), and c = largest value < mid:
            # S(c + 1) = S(mid), so hi may drop to c + 1; c < lo only when S(lo) = S(mid) < tgt
            # (tgt never reached): stop there
            s, a, c = tl.reduce((tl.where(up, W[None, :], 0.0), tl.where(up, Gb[None, :], BIG),
                                 tl.where(up, -1, Gb[None, :])), 1, _sum_min_max)
            ok = s >= tgt
            lo = tl.where(ok, tl.minimum(a, hi - 1), lo)
            hi = tl.where(ok, hi, tl.maximum(c + 1, lo + 1))
        else:
            ok = tl.sum(tl.where(up, W[None, :], 0.0), 1) >= tgt
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid)
    return lo.to(tl.float32, bitcast=True)


@triton.jit
def _sort_search(Gb, W, tgt, PACK: tl.constexpr, R: tl.constexpr):
    """SEARCH 3: the same x as _search for rows k = 0, 1 (Gb [CPAD] int32 bits of G, negative for
    invalid slots; W [CPAD] >= 0 on valid slots; tgt [2]), by sorting. PACK False: W is G itself (the
    doublep cut), so only the bits are sorted. Returns (x as a float [2], the sorted bits [CPAD] descending).
    Sorted values v_0 >= v_1 >= ..., c_j = W-sum of the first j + 1: the first j with c_j >= tgt gives
    x = v_j; as c is non-decreasing and v non-increasing, v_j = max{v_k : c_k >= tgt}, one reduction.
    tgt <= 0: +inf (keep none); never reached: 0 (keep every valid cluster), both as the bisection.
    R > 1 (CPAD / threads): the input is permuted first (a sort does not care) so that the sort's low
    index bits, compared in every bitonic stage, lie in each thread's registers rather than across lanes
    and warps: element r * (CPAD / R) + t, held by thread t in register r, becomes element t * R + r.
    A pure relabelling of the default layout (no data moves); about 3x fewer barriers at CPAD 4096."""
    if PACK:   # key = (G bits, W bits): W >= 0, so its bits fit the low 32 as a non-negative int
        key = (Gb.to(tl.int64) << 32) | tl.maximum(W, 0.0).to(tl.int32, bitcast=True).to(tl.int64)
        if R > 1:
            key = tl.reshape(tl.trans(tl.reshape(key, [R, Gb.shape[0] // R])), [Gb.shape[0]])
        key = tl.sort(key, descending=True)
        Gs = (key >> 32).to(tl.int32)
        Ws = (key & 0x7FFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
    else:
        x = Gb
        if R > 1:
            x = tl.reshape(tl.trans(tl.reshape(Gb, [R, Gb.shape[0] // R])), [Gb.shape[0]])
        Gs = tl.sort(x, descending=True)
        Ws = tl.maximum(Gs, 0).to(tl.float32, bitcast=True)
    cum = tl.cumsum(Ws, 0)
    x = tl.max(tl.where(cum[None, :] >= tgt[:, None], Gs[None, :], 0), 1)
    x = tl.where(tgt > 0, x, INF_BITS).to(tl.float32, bitcast=True)
    return x, Gs


@triton.jit
def _sum_min_max(s0, a0, c0, s1, a1, c1):
    return s0 + s1, tl.minimum(a0, a1), tl.maximum(c0, c1)


@triton.jit
def _sum_max(a0, a1, b0, b1):
    return a0 + b0, tl.maximum(a1, b1)


@triton.jit
def _add3(a0, a1, a2, b0, b1, b2):
    return a0 + b0, a1 + b1, a2 + b2


@triton.jit
def _add4(a0, a1, a2, a3, b0, b1, b2, b3):
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3


@triton.jit
def _select_fast_kernel(z_ptr, ml_ptr, cst_ptr, ncl_ptr, lens_ptr, ts_ptr,
                        idx_ptr, pid_ptr, xd_ptr, xo_ptr, meta_ptr, st_ptr,
                        scs_b, scs_h, sn_b, sn_h,
                        HKV, C, NCS, CAP, NBH, sinks, tgt1, tgt2, est, floor, floor_frac,
                        G: tl.constexpr, GP: tl.constexpr, CPAD: tl.constexpr, NCSP: tl.constexpr,
                        BLK: tl.constexpr, MAXRULE: tl.constexpr, TOPK: tl.constexpr,
                        SEARCH: tl.constexpr, LIST: tl.constexpr,
                        TILE_R: tl.constexpr, TILE_J: tl.constexpr, STOP: tl.constexpr,
                        SORTR: tl.constexpr, FLOOR: tl.constexpr):
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
    Gb = Gv.to(tl.int32, bitcast=True)
    if STOP == 1:   # a dense plan (safe for the attention kernel) and a value that needs G
        _write_plan(meta_ptr, st_ptr, bh, NBH, ncl >= 0, ln, ts, S, 0, 0, ncl, 0, tl.sum(Gv, 0))
        return

    two = tl.arange(0, 2)
    zero2 = tl.zeros([2], tl.int32)
    if TOPK:
        # exact: top clusters until `budget` (= tgt2) tokens; then the next `est` clusters by rank
        st = tl.load(cst + i, mask=valid, other=0)
        sz = tl.where(valid, tl.load(cst + i + 1, mask=valid, other=0) - st, 0)
        if SEARCH == 3:
            # one full sort (sizes packed with the scores) gives both: t1 = the score at rank n1
            x, Gs = _sort_search(Gb, sz.to(tl.float32), tl.zeros([2], tl.float32) + tgt2, True, SORTR)
            t2 = _pick(x, 0)
            n1 = tl.minimum(tl.sum((Gv >= t2).to(tl.int32), 0) + est, ncl)
            t1b = tl.max(tl.where(i + 1 >= n1, Gs, 0), 0)
            t1 = tl.where(n1 > 0, t1b, INF_BITS).to(tl.float32, bitcast=True)
        else:
            t2 = _pick(_search(Gb, sz.to(tl.float32), tl.zeros([2], tl.float32) + tgt2, zero2, SEARCH), 0)
            n1 = tl.minimum(tl.sum((Gv >= t2).to(tl.int32), 0) + est, ncl)
            t1 = _pick(_search(Gb, valid.to(tl.float32), tl.zeros([2], tl.float32) + n1.to(tl.float32), zero2,
                               SEARCH), 0)
    else:
        # S(v) >= total - ncl * v, so t >= v0 = (total - p) / (2 ncl): start there when safely positive
        tgt = tl.where(two == 0, tgt1, tgt2)
        total = tl.sum(tl.where(valid, Gv, 0.0), 0)
        v0 = (total - tgt) / (2 * tl.maximum(ncl, 1)).to(tl.float32)
        lo0 = tl.where(total - tgt > 1e-4, v0.to(tl.int32, bitcast=True), 0)
        if SEARCH == 3:
            t, _ = _sort_search(Gb, Gv, tgt, False, SORTR)
        else:
            t = _search(Gb, Gv, tgt, lo0, SEARCH)
        t1 = _pick(t, 0)
        t2 = _pick(t, 1)
        st = tl.load(cst + i, mask=valid, other=0)
        sz = tl.where(valid, tl.load(cst + i + 1, mask=valid, other=0) - st, 0)
        if FLOOR:   # per-head floor: also the top clusters by rank until they hold f tokens (as topk)
            f = tl.maximum(floor, floor_frac * tl.sum(sz, 0).to(tl.float32))
            tf = _pick(_search(Gb, sz.to(tl.float32), tl.zeros([2], tl.float32) + f, zero2, 0), 0)
            t2 = tl.minimum(t2, tf)
            t1 = tl.minimum(t1, t2)
    if STOP == 2:
        _write_plan(meta_ptr, st_ptr, bh, NBH, ncl >= 0, ln, ts, S, 0, 0, ncl, 0, t1 + t2)
        return

    E = Gv >= t2
    need, msz = tl.reduce((tl.where(E, sz, 0), tl.where(E, sz, 0)), 0, _sum_max)   # msz: longest exact
    fb = need > CAP                          # work list too small: this head attends densely
    nX = tl.where(fb, 0, need)
    lst = i < tl.where(fb, 0, ncl)           # a fallback head lists nothing
    ex = lst & E & (sz > 0)
    xs = tl.where(ex, sz, 0)
    ec = ex.to(tl.int32)
    pc = (lst & (Gv >= t1) & (Gv < t2)).to(tl.int32)     # pseudo clusters, compacted
    if LIST == 2:
        # exact ranks in the low 16 bits, pseudo ranks above: one int32 scan (needs C < 65536)
        pk = tl.cumsum(ec + (pc << 16), 0)
        rank = (pk & 0xFFFF) - ec
        prk = ((pk >> 16) & 0xFFFF) - pc
    else:
        # one scan for three prefix sums: stream offsets, exact ranks, pseudo ranks (exclusive)
        off, rank, prk = tl.associative_scan((xs, ec, pc), 0, _add3)
        off, rank, prk = off - xs, rank - ec, prk - pc
    tl.store(pid_ptr + bh * C + prk, i, mask=pc > 0)
    # one reduction for the counts: exact clusters, pseudo clusters, kept mass, listed exact clusters
    kept = tl.where(fb, valid, Gv >= tl.minimum(t1, t2))
    ncx, nP, mass, nxc = tl.reduce((E.to(tl.int32), pc, tl.where(kept, Gv, 0.0), ec), 0, _add4)
    ncx = tl.where(fb, ncl, ncx)

    if LIST == 1:
        # exact cluster of rank e covers stream positions [o_e, o_e+1) (o_ncx = nX) and its token at
        # position p is storage index p + delta_e, delta_e = cstart - o_e
        tl.store(xd_ptr + bh * C + rank, st - off, mask=ex)
        tl.store(xo_ptr + bh * C + rank, off, mask=ex)
        tl.debug_barrier()
        for e0 in range(0, nxc, TILE_R):
            e = e0 + tl.arange(0, TILE_R)
            oke = e < nxc
            o = tl.load(xo_ptr + bh * C + e, mask=oke, other=0)
            o_next = tl.load(xo_ptr + bh * C + e + 1, mask=e + 1 < nxc, other=nX)
            dl = tl.load(xd_ptr + bh * C + e, mask=oke, other=0)
            for j0 in range(0, msz, TILE_J):
                p = o[:, None] + j0 + tl.arange(0, TILE_J)[None, :]
                tl.store(idx_ptr + bh * CAP + p, p + dl[:, None], mask=oke[:, None] & (p < o_next[:, None]))
    else:
        # compacted exact clusters (cstart, size); their stream offsets are a prefix sum over the short
        # compacted list, block by block, and cluster e's j-th token goes to idx[o_e + j] = cstart_e + j
        tl.store(xd_ptr + bh * C + rank, st, mask=ex)
        tl.store(xo_ptr + bh * C + rank, sz, mask=ex)
        tl.debug_barrier()
        run = nxc * 0
        for e0 in range(0, nxc, TILE_R):
            e = e0 + tl.arange(0, TILE_R)
            n_e = tl.load(xo_ptr + bh * C + e, mask=e < nxc, other=0)
            s_e = tl.load(xd_ptr + bh * C + e, mask=e < nxc, other=0)
            o = tl.cumsum(n_e, 0) - n_e + run
            run += tl.sum(n_e, 0)
            for j0 in range(0, msz, TILE_J):
                j = j0 + tl.arange(0, TILE_J)
                tl.store(idx_ptr + bh * CAP + o[:, None] + j[None, :], s_e[:, None] + j[None, :],
                         mask=j[None, :] < n_e[:, None])

    _write_plan(meta_ptr, st_ptr, bh, NBH, fb, ln, ts, S, nX, nP, ncx, need, mass)


# name -> constexpr switches; "base" is kernels/doublep_select._select_kernel itself
VARIANTS = {
    "bisect": dict(SEARCH=0, LIST=2),
    "contract": dict(SEARCH=1, LIST=2),
    "sort": dict(SEARCH=3, LIST=2),      # full sort of all CPAD slots
}
