"""The clustering pass's last two steps (nanodp/cluster.py): the in-place reorder of the cache rows into
cluster order and the append of the cluster statistics to the table; each Triton kernel beside its torch twin.
The math is in kernels/kmeans.py's docstring."""

import torch
import triton
import triton.language as tl

from .kmeans import _block_d, _geom, _problem, cluster_sums_ref


# ---------------------------------------------------------------------------------------- reorder
def reorder_ref(src, perm):
    """src [N, n, ...], perm [N, n] -> src[p, perm[p, t]] (new row t is old row perm[t])."""
    idx = perm.long().view(*perm.shape, *([1] * (src.dim() - 2))).expand(src.shape)
    return src.gather(1, idx)


@triton.jit
def _reorder_kernel(
    K,
    JOBS,
    J,
    NL,
    H,
    n,
    sk0,
    sk1,
    sk2,
    sk3,
    sk4,
    V,
    P,
    sp0,
    sp1,
    sp2,
    sp3,
    PERM,
    XS,
    VS,
    PS,
    d,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64)
    l, b, h, s = _problem(JOBS, J, NL, H, p)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    rm = offs_t < n
    m2 = rm[:, None] & (offs_d[None, :] < d)
    src = tl.load(PERM + p * n + offs_t, mask=rm, other=0).to(tl.int64)
    so = (p * n + src[:, None]) * d + offs_d[None, :]
    do = l * sk0 + b * sk1 + h * sk2 + (s + offs_t[:, None]) * sk3 + offs_d[None, :] * sk4
    tl.store(K + do, tl.load(XS + so, mask=m2), mask=m2)
    tl.store(V + do, tl.load(VS + so, mask=m2), mask=m2)
    tl.store(P + l * sp0 + b * sp1 + h * sp2 + (s + offs_t) * sp3, tl.load(PS + p * n + src, mask=rm), mask=rm)


def reorder_triton(r, perm, xs, vs, ps, block_t=64):
    """Cache rows of every problem (K, V and pos of r) <- reorder_ref of the scratch (xs, vs, ps)."""
    assert r.v.stride() == r.k.stride(), "k and v must share one layout"
    d = r.k.shape[-1]
    _reorder_kernel[(r.N, triton.cdiv(r.n, block_t))](
        r.k,
        *_geom(r),
        r.v,
        r.pos,
        *r.pos.stride(),
        perm,
        xs,
        vs,
        ps,
        d,
        BLOCK_T=block_t,
        BLOCK_D=_block_d(d),
        num_warps=4,
    )


# ----------------------------------------------------------------------------------------- append
def cluster_stats_ref(x, v, sid, cnt):
    """Rows in cluster order (x, v [N, n, d], sid [N, n] their sorted cluster ids, cnt [N, k]) ->
    per cluster (centroid, vmean, kvar) [N, k, d] fp32: member means and the population variance of the
    member keys about their fp32 mean (empty clusters: 0)."""
    k = cnt.shape[1]
    div = cnt.clamp_min(1).float()[..., None]
    cent = cluster_sums_ref(x, sid, k) / div
    dev = x.float() - cent.gather(1, sid.long()[..., None].expand(-1, -1, x.shape[2]))
    return cent, cluster_sums_ref(v, sid, k) / div, cluster_sums_ref(dev * dev, sid, k) / div


def append_ref(tab, r, cent, vmean, kvar, cnt):
    """Append the clusters of every problem of rows r (statistics [N, k, d] and counts [N, k] in cluster id
    order) to the tables of `tab` (cluster.Tables): non-empty clusters first in id order, then padding rows
    (zeros, logsize -inf); cstart = s + the exclusive prefix sum of the sizes; ncl += nkept."""
    nl, _, H = tab.ncl.shape
    J, k, d, dev = len(r.jobs), cnt.shape[1], cent.shape[2], cnt.device
    order = torch.sort((cnt == 0).to(torch.int32), dim=1, stable=True).indices  # non-empty first
    cnt = cnt.gather(1, order)
    live = (cnt > 0)[..., None]
    g = order[..., None].expand(-1, -1, d)
    starts = torch.zeros(cnt.shape[0], k + 1, dtype=torch.int64, device=dev)
    starts[:, 1:] = cnt.long().cumsum(1)
    l3 = torch.arange(nl, device=dev).view(1, nl, 1)
    h3 = torch.arange(H, device=dev).view(1, 1, H)
    b3, s3 = r.dev_jobs.view(2, J, 1, 1)
    base = tab.ncl[l3, b3, h3].long()  # [J, nl, H]
    dest = base[..., None] + torch.arange(k + 1, device=dev)  # [J, nl, H, k + 1]
    idx = (l3[..., None], b3[..., None], h3[..., None])
    for t, val in ((tab.centroids, cent), (tab.vmean, vmean), (tab.kvar, kvar)):
        t[idx + (dest[..., :k],)] = torch.where(live, val.gather(1, g), 0.0).to(t.dtype).view(J, nl, H, k, d)
    tab.logsize[idx + (dest[..., :k],)] = cnt.float().log().view(J, nl, H, k)
    tab.cstart[idx + (dest,)] = (s3[..., None] + starts.view(J, nl, H, k + 1)).to(torch.int32)
    tab.ncl[l3, b3, h3] = (base + (cnt > 0).sum(1).view(J, nl, H)).to(torch.int32)


