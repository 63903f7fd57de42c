"""k-means building blocks for the clustered KV cache, each Triton kernel beside its torch twin.

Problems are batched: N independent point sets (one per (segment, layer, KV head)) of n keys of d dims,
k clusters each; `a [N, n]` is the cluster id of every point.

Generic blocks on [N, n, d] tensors (the bench times them; the clustering pass below does not use them):
assign_ref / _triton          a[p, t] = argmax_j x[p, t] . c[p, j]                (maximum inner product)
cluster_sums_ref / _triton    s[p, j] = sum_{t : a[p, t] = j} x[p, t]              (fp32 segmented sum)

The clustering pass (nanodp/cluster.py) reads the rows of each problem where they lie in the cache: `Rows`
says where (problem p = (j * nl + l) * H + h is rows s_j .. s_j + n - 1 of k[l, b_j, h]), so no scratch copy
of the keys is made to cluster them. Centred spherical k-means, with u(z) = z * (1 / max(|z|, 1e-12)):
mean_init   m = (1/n) sum_t x_t (fp32);  c_j = u(x_{floor(j n / k)} - m)                          1 launch
step        y_t = u(x_t - m), rounded to the keys' dtype;  a_t = argmax_j y_t . c_j;  S_j = sum_{a_t = j} y_t;
            c_j <- u(S_j) where S_j != 0 (else c_j stays)                                  1 launch a round
final       a_t as in step (no update); cnt_j = |{t : a_t = j}|; optionally the raw rows of
            K, V, pos copied to a scratch (the source of the in-place reorder)                     1 launch
reorder     cache row s + t <- scratch row perm[t]  (K, V and pos together)                        1 launch
append      per cluster, from the reordered (contiguous) rows: centroid = mean of the member keys,
            vmean = mean of the member values, kvar = mean of (k - centroid)^2 (two passes, fp32),
            logsize = ln cnt; non-empty clusters in id order appended to the table at ncl, then
            k - nkept padding rows (zeros, logsize -inf, cstart = s + n), and ncl += nkept       1 launch
c is kept in the keys' dtype (what the assignment multiplies: y is rounded to it too; the products are
accumulated in fp32). Work that needs all of a problem's sums (normalising the centroids, bumping ncl) is
done by the problem's last program to finish, found with a per-problem arrival counter (acq_rel atomic), so
a round is one launch with no separate update pass; that program also zeroes S for the next round.

Tie semantics of the argmax: among equal scores the lowest centroid index wins (torch.argmax returns the
first maximum; the kernels keep the first maximum per lane across chunks with a strict comparison, then
take the smallest index among the lanes that reach the row maximum). The twin multiplies in fp32, the kernel
accumulates in fp32 on tensor cores, so the two can differ only where two scores tie to within rounding.
Sums use fp32 atomics, so their summation order (last bits) is not fixed.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

EPS = 1e-12   # u(z) = z * (1 / max(|z|, EPS)): F.normalize's rule, with one division a row


def _block_d(d):
    return max(16, triton.next_power_of_2(d))


def _flat(a, k):
    """[N, n] cluster ids -> row indices into a [N * k] table."""
    return (a.long() + torch.arange(a.shape[0], device=a.device)[:, None] * k).reshape(-1)


# ----------------------------------------------------------------------------------------- assignment
def assign_ref(x, c, out=None):
    """x [N, n, d], c [N, k, d] (same dtype) -> [N, n] int32, index of the centroid of largest x.c."""
    a = torch.bmm(x.float(), c.float().transpose(1, 2)).argmax(dim=2).to(torch.int32)  # first max
    return out.copy_(a) if out is not None else a


@triton.jit
def _argmax_dot(x, Cp, k, sck, scd, offs_d, d, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                IEEE: tl.constexpr):
    """x [BLOCK_T, BLOCK_D] (centroid dtype), Cp -> centroid 0 of the problem: [BLOCK_T] argmax_j x . c_j."""
    # Running maximum per (point, lane): lane j of the chunk loop sees centroids j, j + BLOCK_K, ...
    # Element-wise updates are cheap; the cross-lane reduction runs once, after the loop.
    best = tl.full([BLOCK_T, BLOCK_K], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK_T, BLOCK_K], tl.int32)
    for c0 in range(0, k, BLOCK_K):
        offs_c = c0 + tl.arange(0, BLOCK_K)
        ct = tl.load(Cp + offs_c[None, :] * sck + offs_d[:, None] * scd,     # [BLOCK_D, BLOCK_K]
                     mask=(offs_c[None, :] < k) & (offs_d[:, None] < d), other=0.0)
        if IEEE:
            s = tl.dot(x, ct, input_precision="ieee")
        else:
            s = tl.dot(x, ct)
        better = (s > best) & (offs_c[None, :] < k)   # strict: the earlier centroid keeps a tie
        best = tl.where(better, s, best)
        arg = tl.where(better, offs_c[None, :], arg)
    # Row maximum over lanes; among lanes that reach it the smallest centroid index wins.
    m = tl.max(best, axis=1)
    return tl.min(tl.where(best == m[:, None], arg, 2147483647), axis=1)


@triton.jit
def _assign_kernel(X, C, A, n, k, d, sxn, sxt, sxd, scn, sck, scd, san, sat,
                   BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                   IEEE: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    # One tile of points stays resident while all centroids stream past it in chunks of BLOCK_K.
    x = tl.load(X + p * sxn + offs_t[:, None] * sxt + offs_d[None, :] * sxd,
                mask=(offs_t[:, None] < n) & (offs_d[None, :] < d), other=0.0)
    j = _argmax_dot(x, C + p * scn, k, sck, scd, offs_d, d, BLOCK_T, BLOCK_K, IEEE)
    tl.store(A + p * san + offs_t * sat, j, mask=offs_t < n)


def assign_triton(x, c, out=None, block_t=None, block_k=None, num_warps=None):
    """Same contract as assign_ref. Grid (N, ceil(n / BLOCK_T)); no [n, k] score matrix is stored."""
    N, n, d = x.shape
    k = c.shape[1]
    assert c.shape == (N, k, d) and c.dtype == x.dtype, "centroids must be [N, k, d] in the keys' dtype"
    if out is None:
        out = torch.empty(N, n, dtype=torch.int32, device=x.device)
    if N and n:
        gpu = x.is_cuda
        bt = block_t or (128 if gpu else 64)
        _assign_kernel[(N, triton.cdiv(n, bt))](
            x, c, out, n, k, d, *x.stride(), *c.stride(), *out.stride(),
            BLOCK_T=bt, BLOCK_K=block_k or 64, BLOCK_D=_block_d(d), IEEE=x.dtype == torch.float32,
            num_warps=num_warps or (8 if gpu else 4))
    return out


# ------------------------------------------------------------------------------------- segmented sums
def cluster_sums_ref(x, a, k, out=None):
    """x [N, n, d], a [N, n] ints in [0, k) -> [N, k, d] fp32 sums of the members of each cluster."""
    N, n, d = x.shape
    s = torch.zeros(N * k, d, dtype=torch.float32, device=x.device)
    s = s.index_add_(0, _flat(a, k), x.reshape(N * n, d).float()).view(N, k, d)
    return out.copy_(s) if out is not None else s


@triton.jit
def _sums_kernel(X, A, S, n, d, sxn, sxt, sxd, san, sat, ssn, ssk, ssd,
                 BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_t[:, None] < n) & (offs_d[None, :] < d)
    x = tl.load(X + p * sxn + offs_t[:, None] * sxt + offs_d[None, :] * sxd, mask=mask, other=0.0)
    a = tl.load(A + p * san + offs_t * sat, mask=offs_t < n, other=0)
    # Each point adds its row to its cluster's fp32 accumulator (a cluster has ~16 of thousands of
    # points, so the atomics rarely collide).
    tl.atomic_add(S + p * ssn + a[:, None] * ssk + offs_d[None, :] * ssd, x.to(tl.float32), mask=mask)


def cluster_sums_triton(x, a, k, out=None, block_t=None):
    """Same contract as cluster_sums_ref."""
    N, n, d = x.shape
    out = torch.zeros(N, k, d, dtype=torch.float32, device=x.device) if out is None else out.zero_()
    if N and n:
        bt = block_t or 64
        _sums_kernel[(N, triton.cdiv(n, bt))](x, a, out, n, d, *x.stride(), *a.stride(), *out.stride(),
                                              BLOCK_T=bt, BLOCK_D=_block_d(d), num_warps=4)
    return out


# ==================================================================================== clustering pass
class Rows(NamedTuple):
    """Where the rows of each problem lie: problem p = (j * nl + l) * H + h is rows s .. s + n - 1 of
    k[l, b, h] (and v, pos) with (b, s) = jobs[j]. k and v share one layout; v, pos may be None where a
    step does not read them."""
    k: torch.Tensor            # [nl, B, H, L, d]
    v: torch.Tensor            # [nl, B, H, L, d] (same strides as k) or None
    pos: torch.Tensor          # [nl, B, H, L] int32 or None
    jobs: list                 # host [(b, s), ...]
    dev_jobs: torch.Tensor     # [2, J] int64 on k's device: row 0 the b's, row 1 the s's
    n: int

    @property
    def N(self):
        return len(self.jobs) * self.k.shape[0] * self.k.shape[2]

    def gather(self, t):
        """The twin's view: rows of every problem of cache tensor t as one [N, n, ...] copy."""
        n = self.n
        return torch.stack([t[:, b, :, s:s + n] for b, s in self.jobs]).reshape(self.N, n, *t.shape[4:])


