"""Clustering of the KV cache: batched centred spherical k-means over post-RoPE keys, then the in-place reorder.

A clustering job takes storage [s, e) of one sequence in every layer and KV head: N = n_layers * Hkv
independent problems of n = e - s keys each, solved together as one batched k-means read in place from the
cache. Each problem gets k = n // cluster_size clusters (so the table never overflows: see KVCache), after
which the tokens of [s, e) are permuted so each cluster is contiguous and the clusters are appended to the
table (docs/INTERNALS.md, "KV cache" and "Clustering"). The pass, per batch of jobs (kernels/kmeans.py):

    mean_init -> step x (iters - 1) -> final -> stable sort of the ids -> reorder -> append

On the Triton path that is 1 workspace memset + iters + 3 launches + one torch.sort, no host sync and no
scratch copy of the keys beyond the one the in-place reorder needs (written by the final round, which reads
the rows anyway). The torch path composes the twins of the same steps.
"""

from typing import NamedTuple

import torch

from nanodp.kernels.kmeans import make_rows
from nanodp.kernels.kmeans_pass import final_ref, final_triton, mean_init_ref, mean_init_triton, step_ref, step_triton
from nanodp.kernels.kmeans_store import append_ref, append_triton, cluster_stats_ref, reorder_ref, reorder_triton

MAX_ROWS = 1 << 21  # keys per batched k-means call (N * n); bounds the scratch memory (~0.5 GB at d=128)


def _use_triton(x, backend):
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    return x.is_cuda if backend == "auto" else backend == "triton"


def _check(n, k, iters):
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= n, got k={k}, n={n}")
    if iters < 1:
        raise ValueError(f"k-means needs at least one iteration, got {iters}")


class _Workspace:
    """Zero-initialised accumulators of one pass, one allocation (one memset): m [N, d], S [N, k, d] fp32,
    the rounds' cluster sizes scnt [N, k] and last assignment prev [N, n] (step_triton's carried state),
    the final counts cnt [N, k] int32 and one set of [N] arrival counters per launch that needs them."""

    def __init__(self, N, k, d, launches, device, n=0):
        sizes = dict(mu=N * d, s=N * k * d, scnt=N * k, prev=N * n, cnt=N * k, ctr=launches * N)
        buf = torch.zeros(sum(sizes.values()), dtype=torch.int32, device=device)
        views, o = {}, 0
        for name, size in sizes.items():
            views[name], o = buf[o : o + size], o + size
        self.mu = views["mu"].view(torch.float32).view(N, d)
        self.s = views["s"].view(torch.float32).view(N, k, d)
        self.scnt, self.prev = views["scnt"].view(N, k), views["prev"].view(N, n)
        self.cnt = views["cnt"].view(N, k)
        self.ctr = views["ctr"].view(launches, N)


def _ids_dtype(k):
    return torch.int16 if k <= torch.iinfo(torch.int16).max else torch.int32  # fewer radix-sort passes


def _kmeans_triton(r, k, iters, scratch=None):
    """Rounds of the pass on rows r: returns (assignment [N, n], workspace). With scratch, the final round
    also copies the raw K, V, pos rows there."""
    N, n, d = r.N, r.n, r.k.shape[-1]
    ws = _Workspace(N, k, d, iters + 1, r.k.device, n)
    c = torch.empty(N, k, d, dtype=r.k.dtype, device=r.k.device)
    mean_init_triton(r, k, ws.mu, c, ws.ctr[0])
    for i in range(iters - 1):
        step_triton(r, ws.mu, c, ws.s, ws.scnt, ws.prev, ws.ctr[1 + i])
    a = torch.empty(N, n, dtype=_ids_dtype(k), device=r.k.device)
    final_triton(r, ws.mu, c, a, ws.cnt, scratch)
    return a, ws


def _kmeans_torch(x, k, iters):
    """The same rounds from the twins on gathered rows x [N, n, d]: (assignment int32, counts int32)."""
    mu, c = mean_init_ref(x, k)
    for _ in range(iters - 1):
        c = step_ref(x, mu, c)
    return final_ref(x, mu, c)


