"""Clustering of the KV cache: batched centred spherical k-means over post-RoPE keys, then the in-place reorder.

A clustering job takes storage [s, e) of one sequence in every layer and KV head: N = n_layers * Hkv
independent problems of n = e - s keys each, solved together as one batched [N, n, d] k-means. Each
problem gets k = n // cluster_size clusters (so the table never overflows: see KVCache), after which
the tokens of [s, e) are permuted so each cluster is contiguous and the clusters are appended to the
table (docs/INTERNALS.md, "KV cache" and "Clustering").
"""
from typing import NamedTuple

import torch

from nanodp.kernels.kmeans import (assign_ref, assign_triton, cluster_sums_ref, cluster_sums_triton,
                                   reorder_rows_ref, reorder_rows_triton)

MAX_ROWS = 1 << 21  # keys per batched k-means call (N * n); bounds the scratch memory (~0.5 GB at d=128)


def _use_triton(x, backend):
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    return x.is_cuda if backend == "auto" else backend == "triton"


def _counts(a, k):
    """[N, n] cluster ids -> [N, k] fp32 member counts."""
    c = torch.zeros(a.shape[0], k, dtype=torch.float32, device=a.device)
    return c.scatter_add_(1, a.long(), torch.ones_like(a, dtype=torch.float32))


def _unit(x):
    """Rows scaled to unit length in fp32; a zero row stays zero (x / max(|x|, 1e-12), F.normalize's rule)."""
    return torch.nn.functional.normalize(x.float(), dim=-1, eps=1e-12)


