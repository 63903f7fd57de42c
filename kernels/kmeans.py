"""k-means building blocks for the clustered KV cache, each Triton kernel beside its torch twin.

Problems are batched: `x [N, n, d]` holds N independent point sets (one per (layer, sequence, KV head)),
`c [N, k, d]` their centroids, `assign [N, n]` the cluster id of every point.

assign_ref / assign_triton         a[p, t] = argmax_j  x[p, t] . c[p, j]      (maximum inner product)
cluster_sums_ref / _triton         s[p, j] = sum_{t : a[p, t] = j} x[p, t]     (fp32, a segmented sum)

Tie semantics of the argmax: among equal scores the lowest centroid index wins (torch.argmax returns the
first maximum; the kernel keeps the first maximum per lane across chunks with a strict comparison, then
takes the smallest index among the lanes that reach the row maximum). Scores are fp32 dot
products of the inputs as given (the caller passes centroids in the keys' dtype): the twin multiplies in
fp32, the kernel accumulates in fp32 on tensor cores, so the two can differ only in the summation order,
i.e. only when two scores are equal to within rounding.
"""
import torch
import triton
import triton.language as tl


def _block_d(d):
    return max(16, triton.next_power_of_2(d))


# ----------------------------------------------------------------------------------------- assignment
def assign_ref(x, c, out=None):
    """x [N, n, d], c [N, k, d] (same dtype) -> [N, n] int32, index of the centroid of largest x.c."""
    s = torch.bmm(x.float(), c.float().transpose(1, 2))           # [N, n, k] scores
    a = s.argmax(dim=2).to(torch.int32)                             # first maximum = lowest index
    if out is not None:
        out.copy_(a)
        return out
    return a


@triton.jit
def _assign_kernel(X, C, A, n, k, d,
                   sxn, sxt, sxd, scn, sck, scd, san, sat,
                   BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                   IEEE: tl.constexpr):
    p = tl.program_id(0)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    # One tile of points stays resident while all centroids stream past it in chunks of BLOCK_K.
    x = tl.load(X + p * sxn + offs_t[:, None] * sxt + offs_d[None, :] * sxd,
                mask=(offs_t[:, None] < n) & (offs_d[None, :] < d), other=0.0)
    # Running maximum kept per (point, lane): lane j of the chunk loop sees centroids j, j+BLOCK_K, ...
    # Element-wise updates are cheap; the cross-lane reduction runs once, after the loop.
    best = tl.full([BLOCK_T, BLOCK_K], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK_T, BLOCK_K], tl.int32)
    for c0 in range(0, k, BLOCK_K):
        offs_c = c0 + tl.arange(0, BLOCK_K)
        ct = tl.load(C + p * scn + offs_c[None, :] * sck + offs_d[:, None] * scd,   # [BLOCK_D, BLOCK_K]
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
    j = tl.min(tl.where(best == m[:, None], arg, 2147483647), axis=1)
    tl.store(A + p * san + offs_t * sat, j, mask=offs_t < n)


def assign_triton(x, c, out=None, block_t=None, block_k=None, num_warps=None):
    """Same contract as assign_ref. Grid (N, ceil(n / BLOCK_T)); no [n, k] score matrix is stored."""
    N, n, d = x.shape
    k = c.shape[1]
    assert c.shape == (N, k, d) and c.dtype == x.dtype, "centroids must be [N, k, d] in the keys' dtype"
    if out is None:
        out = torch.empty(N, n, dtype=torch.int32, device=x.device)
    if N == 0 or n == 0:
        return out
    bd = _block_d(d)
    gpu = x.is_cuda
    bt = block_t or (128 if gpu else 64)
    bk = block_k or (64 if gpu else 64)
    nw = num_warps or (8 if gpu else 4)
    grid = (N, triton.cdiv(n, bt))
    _assign_kernel[grid](x, c, out, n, k, d, *x.stride(), *c.stride(), *out.stride(),
                         BLOCK_T=bt, BLOCK_K=bk, BLOCK_D=bd, IEEE=x.dtype == torch.float32,
                         num_warps=nw)
    return out


# ------------------------------------------------------------------------------------- segmented sums
def cluster_sums_ref(x, assign, k, out=None):
    """x [N, n, d], assign [N, n] ints in [0, k) -> [N, k, d] fp32 sums of the members of each cluster."""
    N, n, d = x.shape
    flat = (assign.long() + torch.arange(N, device=x.device)[:, None] * k).reshape(-1)
    s = torch.zeros(N * k, d, dtype=torch.float32, device=x.device)
    s.index_add_(0, flat, x.reshape(N * n, d).float())
    s = s.view(N, k, d)
    if out is not None:
        out.copy_(s)
        return out
    return s


@triton.jit
def _sums_kernel(X, A, S, n, d,
                 sxn, sxt, sxd, san, sat, ssn, ssk, ssd,
                 BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    p = tl.program_id(0)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_t[:, None] < n) & (offs_d[None, :] < d)
    x = tl.load(X + p * sxn + offs_t[:, None] * sxt + offs_d[None, :] * sxd, mask=mask, other=0.0)
    a = tl.load(A + p * san + offs_t * sat, mask=offs_t < n, other=0)
    # Each point adds its row to its cluster's fp32 accumulator (clusters hold ~16 points out of
    # thousands, so the atomics rarely collide).
    tl.atomic_add(S + p * ssn + a[:, None] * ssk + offs_d[None, :] * ssd, x.to(tl.float32), mask=mask)


def cluster_sums_triton(x, assign, k, out=None, block_t=None):
    """Same contract as cluster_sums_ref (fp32 atomics: the summation order is not fixed)."""
    N, n, d = x.shape
    if out is None:
        out = torch.zeros(N, k, d, dtype=torch.float32, device=x.device)
    else:
        out.zero_()
    if N == 0 or n == 0:
        return out
    bt = block_t or 64
    grid = (N, triton.cdiv(n, bt))
    _sums_kernel[grid](x, assign, out, n, d, *x.stride(), *assign.stride(), *out.stride(),
                       BLOCK_T=bt, BLOCK_D=_block_d(d), num_warps=4)
    return out