def kmeans(keys, k, iters, backend="auto"):
    """keys [N, n, d] -> assign [N, n] int64: `iters` rounds of centred spherical k-means, per problem.

    centre    y_t = u(x_t - m),  m = (1/n) sum_t x_t,  u(z) = z / max(|z|, 1e-12)   (fp32; y_t = 0 if x_t = m;
              then rounded to the keys' dtype, the precision the assignment multiplies in)
    init      c_j = y_{floor(j n / k)}                  (evenly spaced over the segment, j = 0..k-1)
    assign    a_t = argmax_j y_t . c_j                  (largest cosine: |c_j| = 1; ties -> lowest j)
    update    c_j = u(sum{y_t : a_t = j})               (a zero sum, e.g. an empty cluster, keeps c_j)
    y and c are kept in the keys' dtype (products accumulated in fp32); the sums are fp32.
    Round i assigns against the centroids of round i-1; the last round's assignment is returned. What the
    caller stores is not c_j but the plain mean of the members' raw keys (see cluster_block), so q.C is the
    mean logit of the cluster; spherical assignment only decides who the members are.
    backend: "auto" (Triton on CUDA, torch otherwise), "triton" (also on CPU, in the interpreter), "torch".
    """
    N, n, d = keys.shape
    _check(n, k, iters)
    if not _use_triton(keys, backend):
        return _kmeans_torch(keys, k, iters)[0].long()
    r = make_rows(keys.unsqueeze(0).unsqueeze(2), None, None, [(p, 0) for p in range(N)], n)
    return _kmeans_triton(r, k, iters)[0].long()


class ClusterResult(NamedTuple):
    perm: torch.Tensor  # [N, n] int64: new row t of the segment is old row perm[t]
    centroids: torch.Tensor  # [N, k, d] keys' dtype; rows >= nkept are padding (zeros)
    vmean: torch.Tensor  # [N, k, d]
    logsize: torch.Tensor  # [N, k] fp32; -inf on padding rows
    kvar: torch.Tensor  # [N, k, d] keys' dtype: per-dimension variance of the member keys (padding: 0);
    #                          computed in fp32, rounded once on storing: bf16 keeps fp32's range, and its
    #                          2^-9 relative rounding is below that of the centroid it corrects (q.C)
    starts: torch.Tensor  # [N, k + 1] int64: cluster i is rows [starts[i], starts[i+1]); = n past nkept
    nkept: torch.Tensor  # [N] int64: non-empty clusters


def cluster_block(keys, values, k, iters, backend="auto"):
    """Cluster N problems of n tokens: k-means on keys (kmeans(): centred spherical, so membership is decided
    by direction about the segment mean), then the order and the statistics of the raw rows.

    Reorder: a stable sort of the tokens by cluster id, so cluster j's members become contiguous and keep
    their original order inside it. Empty clusters have zero length in that order; they are moved behind
    the non-empty ones (whose relative order is kept), so the first nkept rows are the real clusters.
    Statistics from the stored (model-dtype) rows, in fp32: centroid = mean of member keys, vmean = mean of
    member values, logsize = ln(size), kvar = mean of (k - centroid)^2 per dimension (the population variance
    about the fp32 mean, one pass shifted by the segment mean; it feeds the `gauss` estimate, kernels/doublep.py).
    The inputs are not modified: this runs the cache pass (cluster_jobs) on a copy laid out as a cache.
    """
    N, n, d = keys.shape
    _check(n, k, iters)
    z = dict(device=keys.device)
    tab = Tables(
        k=keys.reshape(1, N, 1, n, d).clone(),
        v=values.reshape(1, N, 1, n, d).clone(),
        pos=torch.arange(n, dtype=torch.int32, **z).expand(1, N, 1, n).contiguous(),
        centroids=torch.empty(1, N, 1, k, d, dtype=keys.dtype, **z),
        vmean=torch.empty(1, N, 1, k, d, dtype=values.dtype, **z),
        logsize=torch.empty(1, N, 1, k, dtype=torch.float32, **z),
        cstart=torch.empty(1, N, 1, k + 1, dtype=torch.int32, **z),
        ncl=torch.zeros(1, N, 1, dtype=torch.int32, **z),
        kvar=torch.empty(1, N, 1, k, d, dtype=keys.dtype, **z),
    )
    _pass(tab, [(p, 0, n) for p in range(N)], k, iters, backend)
    t = Tables(*(x[0, :, 0] for x in tab))
    return ClusterResult(t.pos.long(), t.centroids, t.vmean, t.logsize, t.kvar, t.cstart.long(), t.ncl.long())


class Tables(NamedTuple):
    """The cache tensors with leading [n_layers, B, Hkv] dims (KVCache's storage, or one layer unsqueezed)."""

    k: torch.Tensor  # [nl, B, H, L, d]
    v: torch.Tensor
    pos: torch.Tensor  # [nl, B, H, L] int32
    centroids: torch.Tensor  # [nl, B, H, C, d]
    vmean: torch.Tensor
    logsize: torch.Tensor  # [nl, B, H, C] fp32
    cstart: torch.Tensor  # [nl, B, H, C + 1] int32
    ncl: torch.Tensor  # [nl, B, H] int32
    kvar: torch.Tensor  # [nl, B, H, C, d] per-dimension variance of the member keys


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