def _kmeans(keys, k, iters, backend):
    """kmeans() with the final assignment as int32 [N, n] and its member counts [N, k] (fp32)."""
    N, n, d = keys.shape
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= n, got k={k}, n={n}")
    if iters < 1:
        raise ValueError(f"k-means needs at least one iteration, got {iters}")
    tri = _use_triton(keys, backend)
    assign, sums = (assign_triton, cluster_sums_triton) if tri else (assign_ref, cluster_sums_ref)
    a = torch.empty(N, n, dtype=torch.int32, device=keys.device)
    y = _unit(keys.float() - keys.float().mean(1, keepdim=True))      # centred unit keys, fp32
    yd = y.to(keys.dtype)                                             # what the assignment multiplies
    cent = yd[:, torch.arange(k, device=keys.device) * n // k]         # evenly spaced init
    for it in range(iters):
        assign(yd, cent, out=a)                          # largest cosine
        if it == iters - 1:
            break
        s = sums(y, a, k)                                # normalised mean of members; a zero sum
        nrm = s.norm(dim=2, keepdim=True)                # (empty cluster) keeps its centroid
        cent = torch.where(nrm > 0, s / nrm.clamp_min(1e-30), cent.float()).to(keys.dtype)
    return a, _counts(a, k)


def kmeans(keys, k, iters, backend="auto"):
    """keys [N, n, d] -> assign [N, n] int64: `iters` rounds of centred spherical k-means, per problem.

    centre    y_t = u(x_t - m),  m = (1/n) sum_t x_t,  u(z) = z / max(|z|, 1e-12)   (fp32; y_t = 0 if x_t = m)
    init      c_j = y_{floor(j n / k)}                  (evenly spaced over the segment, j = 0..k-1)
    assign    a_t = argmax_j y_t . c_j                  (largest cosine: |c_j| = 1; ties -> lowest j)
    update    c_j = u(sum{y_t : a_t = j})               (a zero sum, e.g. an empty cluster, keeps c_j)
    The assignment multiplies y and c rounded to the keys' dtype (fp32 accumulation); sums are fp32.
    Round i assigns against the centroids of round i-1; the last round's assignment is returned. What the
    caller stores is not c_j but the plain mean of the members' raw keys (see cluster_block), so q.C is the
    mean logit of the cluster; spherical assignment only decides who the members are.
    backend: "auto" (Triton on CUDA, torch otherwise), "triton" (also on CPU, in the interpreter), "torch".
    """
    return _kmeans(keys, k, iters, backend)[0].long()


class ClusterResult(NamedTuple):
    perm: torch.Tensor       # [N, n] int64: new row t of the segment is old row perm[t]
    centroids: torch.Tensor  # [N, k, d] keys' dtype; rows >= nkept are padding (zeros)
    vmean: torch.Tensor      # [N, k, d]
    logsize: torch.Tensor    # [N, k] fp32; -inf on padding rows
    kvar: torch.Tensor       # [N, k, d] keys' dtype: per-dimension variance of the member keys (padding: 0);
    #                          computed in fp32, rounded once on storing: bf16 keeps fp32's range, and its
    #                          2^-9 relative rounding is below that of the centroid it corrects (q.C)
    starts: torch.Tensor     # [N, k + 1] int64: cluster i is rows [starts[i], starts[i+1]); = n past nkept
    nkept: torch.Tensor      # [N] int64: non-empty clusters


def cluster_block(keys, values, k, iters, backend="auto"):
    """Cluster N problems of n tokens: k-means on keys (kmeans(): centred spherical, so membership is decided
    by direction about the segment mean), then the order and the statistics of the raw rows.

    Reorder: a stable sort of the tokens by cluster id, so cluster j's members become contiguous and keep
    their original order inside it. Empty clusters have zero length in that order; they are moved behind
    the non-empty ones (whose relative order is kept), so the first nkept rows are the real clusters.
    Statistics from the stored (model-dtype) rows, summed in fp32: centroid = mean of member keys,
    vmean = mean of member values, logsize = ln(size), kvar = mean of (k - centroid)^2 per dimension (the
    population variance, about the fp32 mean; it feeds the `gauss` stage-1 estimate, kernels/doublep.py).
    """
    sums_fn = cluster_sums_triton if _use_triton(keys, backend) else cluster_sums_ref
    a, cnt = _kmeans(keys, k, iters, backend)
    perm = torch.sort(a, dim=1, stable=True).indices
    div = cnt.clamp_min(1)[..., None]
    cent = sums_fn(keys, a, k) / div
    vmean = sums_fn(values, a, k) / div
    sq = cent.gather(1, a.long()[..., None].expand(-1, -1, keys.shape[2])).sub_(keys).square_()  # one fp32 temp
    kvar = sums_fn(sq, a, k) / div
    order = torch.sort((cnt == 0).to(torch.int32), dim=1, stable=True).indices   # non-empty first
    cnt = cnt.gather(1, order)
    g = order[..., None].expand(-1, -1, keys.shape[2])
    starts = torch.zeros(cnt.shape[0], k + 1, dtype=torch.int64, device=keys.device)
    starts[:, 1:] = cnt.long().cumsum(1)                                  # exclusive prefix sum of sizes
    return ClusterResult(perm, cent.gather(1, g).to(keys.dtype), vmean.gather(1, g).to(values.dtype),
                         cnt.log(), kvar.gather(1, g).to(keys.dtype), starts, (cnt > 0).sum(1))


class Tables(NamedTuple):
    """The cache tensors with leading [n_layers, B, Hkv] dims (KVCache's storage, or one layer unsqueezed)."""
    k: torch.Tensor          # [nl, B, H, L, d]
    v: torch.Tensor
    pos: torch.Tensor        # [nl, B, H, L] int32
    centroids: torch.Tensor  # [nl, B, H, C, d]
    vmean: torch.Tensor
    logsize: torch.Tensor    # [nl, B, H, C] fp32
    cstart: torch.Tensor     # [nl, B, H, C + 1] int32
    ncl: torch.Tensor        # [nl, B, H] int32
    kvar: torch.Tensor       # [nl, B, H, C, d] per-dimension variance of the member keys


def split_segments(lo, hi, cfg):
    """[lo, hi) -> k-means segments of segment_len tokens; a last piece shorter than cluster_size is
    merged into the one before it, so every segment has at least one full cluster. [] if hi-lo < cs."""
    if hi - lo < cfg.cluster_size:
        return []
    b = list(range(lo, hi, cfg.segment_len)) + [hi]
    segs = list(zip(b[:-1], b[1:]))
    if len(segs) > 1 and segs[-1][1] - segs[-1][0] < cfg.cluster_size:
        segs[-2:] = [(segs[-2][0], hi)]
    return segs


def cluster_jobs(tab, jobs, cfg, backend="auto"):
    """Cluster segments jobs = [(b, s, e), ...] (equal lengths, distinct sequences b) of every layer and
    head of `tab` in one batch, reorder the storage in place and append the clusters. No host sync."""
    nl, _, H = tab.ncl.shape
    d = tab.k.shape[-1]
    n = jobs[0][2] - jobs[0][1]
    assert all(e - s == n for _, s, e in jobs) and len({b for b, _, _ in jobs}) == len(jobs)
    J, N, k = len(jobs), len(jobs) * nl * H, n // cfg.cluster_size
    dev = tab.k.device
    reorder = reorder_rows_triton if _use_triton(tab.k, backend) else reorder_rows_ref
    # Scratch copies of storage [s, e) of every (job, layer, head): problem p = (j * nl + l) * H + h.
    keys = torch.stack([tab.k[:, b, :, s:e] for b, s, e in jobs]).view(N, n, d)
    vals = torch.stack([tab.v[:, b, :, s:e] for b, s, e in jobs]).view(N, n, d)
    pos = torch.stack([tab.pos[:, b, :, s:e] for b, s, e in jobs]).view(N, n)
    r = cluster_block(keys, vals, k, cfg.kmeans_iters, backend)
    # Reorder in place: copy the scratch rows back over [s, e) in cluster order.
    for j, (b, s, e) in enumerate(jobs):
        p = slice(j * nl * H, (j + 1) * nl * H)
        reorder(keys[p], r.perm[p], tab.k[:, b, :, s:e])
        reorder(vals[p], r.perm[p], tab.v[:, b, :, s:e])
        tab.pos[:, b, :, s:e] = pos[p].gather(1, r.perm[p]).view(nl, H, n)
    l3 = torch.arange(nl, device=dev).view(1, nl, 1)
    h3 = torch.arange(H, device=dev).view(1, 1, H)
    b3 = torch.tensor([b for b, _, _ in jobs], device=dev).view(J, 1, 1)
    s3 = torch.tensor([s for _, s, _ in jobs], device=dev).view(J, 1, 1)
    # Append: problem p's clusters go to table rows ncl[p] .. ncl[p] + k - 1 (rows past nkept are padding
    # that the next append overwrites); cstart gets the absolute storage offsets s + starts.
    base = tab.ncl[l3, b3, h3].long()                                     # [J, nl, H]
    dest = base[..., None] + torch.arange(k + 1, device=dev)              # [J, nl, H, k + 1]
    idx = (l3[..., None], b3[..., None], h3[..., None])
    tab.centroids[idx + (dest[..., :k],)] = r.centroids.view(J, nl, H, k, d)
    tab.vmean[idx + (dest[..., :k],)] = r.vmean.view(J, nl, H, k, d)
    tab.logsize[idx + (dest[..., :k],)] = r.logsize.view(J, nl, H, k)
    tab.kvar[idx + (dest[..., :k],)] = r.kvar.view(J, nl, H, k, d)
    tab.cstart[idx + (dest,)] = (s3[..., None] + r.starts.view(J, nl, H, k + 1)).to(torch.int32)
    tab.ncl[l3, b3, h3] = (base + r.nkept.view(J, nl, H)).to(torch.int32)


def cluster_range(layer, b, lo, hi, cfg, backend="auto"):
    """Cluster storage [lo, hi) of sequence b in one layer (any object with LayerCache's tensors), in
    segments of segment_len. Returns the new tail start (hi, or lo if fewer than cluster_size tokens);
    moving the cache's tail_start there is the caller's job. Syncs once to check the table capacity."""
    tab = Tables(*(getattr(layer, f).unsqueeze(0) for f in Tables._fields))
    segs = split_segments(lo, hi, cfg)
    need = sum((e - s) // cfg.cluster_size for s, e in segs)
    if int(tab.ncl[0, b].max()) + need > tab.centroids.shape[3]:
        raise ValueError(f"cluster table full: {need} more clusters do not fit in C={tab.centroids.shape[3]}")
    for s, e in segs:
        cluster_jobs(tab, [(b, s, e)], cfg, backend)
    return segs[-1][1] if segs else lo


SIZE_EDGES = (1, 2, 4, 8, 16, 32, 64)   # size_report histogram bins [e_i, e_{i+1}); the last is [64, inf)


def size_report(src, slot, cluster_size=None, edges=SIZE_EDGES):
    """Cluster sizes of sequence `slot`, per layer over all its KV heads (for `python -m nanodp.inspect`).

    src: a KVCache (cluster_size defaults to its cfg), its Tables (`cache.store`), or one layer (a LayerCache
    or anything with its `cstart` [B, Hkv, C + 1] and `ncl` [B, Hkv]). Returns a dict of plain Python values:
      cluster_size  the target size; big = clusters over 3 x cluster_size
      edges         the histogram bins [edges[i], edges[i+1]), the last one open
      layers        one dict per layer: clusters (per KV head), tokens (clustered), largest, mean,
                    over_3x (share of the clustered tokens that sit in big clusters), hist (clusters per bin)
      all           the same over every layer (clusters is the total)
    Copies the slot's cstart and ncl to the host once (a sync: meant for inspection, not the serving loop).
    """
    if hasattr(src, "store") and hasattr(src, "cfg"):
        tab, cluster_size = src.store, cluster_size or src.cfg.cluster_size
    elif isinstance(src, Tables):
        tab = src
    else:
        tab = Tables(*(getattr(src, f).unsqueeze(0) if hasattr(src, f) else None for f in Tables._fields))
    if not cluster_size:
        raise ValueError("size_report needs cluster_size when src is not a KVCache")
    cs, ncl = tab.cstart[:, slot].long().cpu(), tab.ncl[:, slot].long().cpu()          # [nl, H, C+1], [nl, H]
    valid = torch.arange(cs.shape[-1] - 1) < ncl[..., None]                            # [nl, H, C]
    sizes = torch.where(valid, cs[..., 1:] - cs[..., :-1], 0)
    bounds = list(edges) + [1 << 62]

    def one(sz, ok, clusters):
        s = sz[ok]
        tokens = int(s.sum())
        return dict(clusters=clusters, tokens=tokens, largest=int(s.max()) if s.numel() else 0,
                    mean=tokens / max(1, s.numel()),
                    over_3x=float(s[s > 3 * cluster_size].sum()) / max(1, tokens),
                    hist=[int(((s >= lo) & (s < hi)).sum()) for lo, hi in zip(bounds, bounds[1:])])

    layers = [one(sizes[i], valid[i], ncl[i].tolist()) for i in range(sizes.shape[0])]
    return dict(cluster_size=cluster_size, edges=list(edges), layers=layers,
                all=one(sizes, valid, int(ncl.sum())))


def format_size_report(rep):
    """size_report() as a table: one line per layer, then `all`."""
    e = rep["edges"]
    bins = [str(a) if b == a + 1 else f"{a}-{b - 1}" for a, b in zip(e, e[1:])] + [f"{e[-1]}+"]
    big = 3 * rep["cluster_size"]
    lines = [f"layer  clusters/head  tokens  largest   mean  >{big}(tok%)  sizes: " + " ".join(f"{b:>5}" for b in bins)]
    for name, r in [(str(i), r) for i, r in enumerate(rep["layers"])] + [("all", rep["all"])]:
        cl = "/".join(map(str, r["clusters"])) if isinstance(r["clusters"], list) else str(r["clusters"])
        lines.append(f"{name:>5}  {cl:>13}  {r['tokens']:6d}  {r['largest']:7d}  {r['mean']:5.1f}  "
                     f"{100 * r['over_3x']:10.1f}  " + " " * 7 + " ".join(f"{h:5d}" for h in r["hist"]))
    return "\n".join(lines)
