"""k-means building blocks for the clustered KV cache, each Triton kernel beside its torch twin.

Problems are batched: `x [N, n, d]` holds N independent point sets (one per (layer, sequence, KV head)),
`c [N, k, d]` their centroids, `a [N, n]` the cluster id of every point.

assign_ref / _triton          a[p, t] = argmax_j x[p, t] . c[p, j]                (maximum inner product)
cluster_sums_ref / _triton    s[p, j] = sum_{t : a[p, t] = j} x[p, t]              (fp32 segmented sum)
reorder_rows_ref / _triton    dst[l, h, t] = src[l * H + h, perm[l * H + h, t]]   (the cluster-order copy)

Tie semantics of the argmax: among equal scores the lowest centroid index wins (torch.argmax returns the
first maximum; the kernel keeps the first maximum per lane across chunks with a strict comparison, then
takes the smallest index among the lanes that reach the row maximum). Scores are fp32 dot products of the
inputs as given (the caller passes centroids in the keys' dtype): the twin multiplies in fp32, the kernel
accumulates in fp32 on tensor cores, so the two can differ only where two scores tie to within rounding.
The sums use fp32 atomics, so their summation order (last bits) is not fixed.
"""
import torch
import triton
import triton.language as tl


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
def _assign_kernel(X, C, A, n, k, d, sxn, sxt, sxd, scn, sck, scd, san, sat,
                   BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                   IEEE: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    # One tile of points stays resident while all centroids stream past it in chunks of BLOCK_K.
    x = tl.load(X + p * sxn + offs_t[:, None] * sxt + offs_d[None, :] * sxd,
                mask=(offs_t[:, None] < n) & (offs_d[None, :] < d), other=0.0)
    # Running maximum per (point, lane): lane j of the chunk loop sees centroids j, j + BLOCK_K, ...
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


# ------------------------------------------------------------------------------------------ reorder
def reorder_rows_ref(src, perm, dst):
    """src [N, n, d], perm [N, n] -> dst [N1, N2, n, d] (N = N1 * N2, any strides, e.g. a cache slice
    k[:, b, :, s:e]): dst[i, j, t] = src[i * N2 + j, perm[i * N2 + j, t]]. Returns dst."""
    g = src.gather(1, perm.long()[..., None].expand(-1, -1, src.shape[2]))
    return dst.copy_(g.view(dst.shape))


@triton.jit
def _reorder_kernel(Src, P, Dst, n, d, N2, s_sn, s_st, s_sd, s_pn, s_pt, s_d1, s_d2, s_dt, s_dd,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)       # 64-bit offsets: a cache slice can span > 2^31 elements
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_t[:, None] < n) & (offs_d[None, :] < d)
    rows = tl.load(P + p * s_pn + offs_t * s_pt, mask=offs_t < n, other=0)
    v = tl.load(Src + p * s_sn + rows[:, None] * s_st + offs_d[None, :] * s_sd, mask=mask)
    dst = Dst + (p // N2) * s_d1 + (p % N2) * s_d2
    tl.store(dst + offs_t[:, None] * s_dt + offs_d[None, :] * s_dd, v, mask=mask)


def reorder_rows_triton(src, perm, dst, block_t=None):
    """Same contract as reorder_rows_ref: one gather pass straight into the (strided) destination."""
    N, n, d = src.shape
    if N and n:
        bt = block_t or 64
        _reorder_kernel[(N, triton.cdiv(n, bt))](src, perm, dst, n, d, dst.shape[1], *src.stride(),
                                                 *perm.stride(), *dst.stride(),
                                                 BLOCK_T=bt, BLOCK_D=_block_d(d), num_warps=4)
    return dst