def to_device(values, device, dtype=torch.int64):
    """A host list as a device tensor without a host sync: torch.tensor(values, device=cuda) waits for the
    stream (a pageable copy is synchronous); a pinned buffer copied non-blocking does not."""
    host = torch.tensor(values, dtype=dtype)
    device = torch.device(device)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)


def make_rows(k, v, pos, jobs, n):
    """Rows with dev_jobs copied to the device without a host sync."""
    return Rows(k, v, pos, list(jobs), to_device([[b for b, _ in jobs], [s for _, s in jobs]], k.device), n)


def _geom(r):
    """Kernel arguments describing r: jobs, J, nl, H, n and the 5 strides of k."""
    nl, _, H = r.k.shape[:3]
    return (r.dev_jobs, len(r.jobs), nl, H, r.n, *r.k.stride())


@triton.jit
def _problem(JOBS, J, NL, H, p):
    """Problem p -> (l, b, h, s)."""
    l = (p // H) % NL
    j = p // (NL * H)
    return l, tl.load(JOBS + j), p % H, tl.load(JOBS + J + j)


@triton.jit
def _unit(z):
    """u(z) row-wise, fp32, as the twin rounds it: correctly rounded sqrt and 1 / |z|, then one multiply."""
    nrm = tl.maximum(tl.sqrt_rn(tl.sum(z * z, 1)), 1e-12)
    return z * tl.div_rn(tl.full(nrm.shape, 1.0, tl.float32), nrm)[:, None]


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
def _mean_init_kernel(K, JOBS, J, NL, H, n, sk0, sk1, sk2, sk3, sk4, MU, C, CTR, k, d, T,
                      BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    l, b, h, s = _problem(JOBS, J, NL, H, p)
    kb = K + l * sk0 + b * sk1 + h * sk2 + s * sk3
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    dm = offs_d < d
    x = tl.load(kb + offs_t[:, None] * sk3 + offs_d[None, :] * sk4, mask=(offs_t[:, None] < n) & dm[None, :],
                other=0.0)
    tl.atomic_add(MU + p * d + offs_d, tl.sum(x.to(tl.float32), 0), mask=dm, sem="relaxed")
    tl.debug_barrier()                                   # every thread's sum is issued before the arrival
    if tl.atomic_add(CTR + p, 1, sem="acq_rel") == T - 1:   # the problem's last program: m and the init
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
    _mean_init_kernel[(r.N, T)](r.k, *_geom(r), mu, c, ctr, k, d, T, BLOCK_T=block_t, BLOCK_K=block_k,
                                BLOCK_D=_block_d(d), num_warps=4)


# ------------------------------------------------------------------------------------------ step
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
def _step_kernel(K, JOBS, J, NL, H, n, sk0, sk1, sk2, sk3, sk4, MU, C, S, CTR, k, d, T,
                 BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    l, b, h, s = _problem(JOBS, J, NL, H, p)
    kb = K + l * sk0 + b * sk1 + h * sk2 + s * sk3
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    x, y, rm, m2 = _centred_tile(kb, sk3, sk4, MU, p, n, d, offs_t, offs_d, C.dtype.element_ty)
    j = _argmax_dot(y, C + p * k * d, k, d, 1, offs_d, d, BLOCK_T, BLOCK_K, IEEE)
    tl.atomic_add(S + (p * k + j[:, None]) * d + offs_d[None, :], y.to(tl.float32), mask=m2, sem="relaxed")
    tl.debug_barrier()
    if tl.atomic_add(CTR + p, 1, sem="acq_rel") == T - 1:    # last program: update c, zero S
        for c0 in range(0, k, BLOCK_K):
            offs_c = c0 + tl.arange(0, BLOCK_K)
            mc = (offs_c[:, None] < k) & (offs_d[None, :] < d)
            o = (p * k + offs_c[:, None]) * d + offs_d[None, :]
            sv = tl.load(S + o, mask=mc, other=0.0, cache_modifier=".cg")
            norm = tl.sqrt_rn(tl.sum(sv * sv, 1))
            new = tl.div_rn(sv, tl.maximum(norm, 1e-30)[:, None])
            tl.store(C + o, new.to(C.dtype.element_ty), mask=mc & (norm > 0)[:, None])   # 0: keeps c_j
            tl.store(S + o, tl.zeros_like(sv), mask=mc)


def step_triton(r, mu, c, s, ctr, block_t=None, block_k=64, num_warps=None):
    """step_ref in place: c [N, k, d] updated; s [N, k, d] fp32 must be zero (and is left zero); ctr [N]
    int32 zeroed arrival counters (one set per launch)."""
    gpu = r.k.is_cuda
    bt = block_t or (128 if gpu else 64)
    T = triton.cdiv(r.n, bt)
    k, d = c.shape[1], c.shape[2]
    _step_kernel[(r.N, T)](r.k, *_geom(r), mu, c, s, ctr, k, d, T, BLOCK_T=bt, BLOCK_K=block_k,
                           BLOCK_D=_block_d(d), IEEE=c.dtype == torch.float32,
                           num_warps=num_warps or (8 if gpu else 4))


# ------------------------------------------------------------------------------------------ final
def final_ref(x, mu, c):
    """The last round's assignment (no update): (a [N, n] int32, cnt [N, k] int32)."""
    a = assign_ref(centred_unit_ref(x, mu).to(c.dtype), c)
    cnt = torch.zeros(c.shape[0], c.shape[1], dtype=torch.int32, device=x.device)
    return a, cnt.scatter_add_(1, a.long(), torch.ones_like(a))


@triton.jit
def _final_kernel(K, JOBS, J, NL, H, n, sk0, sk1, sk2, sk3, sk4, MU, C, A, CNT, k, d,
                  V, P, sp0, sp1, sp2, sp3, XS, VS, PS,
                  BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
                  COPY: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    l, b, h, s = _problem(JOBS, J, NL, H, p)
    kb = K + l * sk0 + b * sk1 + h * sk2 + s * sk3
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    x, y, rm, m2 = _centred_tile(kb, sk3, sk4, MU, p, n, d, offs_t, offs_d, C.dtype.element_ty)
    if COPY:   # the raw rows, read here anyway: the source of the in-place reorder (before the loop: x dies)
        so = (p * n + offs_t[:, None]) * d + offs_d[None, :]
        tl.store(XS + so, x, mask=m2)
        vb = V + l * sk0 + b * sk1 + h * sk2 + s * sk3
        tl.store(VS + so, tl.load(vb + offs_t[:, None] * sk3 + offs_d[None, :] * sk4, mask=m2), mask=m2)
        pb = P + l * sp0 + b * sp1 + h * sp2 + s * sp3
        tl.store(PS + p * n + offs_t, tl.load(pb + offs_t * sp3, mask=rm), mask=rm)
    j = _argmax_dot(y, C + p * k * d, k, d, 1, offs_d, d, BLOCK_T, BLOCK_K, IEEE)
    tl.store(A + p * n + offs_t, j.to(A.dtype.element_ty), mask=rm)
    tl.atomic_add(CNT + p * k + j, tl.full([BLOCK_T], 1, tl.int32), mask=rm, sem="relaxed")


def final_triton(r, mu, c, a, cnt, scratch=None, block_t=None, block_k=64, num_warps=None):
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
        r.k, *_geom(r), mu, c, a, cnt, k, d, v, pos, *sp, xs, vs, ps, BLOCK_T=bt, BLOCK_K=block_k,
        BLOCK_D=_block_d(d), IEEE=c.dtype == torch.float32, COPY=copy, num_warps=num_warps or (8 if gpu else 4))


# ---------------------------------------------------------------------------------------- reorder
def reorder_ref(src, perm):
    """src [N, n, ...], perm [N, n] -> src[p, perm[p, t]] (new row t is old row perm[t])."""
    idx = perm.long().view(*perm.shape, *([1] * (src.dim() - 2))).expand(src.shape)
    return src.gather(1, idx)


@triton.jit
def _reorder_kernel(K, JOBS, J, NL, H, n, sk0, sk1, sk2, sk3, sk4, V, P, sp0, sp1, sp2, sp3,
                    PERM, XS, VS, PS, d, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
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
        r.k, *_geom(r), r.v, r.pos, *r.pos.stride(), perm, xs, vs, ps, d, BLOCK_T=block_t,
        BLOCK_D=_block_d(d), num_warps=4)


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
    order = torch.sort((cnt == 0).to(torch.int32), dim=1, stable=True).indices      # non-empty first
    cnt = cnt.gather(1, order)
    live = (cnt > 0)[..., None]
    g = order[..., None].expand(-1, -1, d)
    starts = torch.zeros(cnt.shape[0], k + 1, dtype=torch.int64, device=dev)
    starts[:, 1:] = cnt.long().cumsum(1)
    l3 = torch.arange(nl, device=dev).view(1, nl, 1)
    h3 = torch.arange(H, device=dev).view(1, 1, H)
    b3, s3 = r.dev_jobs.view(2, J, 1, 1)
    base = tab.ncl[l3, b3, h3].long()                                     # [J, nl, H]
    dest = base[..., None] + torch.arange(k + 1, device=dev)              # [J, nl, H, k + 1]
    idx = (l3[..., None], b3[..., None], h3[..., None])
    for t, val in ((tab.centroids, cent), (tab.vmean, vmean), (tab.kvar, kvar)):
        t[idx + (dest[..., :k],)] = torch.where(live, val.gather(1, g), 0.0).to(t.dtype).view(J, nl, H, k, d)
    tab.logsize[idx + (dest[..., :k],)] = cnt.float().log().view(J, nl, H, k)
    tab.cstart[idx + (dest,)] = (s3[..., None] + starts.view(J, nl, H, k + 1)).to(torch.int32)
    tab.ncl[l3, b3, h3] = (base + (cnt > 0).sum(1).view(J, nl, H)).to(torch.int32)


@triton.jit
def _append_kernel(K, JOBS, J, NL, H, n, sk0, sk1, sk2, sk3, sk4, V, SID, CNT, CTR, k, d, NCH,
                   CENT, VMEAN, KVAR, st0, st1, st2, st3, st4, LOGS, sl0, sl1, sl2, sl3,
                   CST, sc0, sc1, sc2, sc3, NCL, sn0, sn1, sn2,
                   BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_A: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    c0 = tl.program_id(1) * BLOCK_C                     # this program's clusters: c0 .. c0 + BLOCK_C - 1
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
    end = before + tl.cumsum(cnt, 0)                    # exclusive end of each cluster's rows
    hi = before + tl.sum(cnt, 0)
    offs_d = tl.arange(0, BLOCK_D)
    dm = offs_d < d
    lane = tl.arange(0, BLOCK_C)
    kb = K + l * sk0 + b * sk1 + h * sk2 + s * sk3
    vb = V + l * sk0 + b * sk1 + h * sk2 + s * sk3
    # Two passes over the (contiguous, reordered) member rows: means, then squared deviations. A row's
    # cluster is picked by a one-hot matrix, so the per-cluster sums are fp32 dots (exact products).
    sk = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    sv = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    for r0 in range(before, hi, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        rm = r < hi
        lid = tl.load(SID + p * n + r, mask=rm, other=0).to(tl.int64) - c0
        oh = ((lid[None, :] == lane[:, None]) & rm[None, :]).to(tl.float32)            # [C, R]
        m2 = rm[:, None] & dm[None, :]
        xr = tl.load(kb + r[:, None] * sk3 + offs_d[None, :] * sk4, mask=m2, other=0.0).to(tl.float32)
        vr = tl.load(vb + r[:, None] * sk3 + offs_d[None, :] * sk4, mask=m2, other=0.0).to(tl.float32)
        sk += tl.dot(oh, xr, input_precision="ieee")
        sv += tl.dot(oh, vr, input_precision="ieee")
    div = tl.maximum(cnt, 1).to(tl.float32)[:, None]
    cent = sk / div
    sq = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    for r0 in range(before, hi, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        rm = r < hi
        lid = tl.load(SID + p * n + r, mask=rm, other=0).to(tl.int64) - c0
        oh = ((lid[None, :] == lane[:, None]) & rm[None, :]).to(tl.float32)
        oht = ((lid[:, None] == lane[None, :]) & rm[:, None]).to(tl.float32)         # [R, C]
        m2 = rm[:, None] & dm[None, :]
        xr = tl.load(kb + r[:, None] * sk3 + offs_d[None, :] * sk4, mask=m2, other=0.0).to(tl.float32)
        dv = tl.where(m2, xr - tl.dot(oht, cent, input_precision="ieee"), 0.0)       # k - its centroid
        sq += tl.dot(oh, dv * dv, input_precision="ieee")
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
    tl.store(KVAR + to, (sq / div).to(KVAR.dtype.element_ty), mask=m2)
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
    if tl.atomic_add(CTR + p, 1, sem="acq_rel") == NCH - 1:   # every program has read ncl: bump it
        tl.store(nb, (base + nk).to(tl.int32))


def append_triton(r, tab, sid, cnt, ctr, block_c=16, block_r=32):
    """The statistics of cluster_stats_ref, from the reordered cache rows of r, appended as append_ref does.
    sid [N, n]: the sorted cluster ids; cnt [N, k] int32; ctr [N] int32 zeroed arrival counters."""
    assert r.v.stride() == r.k.stride(), "k and v must share one layout"
    assert tab.centroids.stride() == tab.vmean.stride() == tab.kvar.stride()
    k, d = cnt.shape[1], r.k.shape[-1]
    nch = triton.cdiv(k, block_c)
    _append_kernel[(r.N, nch)](
        r.k, *_geom(r), r.v, sid, cnt, ctr, k, d, nch, tab.centroids, tab.vmean, tab.kvar,
        *tab.centroids.stride(), tab.logsize, *tab.logsize.stride(), tab.cstart, *tab.cstart.stride(),
        tab.ncl, *tab.ncl.stride(), BLOCK_C=block_c, BLOCK_R=block_r, BLOCK_D=_block_d(d), BLOCK_A=128,
        num_warps=4)
