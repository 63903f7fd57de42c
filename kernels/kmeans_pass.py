"""k-means rounds of the clustering pass (nanodp/cluster.py): mean + initialisation, one launch per round,
the final assignment; each Triton kernel beside its torch twin. The math is in kernels/kmeans.py's docstring."""

import torch
import triton
import triton.language as tl

from .kmeans import EPS, _argmax_dot, _block_d, _geom, _problem, _unit, assign_ref, cluster_sums_ref


def centred_unit_ref(x, mu):
    """y = u(x - m) in fp32: x [N, n, d], mu [N, d] fp32; u(z) = z * (1 / max(|z|, 1e-12))."""
    z = x.float() - mu[:, None]
    return z * (1.0 / torch.linalg.vector_norm(z, dim=-1, keepdim=True).clamp_min(EPS))


# ------------------------------------------------------------------------------------ mean + init
def mean_init_ref(x, k):
    """x [N, n, d] -> (m [N, d] fp32 = sum / n, c [N, k, d] keys' dtype = u(x_{floor(j n / k)} - m))."""
    n = x.shape[1]
    mu = x.float().sum(1) / n
    return mu, centred_unit_ref(x[:, torch.arange(k, device=x.device) * n // k], mu).to(x.dtype)


@triton.jit
def _mean_init_kernel(
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
    MU,
    C,
    CTR,
    k,
    d,
    T,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64)
    l, b, h, s = _problem(JOBS, J, NL, H, p)
    kb = K + l * sk0 + b * sk1 + h * sk2 + s * sk3
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    dm = offs_d < d
    x = tl.load(kb + offs_t[:, None] * sk3 + offs_d[None, :] * sk4, mask=(offs_t[:, None] < n) & dm[None, :], other=0.0)
    tl.atomic_add(MU + p * d + offs_d, tl.sum(x.to(tl.float32), 0), mask=dm, sem="relaxed")
    tl.debug_barrier()  # every thread's sum is issued before the arrival
    if tl.atomic_add(CTR + p, 1, sem="acq_rel") == T - 1:  # the problem's last program: m and the init
        mu = tl.load(MU + p * d + offs_d, mask=dm, other=0.0, cache_modifier=".cg") / n
        tl.store(MU + p * d + offs_d, mu, mask=dm)
        for c0 in range(0, k, BLOCK_K):
            offs_c = c0 + tl.arange(0, BLOCK_K)
            m2 = (offs_c[:, None] < k) & dm[None, :]
            src = offs_c.to(tl.int64) * n // k
            xc = tl.load(kb + src[:, None] * sk3 + offs_d[None, :] * sk4, mask=m2, other=0.0)
            y = _unit(tl.where(m2, xc.to(tl.float32) - mu[None, :], 0.0))
            tl.store(C + (p * k + offs_c[:, None]) * d + offs_d[None, :], y.to(C.dtype.element_ty), mask=m2)


def mean_init_triton(r, k, mu, c, ctr, block_t=128, block_k=64):
    """mean_init_ref of the rows r: writes mu [N, d] fp32 (zeroed before), c [N, k, d] (contiguous);
    ctr [N] int32 zeroed arrival counters."""
    T = triton.cdiv(r.n, block_t)
    d = r.k.shape[-1]
    _mean_init_kernel[(r.N, T)](
        r.k, *_geom(r), mu, c, ctr, k, d, T, BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_D=_block_d(d), num_warps=4
    )


# ------------------------------------------------------------------------------------------ step
def _assign_block_k(gpu):
    """Centroids a chunk of the assignment loop: 32 on the GPU (half the per-lane running state of 64, so
    more blocks an SM: scripts/sweep_kmeans.py, docs/RESULTS.md "Clustering, 2026-12-03")."""
    return 32 if gpu else 64


def step_ref(x, mu, c):
    """One round: assign by largest cosine, c_j <- u(sum of the members' y) where that sum is not 0 (y as the
    assignment multiplies it: rounded to the keys' dtype; the sums are fp32)."""
    y = centred_unit_ref(x, mu).to(c.dtype)
    s = cluster_sums_ref(y, assign_ref(y, c), c.shape[1])
    norm = torch.linalg.vector_norm(s, dim=2, keepdim=True)
    return torch.where(norm > 0, s / norm.clamp_min(1e-30), c.float()).to(c.dtype)


@triton.jit
def _centred_tile(kb, sk3, sk4, MU, p, n, d, offs_t, offs_d, dtype: tl.constexpr):
    """Rows offs_t of a problem: (raw tile, y = u(x - m) rounded to dtype, row mask, 2-d mask). Only the
    rounded y stays live through the centroid loop (16 registers a thread at 128 x 64, bf16, 8 warps)."""
    dm = offs_d < d
    rm = offs_t < n
    m2 = rm[:, None] & dm[None, :]
    x = tl.load(kb + offs_t[:, None] * sk3 + offs_d[None, :] * sk4, mask=m2, other=0.0)
    mu = tl.load(MU + p * d + offs_d, mask=dm, other=0.0)
    return x, _unit(tl.where(m2, x.to(tl.float32) - mu[None, :], 0.0)).to(dtype), rm, m2


@triton.jit
def _step_kernel(
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
    MU,
    C,
    S,
    CNT,
    PREV,
    CTR,
    k,
    d,
    T,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64)
    l, b, h, s = _problem(JOBS, J, NL, H, p)
    kb = K + l * sk0 + b * sk1 + h * sk2 + s * sk3
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    x, y, rm, m2 = _centred_tile(kb, sk3, sk4, MU, p, n, d, offs_t, offs_d, C.dtype.element_ty)
    j = _argmax_dot(y, C + p * k * d, k, d, 1, offs_d, d, BLOCK_T, BLOCK_K, IEEE)
    # S and CNT carry the previous round's sums and sizes: only a row that changed cluster moves its y
    # (recomputed bit-identically each round) from the old sum to the new one, so S_j is the members' sum
    # to fp32 rounding. PREV holds id + 1 (0: no cluster yet, the first round adds every row).
    jo = tl.load(PREV + p * n + offs_t, mask=rm, other=0) - 1
    mv = rm & (j != jo)
    mv2 = mv[:, None] & (offs_d[None, :] < d)
    yf = y.to(tl.float32)
    tl.atomic_add(S + (p * k + j[:, None]) * d + offs_d[None, :], yf, mask=mv2, sem="relaxed")
    tl.atomic_add(S + (p * k + jo[:, None]) * d + offs_d[None, :], -yf, mask=mv2 & (jo >= 0)[:, None], sem="relaxed")
    tl.atomic_add(CNT + p * k + j, tl.full([BLOCK_T], 1, tl.int32), mask=mv, sem="relaxed")
    tl.atomic_add(CNT + p * k + jo, tl.full([BLOCK_T], -1, tl.int32), mask=mv & (jo >= 0), sem="relaxed")
    tl.store(PREV + p * n + offs_t, j + 1, mask=mv)
    tl.debug_barrier()
    if tl.atomic_add(CTR + p, 1, sem="acq_rel") == T - 1:  # last program: update c
        for c0 in range(0, k, BLOCK_K):
            offs_c = c0 + tl.arange(0, BLOCK_K)
            mc = (offs_c[:, None] < k) & (offs_d[None, :] < d)
            o = (p * k + offs_c[:, None]) * d + offs_d[None, :]
            sv = tl.load(S + o, mask=mc, other=0.0, cache_modifier=".cg")
            live = tl.load(CNT + p * k + offs_c, mask=offs_c < k, other=0, cache_modifier=".cg") > 0
            sv = tl.where(live[:, None], sv, 0.0)  # an empty cluster's sum is 0, not what rounding left
            norm = tl.sqrt_rn(tl.sum(sv * sv, 1))
            new = tl.div_rn(sv, tl.maximum(norm, 1e-30)[:, None])
            tl.store(C + o, new.to(C.dtype.element_ty), mask=mc & (norm > 0)[:, None])  # 0: keeps c_j
            tl.store(S + o, sv, mask=mc & (~live)[:, None])


def step_triton(r, mu, c, s, cnt, prev, ctr, block_t=None, block_k=None, num_warps=None):
    """step_ref in place: c [N, k, d] updated. State carried from round to round, zero before the first:
    s [N, k, d] fp32 and cnt [N, k] int32, the sums and sizes of the clusters of the last assignment, and
    prev [N, n] int32, that assignment + 1. ctr [N]: int32 zeroed arrival counters (one set per launch).
    A round costs sum atomics only for the rows that changed cluster (all of them in the first). Tiles of 64
    rows and 4 warps (on the GPU 8% faster than 128 and 8 warps, which the final round keeps)."""
    gpu = r.k.is_cuda
    bt = block_t or 64
    T = triton.cdiv(r.n, bt)
    k, d = c.shape[1], c.shape[2]
    _step_kernel[(r.N, T)](
        r.k,
        *_geom(r),
        mu,
        c,
        s,
        cnt,
        prev,
        ctr,
        k,
        d,
        T,
        BLOCK_T=bt,
        BLOCK_K=block_k or _assign_block_k(gpu),
        BLOCK_D=_block_d(d),
        IEEE=c.dtype == torch.float32,
        num_warps=num_warps or 4,
    )


# ------------------------------------------------------------------------------------------ final
def final_ref(x, mu, c):
    """The last round's assignment (no update): (a [N, n] int32, cnt [N, k] int32)."""
    a = assign_ref(centred_unit_ref(x, mu).to(c.dtype), c)
    cnt = torch.zeros(c.shape[0], c.shape[1], dtype=torch.int32, device=x.device)
    return a, cnt.scatter_add_(1, a.long(), torch.ones_like(a))


@triton.jit
def _final_kernel(
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
    MU,
    C,
    A,
    CNT,
    k,
    d,
    V,
    P,
    sp0,
    sp1,
    sp2,
    sp3,
    XS,
    VS,
    PS,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr,
    COPY: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64)
    l, b, h, s = _problem(JOBS, J, NL, H, p)
    kb = K + l * sk0 + b * sk1 + h * sk2 + s * sk3
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    x, y, rm, m2 = _centred_tile(kb, sk3, sk4, MU, p, n, d, offs_t, offs_d, C.dtype.element_ty)
    if COPY:  # the raw rows, read here anyway: the source of the in-place reorder (before the loop: x dies)
        so = (p * n + offs_t[:, None]) * d + offs_d[None, :]
        tl.store(XS + so, x, mask=m2)
        vb = V + l * sk0 + b * sk1 + h * sk2 + s * sk3
        tl.store(VS + so, tl.load(vb + offs_t[:, None] * sk3 + offs_d[None, :] * sk4, mask=m2), mask=m2)
        pb = P + l * sp0 + b * sp1 + h * sp2 + s * sp3
        tl.store(PS + p * n + offs_t, tl.load(pb + offs_t * sp3, mask=rm), mask=rm)
    j = _argmax_dot(y, C + p * k * d, k, d, 1, offs_d, d, BLOCK_T, BLOCK_K, IEEE)
    tl.store(A + p * n + offs_t, j.to(A.dtype.element_ty), mask=rm)
    tl.atomic_add(CNT + p * k + j, tl.full([BLOCK_T], 1, tl.int32), mask=rm, sem="relaxed")


def final_triton(r, mu, c, a, cnt, scratch=None, block_t=None, block_k=None, num_warps=None):
    """final_ref: a [N, n] (int16 or int32) and cnt [N, k] int32 (zeroed before) written; with scratch =
    (xs [N, n, d], vs, ps [N, n] int32) also the raw K, V, pos rows of every problem (r.v, r.pos needed)."""
    gpu = r.k.is_cuda
    bt = block_t or (128 if gpu else 64)
    k, d = c.shape[1], c.shape[2]
    copy = scratch is not None
    if copy:
        assert r.v.stride() == r.k.stride(), "k and v must share one layout"
        xs, vs, ps = scratch
        v, pos = r.v, r.pos
    else:
        xs = vs = v = r.k
        ps = pos = a
    sp = pos.stride() if copy else (0, 0, 0, 0)
    _final_kernel[(r.N, triton.cdiv(r.n, bt))](
        r.k,
        *_geom(r),
        mu,
        c,
        a,
        cnt,
        k,
        d,
        v,
        pos,
        *sp,
        xs,
        vs,
        ps,
        BLOCK_T=bt,
        BLOCK_K=block_k or _assign_block_k(gpu),
        BLOCK_D=_block_d(d),
        IEEE=c.dtype == torch.float32,
        COPY=copy,
        num_warps=num_warps or (8 if gpu else 4),
    )
