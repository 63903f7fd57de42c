"""k-means building blocks for the clustered KV cache, each Triton kernel beside its torch twin.

Problems are batched: N independent point sets (one per (segment, layer, KV head)) of n keys of d dims,
k clusters each; `a [N, n]` is the cluster id of every point.

Generic blocks on [N, n, d] tensors (the bench times them; the clustering pass below does not use them):
assign_ref / _triton          a[p, t] = argmax_j x[p, t] . c[p, j]                (maximum inner product)
cluster_sums_ref / _triton    s[p, j] = sum_{t : a[p, t] = j} x[p, t]              (fp32 segmented sum)

The clustering pass (nanodp/cluster.py; kernels in kmeans_pass.py and kmeans_store.py) reads the rows of each
problem where they lie in the cache: `Rows` says where (problem p = (j * nl + l) * H + h is rows s_j .. s_j +
n - 1 of k[l, b_j, h]), so no scratch copy of the keys is made to cluster them. Centred spherical k-means,
with u(z) = z * (1 / max(|z|, 1e-12)):
mean_init   m = (1/n) sum_t x_t (fp32);  c_j = u(x_{floor(j n / k)} - m)                          1 launch
step        y_t = u(x_t - m), rounded to the keys' dtype;  a_t = argmax_j y_t . c_j;  S_j = sum_{a_t = j} y_t;
            c_j <- u(S_j) where S_j != 0 (else c_j stays)                                  1 launch a round
            S and the sizes are carried between rounds: a row moves its y from its old sum to its new one
            only when its cluster changed (on real keys ~15% of rows in round 2, <1% by round 6), so a round
            costs 2 d atomics per moved row instead of d per row; S equals the fresh sum to fp32 rounding,
            and an emptied cluster's S is reset to exactly 0
final       a_t as in step (no update); cnt_j = |{t : a_t = j}|; optionally the raw rows of
            K, V, pos copied to a scratch (the source of the in-place reorder)                     1 launch
reorder     cache row s + t <- scratch row perm[t]  (K, V and pos together)                        1 launch
append      per cluster, from the reordered (contiguous) rows: centroid = mean of the member keys,
            vmean = mean of the member values, kvar = mean of (k - centroid)^2 (one pass, fp32, about m),
            logsize = ln cnt; non-empty clusters in id order appended to the table at ncl, then
            k - nkept padding rows (zeros, logsize -inf, cstart = s + n), and ncl += nkept       1 launch
c is kept in the keys' dtype (what the assignment multiplies: y is rounded to it too; the products are
accumulated in fp32). Work that needs all of a problem's sums (normalising the centroids, bumping ncl) is
done by the problem's last program to finish, found with a per-problem arrival counter (acq_rel atomic), so
a round is one launch with no separate update pass.

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

EPS = 1e-12  # u(z) = z * (1 / max(|z|, EPS)): F.normalize's rule, with one division a row


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
def _argmax_chunk(
    x, Cp, c0, k, sck, scd, offs_d, d, best, arg, BLOCK_K: tl.constexpr, IEEE: tl.constexpr, MASK: tl.constexpr
):
    """Scores of x against centroids c0 .. c0 + BLOCK_K - 1 folded into the per-lane running (best, arg)."""
    offs_c = c0 + tl.arange(0, BLOCK_K)
    if MASK:  # the last, partial chunk: lanes past k load 0 and never win
        ct = tl.load(
            Cp + offs_c[None, :] * sck + offs_d[:, None] * scd,
            mask=(offs_c[None, :] < k) & (offs_d[:, None] < d),
            other=0.0,
        )
    else:
        ct = tl.load(Cp + offs_c[None, :] * sck + offs_d[:, None] * scd, mask=offs_d[:, None] < d, other=0.0)
    if IEEE:
        s = tl.dot(x, ct, input_precision="ieee")
    else:
        s = tl.dot(x, ct)
    better = s > best  # strict: the earlier centroid keeps a tie
    if MASK:
        better = better & (offs_c[None, :] < k)
    return tl.where(better, s, best), tl.where(better, offs_c[None, :], arg)


@triton.jit
def _argmax_dot(x, Cp, k, sck, scd, offs_d, d, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """x [BLOCK_T, BLOCK_D] (centroid dtype), Cp -> centroid 0 of the problem: [BLOCK_T] argmax_j x . c_j."""
    # Running maximum per (point, lane): lane j of the chunk loop sees centroids j, j + BLOCK_K, ...
    # Element-wise updates are cheap (a compare and two selects a score: as many instructions as the
    # score's share of the tensor-core work, so the loop is bounded by both); full chunks carry no mask.
    # The cross-lane reduction runs once, after the loop.
    best = tl.full([BLOCK_T, BLOCK_K], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK_T, BLOCK_K], tl.int32)
    kf = k - k % BLOCK_K
    for c0 in range(0, kf, BLOCK_K):
        best, arg = _argmax_chunk(x, Cp, c0, k, sck, scd, offs_d, d, best, arg, BLOCK_K, IEEE, False)
    if kf < k:
        best, arg = _argmax_chunk(x, Cp, kf, k, sck, scd, offs_d, d, best, arg, BLOCK_K, IEEE, True)
    # Row maximum over lanes; among lanes that reach it the smallest centroid index wins.
    m = tl.max(best, axis=1)
    return tl.min(tl.where(best == m[:, None], arg, 2147483647), axis=1)


@triton.jit
def _assign_kernel(
    X,
    C,
    A,
    n,
    k,
    d,
    sxn,
    sxt,
    sxd,
    scn,
    sck,
    scd,
    san,
    sat,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    # One tile of points stays resident while all centroids stream past it in chunks of BLOCK_K.
    x = tl.load(
        X + p * sxn + offs_t[:, None] * sxt + offs_d[None, :] * sxd,
        mask=(offs_t[:, None] < n) & (offs_d[None, :] < d),
        other=0.0,
    )
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
            x,
            c,
            out,
            n,
            k,
            d,
            *x.stride(),
            *c.stride(),
            *out.stride(),
            BLOCK_T=bt,
            BLOCK_K=block_k or 64,
            BLOCK_D=_block_d(d),
            IEEE=x.dtype == torch.float32,
            num_warps=num_warps or (8 if gpu else 4),
        )
    return out


# ------------------------------------------------------------------------------------- segmented sums
def cluster_sums_ref(x, a, k, out=None):
    """x [N, n, d], a [N, n] ints in [0, k) -> [N, k, d] fp32 sums of the members of each cluster."""
    N, n, d = x.shape
    s = torch.zeros(N * k, d, dtype=torch.float32, device=x.device)
    s = s.index_add_(0, _flat(a, k), x.reshape(N * n, d).float()).view(N, k, d)
    return out.copy_(s) if out is not None else s


@triton.jit
def _sums_kernel(X, A, S, n, d, sxn, sxt, sxd, san, sat, ssn, ssk, ssd, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
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
        _sums_kernel[(N, triton.cdiv(n, bt))](
            x, a, out, n, d, *x.stride(), *a.stride(), *out.stride(), BLOCK_T=bt, BLOCK_D=_block_d(d), num_warps=4
        )
    return out


# ==================================================================================== clustering pass
class Rows(NamedTuple):
    """Where the rows of each problem lie: problem p = (j * nl + l) * H + h is rows s .. s + n - 1 of
    k[l, b, h] (and v, pos) with (b, s) = jobs[j]. k and v share one layout; v, pos may be None where a
    step does not read them."""

    k: torch.Tensor  # [nl, B, H, L, d]
    v: torch.Tensor  # [nl, B, H, L, d] (same strides as k) or None
    pos: torch.Tensor  # [nl, B, H, L] int32 or None
    jobs: list  # host [(b, s), ...]
    dev_jobs: torch.Tensor  # [2, J] int64 on k's device: row 0 the b's, row 1 the s's
    n: int

    @property
    def N(self):
        return len(self.jobs) * self.k.shape[0] * self.k.shape[2]

    def gather(self, t):
        """The twin's view: rows of every problem of cache tensor t as one [N, n, ...] copy."""
        n = self.n
        return torch.stack([t[:, b, :, s : s + n] for b, s in self.jobs]).reshape(self.N, n, *t.shape[4:])


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
