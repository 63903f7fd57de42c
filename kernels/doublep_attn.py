"""Double-P decode, the attention pass and `sparse_triton` (same signature as `sparse_ref`).

Launches, all grids from shapes and Python ints (a decode step is captured in a CUDA graph), no host sync:
  1. _score_kernel (B*Hkv x chunks [+ the steady pass]): z of every cluster, per-chunk softmax partials.
  2. _hist_kernel (B*Hkv x NH): bin histograms merged by integer atomics; the last program of a head cuts and
     writes its plan row (PLAN_W in kernels/doublep_select.py) and the stats that need no classification.
  3. _attn_kernel (B*Hkv x NS): split sp takes every NS-th tile of the steady tokens and every NS-th group of
     W consecutive clusters, classifies them by the plan (the hist kernel's bins: its LSE2, R2h, Rg, read from the
     plan), attends to its exact clusters' members (each cluster is one region of the cache) and its
     pseudo-tokens, and adds its stats; the last split of a head combines the splits.
"""

import math

import torch
import triton
import triton.language as tl

from .common import LOG2E, LOG2E_C, blocks_per_sm, interpreting, num_sms, wave_fit, zero_buffer
from .common import NEG_C as NEG
from .doublep import BINS_PER_NAT, NBINS, STAT_KEYS
from .doublep_select import PLAN_W, _hist_kernel, _score_kernel, _scores


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
    q_ptr, k_ptr, v_ptr, z_ptr, zc_ptr, vm_ptr, cst_ptr, ncl_ptr, lens_ptr, ts_ptr, plan_ptr, st_ptr, cls_ptr,
    po_ptr, pml_ptr, o_ptr, cnt_ptr, sq_b, sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sm_b, sm_h, sm_c, scs_b, scs_h,
    sn_b, sn_h, so_b, so_h, qk_scale, HKV, C, NS, NBH, sinks, BPB, G: tl.constexpr, GP: tl.constexpr,
    GP2: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, CB: tl.constexpr, W: tl.constexpr, NSP: tl.constexpr,
    NB: tl.constexpr, PREC: tl.constexpr, MAXRULE: tl.constexpr, UNION: tl.constexpr, FLOOR: tl.constexpr,
    PLAN: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    ln = tl.load(lens_ptr + b)
    ts = tl.load(ts_ptr + b)
    S = tl.minimum(ts, sinks)
    ncl = tl.load(ncl_ptr + b * sn_b + h * sn_h)
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

    # steady tokens [0, S) u [ts, len): tiles of BLOCK_N dealt round-robin over the NS splits
    nE = S + ln - ts
    for tile in range(sp, tl.cdiv(nE, BLOCK_N), NS):
        p = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = p < nE
        t = tl.where(p < S, p, p - S + ts)  # storage index
        kt = tl.load(kb + t[:, None] * sk_l + dd[None, :], mask=ok[:, None], other=0.0)
        vt = tl.load(vb + t[:, None] * sv_l + dd[None, :], mask=ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale  # log2 units
        m, l, acc = _online(m, l, acc, tl.where(ok[None, :], s, float("-inf")), vt, PREC)

    # clusters: groups of W consecutive clusters dealt round-robin, split sp takes groups sp, sp + NS, ...,
    # CB // W of them (CB clusters) at a time; it classifies them by the cuts of the plan (kernels/
    # doublep_select.py _hist_kernel) and reads what it keeps. Small groups spread the exact clusters, which
    # bunch on a real cache (the recent ones, a needle's), over all splits; W consecutive z and cstart entries
    # are one memory sector (W = 8)
    pb = plan_ptr + bh * PLAN_W
    r2 = tl.arange(0, GP2)
    LSE2 = tl.load(pb + 8 + r2)
    R2h = tl.load(pb + 16 + r2)
    Rg = tl.load(pb + 3)
    n1 = tl.load(pb + 0).to(tl.int32)
    n2 = tl.load(pb + 1).to(tl.int32)
    nf = tl.load(pb + 2).to(tl.int32)
    n1h = tl.load(pb + 24 + r2).to(tl.int32)
    n2h = tl.load(pb + 32 + r2).to(tl.int32)
    cst = cst_ptr + b * scs_b + h * scs_h
    zoff = bh * G * C
    hi = ncl
    kept = tl.zeros([GP2], tl.float32)
    need = ncl * 0
    nex = ncl * 0
    nP = ncl * 0
    lane = tl.arange(0, CB)
    for c0 in range(0, tl.cdiv(tl.cdiv(hi, W), NS), CB // W):
        i = (sp + (c0 + lane // W) * NS) * W + lane % W
        okc = i < hi
        lp, fg, fh = _scores(z_ptr, zoff, i, okc, C, LSE2, R2h, Rg, BPB, G, GP2, NB, MAXRULE)
        if UNION:
            okr = (r2 < G)[:, None] & okc[None, :]
            ex = tl.max((okr & (fh <= n2h[:, None])).to(tl.int32), 0) > 0
            kp = tl.max((okr & (fh <= n1h[:, None])).to(tl.int32), 0) > 0
        else:
            ex = fg <= n2
            kp = fg <= n1
        if FLOOR:
            ex = ex | (fg <= nf)
        ex = ex & okc
        kp = (kp | ex) & okc
        ps = kp & ~ex
        if PLAN:
            tl.store(cls_ptr + bh * C + i, ex.to(tl.int8) * 2 + ps.to(tl.int8), mask=okc)
        st = tl.load(cst + i, mask=okc, other=0)
        sz = tl.where(okc, tl.load(cst + i + 1, mask=okc, other=0) - st, 0)
        kept += tl.sum(tl.where(kp[None, :], tl.exp2(lp), 0.0), 1)
        nex += tl.sum(ex.to(tl.int32), 0)
        nP += tl.sum(ps.to(tl.int32), 0)

        # exact clusters' tokens, packed: cluster c's members fill slots [o_c, e_c) of this block's list
        # (e = inclusive prefix sum of the kept sizes); slot j is storage index st_c + j - o_c of the c with
        # o_c <= j < e_c, found by one [BLOCK_N, CB] comparison (at most one c matches)
        n_c = tl.where(ex, sz, 0)
        e_c = tl.cumsum(n_c, 0)
        o_c = e_c - n_c
        T = tl.sum(n_c, 0)
        need += T
        for j0 in range(0, T, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)
            hit = (j[:, None] >= o_c[None, :]) & (j[:, None] < e_c[None, :])
            t = j + tl.sum(tl.where(hit, (st - o_c)[None, :], 0), 1)
            ok = j < T
            kt = tl.load(kb + t[:, None] * sk_l + dd[None, :], mask=ok[:, None], other=0.0)
            vt = tl.load(vb + t[:, None] * sv_l + dd[None, :], mask=ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale
            m, l, acc = _online(m, l, acc, tl.where(ok[None, :], s, float("-inf")), vt, PREC)

        # pseudo-tokens: logit = the centroid z = q.C*scale + ln s (the score kernel's scratch, no centroid
        # reload): the + ln s weighs the mean value vmean_c like s_c tokens with key C_c
        if tl.sum(ps.to(tl.int32), 0) > 0:
            s = (
                tl.load(zc_ptr + zoff + r[:, None] * C + i[None, :], mask=(r < G)[:, None] & ps[None, :], other=0.0)
                * LOG2E_C
            )
            vt = tl.load(
                vm_ptr + b.to(tl.int64) * sm_b + h * sm_h + i[:, None] * sm_c + dd[None, :], mask=ps[:, None], other=0.0
            )
            m, l, acc = _online(m, l, acc, tl.where(ps[None, :], s, float("-inf")), vt, PREC)

    # what this split kept, into the stats rows the hist kernel initialised (kernels/doublep.py STAT_KEYS)
    tl.atomic_add(st_ptr + bh, need.to(tl.float32), sem="relaxed")  # exact_tokens
    tl.atomic_add(st_ptr + NBH + bh, nP.to(tl.float32), sem="relaxed")  # pseudo_tokens
    tl.atomic_add(st_ptr + 2 * NBH + bh, nex.to(tl.float32), sem="relaxed")  # exact_clusters
    tl.atomic_add(st_ptr + 3 * NBH + bh, need.to(tl.float32), sem="relaxed")  # need_tokens
    tl.atomic_add(st_ptr + 4 * NBH + bh, tl.sum(kept, 0) / G, sem="relaxed")  # est_mass

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


# launch shapes (scripts/tune_sparse.py sweeps them on a GPU): tokens per attention tile, clusters a split
# classifies at a time, consecutive clusters dealt to one split, attention programs per SM at batch 1 before
# its occupancy is known and hist programs per SM at batch 1 (at most 64 per head), attention warps, the
# attention's register cap (0: none; 128 lets 4 blocks of 4 warps share an SM at head dim 128), hist warps,
# the attention's software-pipeline stages (Triton num_stages: tiles of the exact tokens loaded ahead)
TILES = dict(block_n=32, cb=32, group=8, attn_per_sm=8, hist_per_sm=1, attn_warps=4, attn_maxnreg=128, hist_warps=4,
             attn_stages=2)  # fmt: skip


def check_tiles():
    """TILES' own rules (scripts/tune_sparse.py and bench e2e --tiles change them)."""
    cb, w = TILES["cb"], TILES["group"]
    if cb < 1 or w < 1 or cb % min(cb, w):
        raise ValueError(f"group ({w}) and cb ({cb}) must be >= 1 and group must divide cb or be at least cb")
    if TILES["attn_maxnreg"] and not 32 <= TILES["attn_maxnreg"] <= 255:
        raise ValueError(f"attn_maxnreg ({TILES['attn_maxnreg']}) must be 0 (no cap) or 32-255 registers")
    if not 1 <= TILES["attn_stages"] <= 4:
        raise ValueError(f"attn_stages ({TILES['attn_stages']}) must be 1-4")


def _c(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def sparse_triton(q, layer, lens, tail_start, sinks, sp, stats_out=None, plan_out=None):
    """Triton Double-P decode; same signature, semantics and stats as `sparse_ref` (sp: a SparseConfig).
    plan_out (a dict, for tests and inspection) receives cls [B*Hkv, C] int8 (2 exact, 1 pseudo, 0 dropped,
    for clusters < ncl) and the plan rows (cuts in fine bins)."""
    q, k, v = _c(q), _c(layer.k), _c(layer.v)
    cent, vmean, logsize, cstart = _c(layer.centroids), _c(layer.vmean), _c(layer.logsize), _c(layer.cstart)
    B, Hq, d = q.shape
    Hkv = k.shape[1]
    C = cent.shape[2]
    assert d in (16, 32, 64, 128, 256) and Hq % Hkv == 0 and C >= 1 and Hq // Hkv <= 8
    g = Hq // Hkv
    GP = max(16, triton.next_power_of_2(g))
    GP2 = max(2, triton.next_power_of_2(g))
    BH = B * Hkv
    dev = q.device
    scale = 1.0 / math.sqrt(d)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    interp = interpreting()
    nsm = 2 if interp else num_sms(dev)
    lens = lens.to(torch.int32)
    tail_start = tail_start.to(torch.int32)
    topk = sp.mode == "topk"
    whole = sp.whole and not topk
    union = sp.group_rule == "union" and not topk
    floor = not topk and (sp.floor > 0 or sp.floor_frac > 0)
    maxrule = sp.group_rule == "max"
    gauss = sp.estimate == "gauss"
    BLOCK_C = 64 if d <= 64 else 32 if interp else 64
    BLOCK_N = 16 if interp else TILES["block_n"]
    warps = TILES["attn_warps"] or (8 if d >= 128 else 4)
    flags = (g, d, prec, gauss, whole, union, floor, maxrule, plan_out is not None)
    keys = {k: (k, str(dev), flags, t) for k, t in (("score", BLOCK_C), ("attn", (BLOCK_N, TILES["cb"],
            TILES["group"], warps, TILES["attn_maxnreg"], TILES["attn_stages"])))}  # fmt: skip

    def per_head(kernel, n_per_sm):
        """Programs per (sequence, KV head): n per SM at batch 1, fewer per head as the batch grows; for the
        score and attention kernels, once one launch told their registers and shared memory, as many as fill
        whole waves of their resident blocks (kernels/common.py wave_fit). The hist kernel keeps n per SM:
        its time is a chain of merges a head, and more programs made it slower (docs/LOG.md)."""
        occ = blocks_per_sm(keys[kernel]) if kernel in keys else None
        return wave_fit(BH, occ * nsm, 64) if occ else max(1, min(64, triton.cdiv(n_per_sm * nsm, BH)))

    chunk = BLOCK_C * triton.cdiv(triton.cdiv(C, BLOCK_C), per_head("score", 2))
    NCS = triton.cdiv(C, chunk)
    NH = 2 if interp else per_head("hist", TILES["hist_per_sm"])
    NS = 3 if interp else per_head("attn", TILES["attn_per_sm"])

    check_tiles()
    cb = 16 if interp else TILES["cb"]
    f32 = dict(device=dev, dtype=torch.float32)
    zbuf = torch.empty(BH * g * C, **f32)
    zc = torch.empty(BH * g * C, **f32) if gauss else zbuf  # pseudo-tokens read the centroid z
    kvar = _c(layer.kvar) if gauss else cent
    ml = torch.empty(BH * (NCS + whole) * 2 * GP, **f32)
    plan = torch.empty(BH * 40, **f32)
    cls = torch.zeros(BH * C, device=dev, dtype=torch.int8) if plan_out is not None else plan
    st = torch.empty(len(STAT_KEYS), B, Hkv, **f32) if stats_out is None else stats_out
    assert st.shape == (len(STAT_KEYS), B, Hkv) and st.dtype == torch.float32 and st.is_contiguous()
    po = torch.empty(BH * NS * GP * d, **f32)
    pml = torch.empty(BH * NS * 2 * GP, **f32)
    o = torch.empty(B, Hq, d, device=dev, dtype=q.dtype)
    ncl, common = layer.ncl, dict(G=g, GP=GP, GP2=GP2, NB=NBINS, MAXRULE=maxrule, UNION=union)

    # 1. stage-1 logits z of every cluster (and each chunk's softmax partials)
    ks = _score_kernel[(BH, NCS + whole)](
        q, cent, logsize, ncl, zbuf, ml, kvar, zc, k, lens, tail_start,
        q.stride(0), q.stride(1), cent.stride(0), cent.stride(1), cent.stride(2), logsize.stride(0),
        logsize.stride(1), ncl.stride(0), ncl.stride(1), kvar.stride(0), kvar.stride(1), kvar.stride(2),
        k.stride(0), k.stride(1), k.stride(2), scale, Hkv, C, NCS, chunk, int(sinks),
        G=g, GP=GP, D=d, BLOCK_C=BLOCK_C, PREC=prec, EST=gauss, SPLIT=gauss, WHOLE=whole,
        VPREC="ieee" if interp else "tf32x3", num_warps=4,
    )  # fmt: skip

    # 2. bin histograms over NH programs a head, merged; the last one cuts (the plan)
    BLK = 64 if interp else max(16, min(4096 // GP2, triton.next_power_of_2(triton.cdiv(C, NH))))
    _hist_kernel[(BH, NH)](
        zbuf, ml, cstart, ncl, lens, tail_start, zero_buffer(dev, "hist", BH * (2 + GP2) * NBINS),
        zero_buffer(dev, "hist_cnt", BH), plan, st, cstart.stride(0), cstart.stride(1), ncl.stride(0), ncl.stride(1),
        Hkv, C, NCS, NH, BH, int(sinks), float(sp.p1), float(sp.p2), int(sp.budget), int(sp.est_clusters),
        float(sp.floor), float(sp.floor_frac), BINS_PER_NAT / LOG2E,
        NCSP=max(2, triton.next_power_of_2(NCS)), BLK=BLK, WHOLE=whole, TOPK=topk, FLOOR=floor,
        num_warps=TILES["hist_warps"],
        **common,
    )  # fmt: skip

    # 3. attention over the steady tokens, the exact clusters' members and the pseudo-tokens, NS splits a
    #    head, each classifying its own share of the clusters; the last split of a head combines
    ka = _attn_kernel[(BH, NS)](
        q, k, v, zbuf, zc, vmean, cstart, ncl, lens, tail_start, plan, st, cls, po, pml, o,
        zero_buffer(dev, "attn_cnt", BH), q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), vmean.stride(0), vmean.stride(1), vmean.stride(2),
        cstart.stride(0), cstart.stride(1), ncl.stride(0), ncl.stride(1), o.stride(0), o.stride(1),
        scale * LOG2E, Hkv, C, NS, BH, int(sinks), BINS_PER_NAT / LOG2E,
        D=d, BLOCK_N=BLOCK_N, CB=cb, W=min(cb, TILES["group"]), NSP=max(2, triton.next_power_of_2(NS)),
        PREC=prec, FLOOR=floor, PLAN=plan_out is not None, num_warps=warps, num_stages=TILES["attn_stages"],
        **common, **({"maxnreg": TILES["attn_maxnreg"]} if TILES["attn_maxnreg"] else {}),
    )  # fmt: skip
    if not interp:
        for kernel, compiled in (("score", ks), ("attn", ka)):
            blocks_per_sm(keys[kernel], compiled)

    if plan_out is not None:
        plan_out.update(cls=cls.view(BH, C), plan=plan.view(BH, 40))
    if stats_out is not None:  # the engine's per-step slab: no conversion launches
        return o, dict(zip(STAT_KEYS, st))
    stats = {key: st[i].int() for i, key in enumerate(STAT_KEYS)}  # the twin's dtypes
    stats.update(est_mass=st[4])
    return o, stats