def _pass(tab, jobs, k, iters, backend):
    """The clustering pass over jobs [(b, s, e), ...] (equal lengths n, distinct b) of every layer and head of
    `tab`, k clusters per problem: reorder [s, e) in place, append the clusters, bump ncl. No host sync."""
    nl, _, H = tab.ncl.shape
    d = tab.k.shape[-1]
    n = jobs[0][2] - jobs[0][1]
    assert all(e - s == n for _, s, e in jobs) and len({b for b, _, _ in jobs}) == len(jobs)
    _check(n, k, iters)
    r = make_rows(tab.k, tab.v, tab.pos, [(b, s) for b, s, _ in jobs], n)
    N, dev = r.N, tab.k.device
    if _use_triton(tab.k, backend):
        scratch = (
            torch.empty(N, n, d, dtype=tab.k.dtype, device=dev),
            torch.empty(N, n, d, dtype=tab.v.dtype, device=dev),
            torch.empty(N, n, dtype=torch.int32, device=dev),
        )
        a, ws = _kmeans_triton(r, k, iters, scratch)
        sid, perm = torch.sort(a, dim=1, stable=True)  # stable: members keep their order
        reorder_triton(r, perm, *scratch)
        append_triton(r, tab, sid, ws.cnt, ws.ctr[iters], ws.mu)
        return
    x, v, pos = r.gather(tab.k), r.gather(tab.v), r.gather(tab.pos)  # scratch copies: [N, n, ...]
    a, cnt = _kmeans_torch(x, k, iters)
    sid, perm = torch.sort(a, dim=1, stable=True)
    xs, vs = reorder_ref(x, perm), reorder_ref(v, perm)
    for j, (b, s, e) in enumerate(jobs):  # write back in cluster order
        p = slice(j * nl * H, (j + 1) * nl * H)
        tab.k[:, b, :, s:e] = xs[p].view(nl, H, n, d)
        tab.v[:, b, :, s:e] = vs[p].view(nl, H, n, d)
        tab.pos[:, b, :, s:e] = reorder_ref(pos[p], perm[p]).view(nl, H, n)
    append_ref(tab, r, *cluster_stats_ref(xs, vs, sid, cnt), cnt)


def cluster_jobs(tab, jobs, cfg, backend="auto"):
    """Cluster segments jobs = [(b, s, e), ...] (equal lengths, distinct sequences b) of every layer and
    head of `tab` in one batch, reorder the storage in place and append the clusters. No host sync."""
    _pass(tab, jobs, (jobs[0][2] - jobs[0][1]) // cfg.cluster_size, cfg.kmeans_iters, backend)


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


SIZE_EDGES = (1, 2, 4, 8, 16, 32, 64)  # size_report histogram bins [e_i, e_{i+1}); the last is [64, inf)


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
    cs, ncl = tab.cstart[:, slot].long().cpu(), tab.ncl[:, slot].long().cpu()  # [nl, H, C+1], [nl, H]
    valid = torch.arange(cs.shape[-1] - 1) < ncl[..., None]  # [nl, H, C]
    sizes = torch.where(valid, cs[..., 1:] - cs[..., :-1], 0)
    bounds = list(edges) + [1 << 62]

    def one(sz, ok, clusters):
        s = sz[ok]
        tokens = int(s.sum())
        return dict(
            clusters=clusters,
            tokens=tokens,
            largest=int(s.max()) if s.numel() else 0,
            mean=tokens / max(1, s.numel()),
            over_3x=float(s[s > 3 * cluster_size].sum()) / max(1, tokens),
            hist=[int(((s >= lo) & (s < hi)).sum()) for lo, hi in zip(bounds, bounds[1:])],
        )

    layers = [one(sizes[i], valid[i], ncl[i].tolist()) for i in range(sizes.shape[0])]
    return dict(cluster_size=cluster_size, edges=list(edges), layers=layers, all=one(sizes, valid, int(ncl.sum())))


def format_size_report(rep):
    """size_report() as a table: one line per layer, then `all`."""
    e = rep["edges"]
    bins = [str(a) if b == a + 1 else f"{a}-{b - 1}" for a, b in zip(e, e[1:])] + [f"{e[-1]}+"]
    big = 3 * rep["cluster_size"]
    lines = [f"layer  clusters/head  tokens  largest   mean  >{big}(tok%)  sizes: " + " ".join(f"{b:>5}" for b in bins)]
    for name, r in [(str(i), r) for i, r in enumerate(rep["layers"])] + [("all", rep["all"])]:
        cl = "/".join(map(str, r["clusters"])) if isinstance(r["clusters"], list) else str(r["clusters"])
        lines.append(
            f"{name:>5}  {cl:>13}  {r['tokens']:6d}  {r['largest']:7d}  {r['mean']:5.1f}  "
            f"{100 * r['over_3x']:10.1f}  " + " " * 7 + " ".join(f"{h:5d}" for h in r["hist"])
        )
    return "\n".join(lines)