@triton.jit
def _append_kernel(
    K,
    JOBS,
    J,
    NL,
    H,
    n,
    sk0,
    sk1,
    sk2,
    sk3,
    sk4,
    V,
    SID,
    CNT,
    CTR,
    MU,
    k,
    d,
    NCH,
    CENT,
    VMEAN,
    KVAR,
    st0,
    st1,
    st2,
    st3,
    st4,
    LOGS,
    sl0,
    sl1,
    sl2,
    sl3,
    CST,
    sc0,
    sc1,
    sc2,
    sc3,
    NCL,
    sn0,
    sn1,
    sn2,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_A: tl.constexpr,
    PREC: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64)
    c0 = tl.program_id(1) * BLOCK_C  # this program's clusters: c0 .. c0 + BLOCK_C - 1
    l, b, h, s = _problem(JOBS, J, NL, H, p)
    # Where its clusters go: tokens and non-empty clusters before c0, and non-empty clusters in all.
    before = p * 0
    rank0 = p * 0
    nk = p * 0
    for a0 in range(0, k, BLOCK_A):
        i = a0 + tl.arange(0, BLOCK_A)
        ca = tl.load(CNT + p * k + i, mask=i < k, other=0).to(tl.int64)
        before += tl.sum(tl.where(i < c0, ca, 0), 0)
        rank0 += tl.sum(tl.where((i < c0) & (ca > 0), 1, 0), 0)
        nk += tl.sum(tl.where(ca > 0, 1, 0), 0)
    ci = c0 + tl.arange(0, BLOCK_C)
    cnt = tl.load(CNT + p * k + ci, mask=ci < k, other=0).to(tl.int64)
    end = before + tl.cumsum(cnt, 0)  # exclusive end of each cluster's rows
    hi = before + tl.sum(cnt, 0)
    offs_d = tl.arange(0, BLOCK_D)
    dm = offs_d < d
    lane = tl.arange(0, BLOCK_C)
    kb = K + l * sk0 + b * sk1 + h * sk2 + s * sk3
    vb = V + l * sk0 + b * sk1 + h * sk2 + s * sk3
    # One pass over the (contiguous, reordered) member rows. A row's cluster is picked by a one-hot matrix
    # [C, R], so a per-cluster sum is a dot on the tensor cores: with 16-bit rows the one-hot is exact in
    # their dtype and so is every product (fp32 accumulation); fp32 operands use tf32x3 (three tf32
    # products: about fp32's 24 bits). The variance comes from the same pass, about the segment mean m:
    #   kvar = (1/s) sum (k - m)^2 - (centroid - m)^2   (= (1/s) sum (k - centroid)^2, clamped at 0)
    # shifting by m removes the channels' common offsets, so the difference cancels only the distance of the
    # cluster from m (fp32 error ~1e-6 of that squared distance; the stored bf16 rounds at 4e-3).
    mu = tl.load(MU + p * d + offs_d, mask=dm, other=0.0)
    sk = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    sv = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    sq = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    for r0 in range(before, hi, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        rm = r < hi
        lid = tl.load(SID + p * n + r, mask=rm, other=0).to(tl.int64) - c0
        oh = (lid[None, :] == lane[:, None]) & rm[None, :]  # [C, R]
        m2 = rm[:, None] & dm[None, :]
        xr = tl.load(kb + r[:, None] * sk3 + offs_d[None, :] * sk4, mask=m2, other=0.0)
        vr = tl.load(vb + r[:, None] * sk3 + offs_d[None, :] * sk4, mask=m2, other=0.0)
        sk += tl.dot(oh.to(K.dtype.element_ty), xr, input_precision=PREC)
        sv += tl.dot(oh.to(K.dtype.element_ty), vr, input_precision=PREC)
        z = tl.where(m2, xr.to(tl.float32) - mu[None, :], 0.0)
        sq += tl.dot(oh.to(tl.float32), z * z, input_precision="tf32x3")
    div = tl.maximum(cnt, 1).to(tl.float32)[:, None]
    cent = sk / div
    dc = cent - mu[None, :]
    var = tl.maximum(sq / div - dc * dc, 0.0)
    # The table rows: non-empty clusters at base + rank, padding at compacted positions >= nk.
    nb = NCL + l * sn0 + b * sn1 + h * sn2
    base = tl.load(nb).to(tl.int64)
    live = cnt > 0
    row = base + rank0 + tl.cumsum(live.to(tl.int64), 0) - live.to(tl.int64)
    tb = l * st0 + b * st1 + h * st2
    lb = l * sl0 + b * sl1 + h * sl2
    cb = l * sc0 + b * sc1 + h * sc2
    m2 = live[:, None] & dm[None, :]
    to = tb + row[:, None] * st3 + offs_d[None, :] * st4
    tl.store(CENT + to, cent.to(CENT.dtype.element_ty), mask=m2)
    tl.store(VMEAN + to, (sv / div).to(VMEAN.dtype.element_ty), mask=m2)
    tl.store(KVAR + to, var.to(KVAR.dtype.element_ty), mask=m2)
    tl.store(LOGS + lb + row * sl3, tl.log(tl.maximum(cnt, 1).to(tl.float32)), mask=live)
    tl.store(CST + cb + (row + 1) * sc3, (s + end).to(tl.int32), mask=live)
    q = ci.to(tl.int64)
    pad = (q >= nk) & (q < k)
    po = tb + (base + q)[:, None] * st3 + offs_d[None, :] * st4
    z = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    tl.store(CENT + po, z.to(CENT.dtype.element_ty), mask=pad[:, None] & dm[None, :])
    tl.store(VMEAN + po, z.to(VMEAN.dtype.element_ty), mask=pad[:, None] & dm[None, :])
    tl.store(KVAR + po, z.to(KVAR.dtype.element_ty), mask=pad[:, None] & dm[None, :])
    tl.store(LOGS + lb + (base + q) * sl3, tl.full([BLOCK_C], float("-inf"), tl.float32), mask=pad)
    tl.store(CST + cb + (base + q + 1) * sc3, tl.full([BLOCK_C], 0, tl.int32) + (s + n).to(tl.int32), mask=pad)
    if c0 == 0:
        tl.store(CST + cb + base * sc3, s.to(tl.int32))
    tl.debug_barrier()
    if tl.atomic_add(CTR + p, 1, sem="acq_rel") == NCH - 1:  # every program has read ncl: bump it
        tl.store(nb, (base + nk).to(tl.int32))


def append_triton(r, tab, sid, cnt, ctr, mu, block_c=16, block_r=32):
    """The statistics of cluster_stats_ref, from the reordered cache rows of r, appended as append_ref does.
    sid [N, n]: the sorted cluster ids; cnt [N, k] int32; ctr [N] int32 zeroed arrival counters; mu [N, d]
    fp32 the segment means (the variance's shift; any shift gives the same variance up to rounding)."""
    assert r.v.stride() == r.k.stride(), "k and v must share one layout"
    assert r.v.dtype == r.k.dtype, "k and v must share one dtype (the one-hot sums multiply in it)"
    assert tab.centroids.stride() == tab.vmean.stride() == tab.kvar.stride()
    k, d = cnt.shape[1], r.k.shape[-1]
    nch = triton.cdiv(k, block_c)
    _append_kernel[(r.N, nch)](
        r.k,
        *_geom(r),
        r.v,
        sid,
        cnt,
        ctr,
        mu,
        k,
        d,
        nch,
        tab.centroids,
        tab.vmean,
        tab.kvar,
        *tab.centroids.stride(),
        tab.logsize,
        *tab.logsize.stride(),
        tab.cstart,
        *tab.cstart.stride(),
        tab.ncl,
        *tab.ncl.stride(),
        BLOCK_C=block_c,
        BLOCK_R=block_r,
        BLOCK_D=_block_d(d),
        BLOCK_A=128,
        PREC="tf32x3" if r.k.dtype == torch.float32 else "tf32",  # 16-bit operands ignore it
        num_warps=4,
    )
