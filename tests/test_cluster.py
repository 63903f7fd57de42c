"""Centred spherical k-means against a plain-torch reference, and why it replaced inner-product k-means."""

import pytest
import torch
import torch.nn.functional as F

from nanodp.cluster import kmeans


def eq(a, b):
    """torch.equal on the CPU (the kernels run on DEV; references may be built on the CPU)."""
    return torch.equal(a.cpu(), b.cpu())


DEV = "cuda" if torch.cuda.is_available() else "cpu"  # Triton needs CUDA, or the CPU interpreter


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def spherical_ref(x, k, iters):
    """The algorithm as written in docs/DESIGN.md ("The clustered KV cache"), one problem at a time:
    [n, d] -> [n] cluster ids."""
    n = x.shape[0]
    y = F.normalize(x - x.mean(0), dim=1)  # centre on the segment mean, unit length
    c = y[torch.arange(k) * n // k]  # evenly spaced initialisation
    for it in range(iters):
        a = (y @ c.T).argmax(1)  # largest cosine (c has unit rows)
        if it == iters - 1:
            return a
        s = torch.zeros_like(c).index_add_(0, a, y)  # mean of the normalised members, normalised;
        norm = s.norm(dim=1, keepdim=True)  # an empty cluster keeps its centroid
        c = torch.where(norm > 0, s / norm.clamp_min(1e-30), c)


def inner_product_ref(x, k, iters):
    """What nanodp did first: assign by raw inner product, centroid = mean of the raw member keys."""
    n = x.shape[0]
    c = x[torch.arange(k) * n // k]
    for it in range(iters):
        a = (x @ c.T).argmax(1)
        if it == iters - 1:
            return a
        cnt = torch.bincount(a, minlength=k)[:, None]
        s = torch.zeros_like(c).index_add_(0, a, x)
        c = torch.where(cnt > 0, s / cnt.clamp_min(1), c)


def outlier_keys(seed, n=512, d=16, planted=32, outliers=48):
    """Keys near `planted` directions (norm 2), plus `outliers` tokens far out along one direction (norm 12),
    like the few huge-norm keys of a real layer."""
    g = torch.Generator().manual_seed(seed)
    dirs = F.normalize(torch.randn(planted, d, generator=g), dim=1) * 2
    x = dirs[torch.randint(0, planted, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)
    u = F.normalize(torch.randn(d, generator=g), dim=0)
    x[torch.randperm(n, generator=g)[:outliers]] = 12 * u + 0.3 * torch.randn(outliers, d, generator=g)
    return x


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kmeans_equals_spherical_reference(backend):
    g = torch.Generator().manual_seed(11)
    N, n, d, k = 3, 203, 24, 13  # not multiples of any tile size
    x = torch.randn(N, n, d, generator=g) + 2 * torch.randn(N, 1, d, generator=g)  # common offset per problem
    x[1, :40] *= 6  # and some long keys
    got = kmeans(x.to(DEV if backend == "triton" else "cpu"), k, 6, backend).cpu()
    for p in range(N):
        assert eq(got[p], spherical_ref(x[p], k, 6)), p


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_spherical_no_giant_cluster_where_inner_product_makes_one(backend):
    """One far direction: inner-product centroids there out-score everything with a positive component along
    it and swallow ~a quarter of the tokens; centred spherical clusters stay near the target size (16)."""
    n, k = 512, 32
    x = outlier_keys(0, n=n)
    ip = torch.bincount(inner_product_ref(x, k, 10), minlength=k)
    assert ip.max() > 6 * n // k and ip[ip > 3 * n // k].sum() > 0.15 * n  # the failure this guards against
    a = kmeans(x[None].to(DEV if backend == "triton" else "cpu"), k, 10, backend)[0].cpu()
    sph = torch.bincount(a, minlength=k)
    assert sph.max() <= 3 * n // k, sph.tolist()  # none over 3x the target


# ------------------------------------------------------------------------------------- size report
def test_size_report():
    from types import SimpleNamespace

    from nanodp.cache import KVCache
    from nanodp.cluster import format_size_report, size_report
    from nanodp.config import ClusterConfig

    # hand-made table: layer 0 heads of sizes [1, 16, 50, 3] and [20]; layer 1 empty; slot 1 (slot 0 is noise)
    C = 6
    cstart = torch.zeros(2, 2, 2, C + 1, dtype=torch.int32)
    ncl = torch.zeros(2, 2, 2, dtype=torch.int32)
    cstart[:, 0] = 7
    ncl[:, 0] = 5
    cstart[0, 1, 0, :5] = torch.tensor([4, 5, 21, 71, 74])
    cstart[0, 1, 0, 5:] = 99  # past ncl: ignored
    cstart[0, 1, 1, :2] = torch.tensor([4, 24])
    ncl[0, 1] = torch.tensor([4, 1])
    layer = lambda i: SimpleNamespace(cstart=cstart[i], ncl=ncl[i])  # noqa: E731
    r0 = size_report(layer(0), 1, cluster_size=16)
    L = r0["layers"][0]
    assert (L["clusters"], L["tokens"], L["largest"]) == ([4, 1], 90, 50)
    assert L["over_3x"] == 50 / 90 and L["mean"] == 18
    assert L["hist"] == [1, 1, 0, 0, 2, 1, 0]  # bins 1, 2-3, 4-7, 8-15, 16-31, 32-63, >= 64
    assert size_report(layer(1), 1, cluster_size=16)["layers"][0] == dict(
        clusters=[0, 0], tokens=0, largest=0, mean=0.0, over_3x=0.0, hist=[0] * 7
    )
    with pytest.raises(ValueError, match="cluster_size"):
        size_report(layer(0), 1)
    # a real cache: every clustered token is counted once, in every layer
    cfg = ClusterConfig(sinks=4, window=8, cluster_size=4, kmeans_iters=3, segment_len=32, recluster_every=16)
    c = KVCache(2, 2, 2, 128, 8, torch.float32, "cpu", cfg, "torch")
    c.store.k.normal_(generator=torch.Generator().manual_seed(0))
    c.set_len(1, 100)
    c.cluster_pending(force=True)
    rep = size_report(c, 1)
    assert rep["cluster_size"] == 4 and len(rep["layers"]) == 2
    for i, r in enumerate(rep["layers"]):
        assert r["tokens"] == 2 * (c.tail_host[1] - 4) and sum(r["hist"]) == sum(r["clusters"])
        assert r["clusters"] == c.layers[i].ncl[1].tolist()
    assert rep["all"]["tokens"] == 4 * (c.tail_host[1] - 4)
    assert size_report(c.store, 1, cluster_size=4) == rep
    text = format_size_report(rep)
    assert len(text.splitlines()) == 4 and text.splitlines()[-1].lstrip().startswith("all")


# ------------------------------------------------------------------ clustering-pass kernels vs twins
from nanodp.cluster import Tables, _Workspace, cluster_block  # noqa: E402
from nanodp.kernels import kmeans as km  # noqa: E402
from nanodp.kernels import kmeans_pass as kp  # noqa: E402
from nanodp.kernels import kmeans_store as ks  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def rows_case(dtype, n=77, d=24, nl=2, H=3, B=3, L=110, seed=0):
    """A cache [nl, B, H, L, d] with two jobs at different slots and offsets (sizes off every tile size)."""
    g = torch.Generator().manual_seed(seed)
    k = (torch.randn(nl, B, H, L, d, generator=g) + 2 * torch.randn(nl, 1, H, 1, d, generator=g)).to(dtype)
    v = torch.randn(nl, B, H, L, d, generator=g).to(dtype)
    pos = torch.arange(L, dtype=torch.int32).expand(nl, B, H, L).contiguous()
    return km.make_rows(k.to(DEV), v.to(DEV), pos.to(DEV), [(2, 5), (0, 17)], n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mean_init_kernel_matches_twin(dtype):
    r, k = rows_case(dtype), 37
    ws = _Workspace(r.N, k, 24, 1, DEV)
    c = torch.empty(r.N, k, 24, dtype=dtype, device=DEV)
    kp.mean_init_triton(r, k, ws.mu, c, ws.ctr[0], block_t=32, block_k=16)
    mu, cr = kp.mean_init_ref(r.gather(r.k), k)
    torch.testing.assert_close(ws.mu.cpu(), mu.cpu(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c.cpu(), cr.cpu(), rtol=TOL[dtype], atol=TOL[dtype])
    assert ws.ctr[0].eq(3).all()  # every program arrived (77 rows / 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_step_kernel_matches_twin(dtype):
    r, k = rows_case(dtype, seed=1), 37
    x = r.gather(r.k)
    mu, c = kp.mean_init_ref(x, k)
    c[:, 20] = c[:, 3]  # a duplicate in another chunk: stays empty, keeps c
    c[:, 7] = -c.float().sum(1).to(dtype)  # (and one far from everything)
    ws = _Workspace(r.N, k, 24, 1, DEV, r.n)
    ws.mu.copy_(mu)
    got = c.clone()
    kp.step_triton(r, ws.mu, got, ws.s, ws.scnt, ws.prev, ws.ctr[0], block_t=32, block_k=16)
    want = kp.step_ref(x, mu, c)
    assert eq(got[:, 20], c[:, 20]) and eq(want[:, 20], c[:, 20])
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=TOL[dtype], atol=TOL[dtype])
    # the carried state: the assignment + 1, the member counts and the sums of y (empty clusters: exactly 0)
    y = kp.centred_unit_ref(x, mu).to(dtype)
    a = ws.prev.long() - 1
    assert eq(a.sort(1).values.ge(0), torch.ones(r.N, r.n, dtype=torch.bool))
    assert eq(ws.scnt, torch.zeros_like(ws.scnt).scatter_add_(1, a, torch.ones_like(a, dtype=torch.int32)))
    torch.testing.assert_close(ws.s.cpu(), km.cluster_sums_ref(y, a, k).cpu(), rtol=TOL[dtype], atol=TOL[dtype])
    assert ws.s[ws.scnt == 0].eq(0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_final_kernel_matches_twin(dtype):
    r, k = rows_case(dtype, seed=2), 37
    x = r.gather(r.k)
    mu, c = kp.mean_init_ref(x, k)
    c = kp.step_ref(x, mu, c)
    ws = _Workspace(r.N, k, 24, 1, DEV)
    ws.mu.copy_(mu)
    a = torch.full((r.N, r.n), -1, dtype=torch.int16, device=DEV)
    xs, vs = torch.empty_like(x), torch.empty_like(x)
    ps = torch.empty(r.N, r.n, dtype=torch.int32, device=DEV)
    kp.final_triton(r, ws.mu, c, a, ws.cnt, (xs, vs, ps), block_t=32, block_k=16)
    ar, cnt = kp.final_ref(x, mu, c)
    if dtype == torch.float32:
        assert eq(a.int(), ar) and eq(ws.cnt, cnt)
    else:  # fp16 products: only near-ties may differ
        assert (a.int() != ar).float().mean() < 0.02
    assert eq(ws.cnt.sum(1), torch.full((r.N,), r.n, dtype=torch.int32))
    assert eq(xs, x) and eq(vs, r.gather(r.v)) and eq(ps, r.gather(r.pos))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reorder_kernel_matches_twin(dtype):
    r = rows_case(dtype, seed=3)
    g = torch.Generator().manual_seed(3)
    perm = torch.stack([torch.randperm(r.n, generator=g) for _ in range(r.N)]).to(DEV)
    xs, vs, ps = r.gather(r.k), r.gather(r.v), r.gather(r.pos)
    k0, v0, p0 = r.k.clone(), r.v.clone(), r.pos.clone()
    ks.reorder_triton(r, perm, xs, vs, ps, block_t=32)
    assert eq(r.gather(r.k), ks.reorder_ref(xs, perm))
    assert eq(r.gather(r.v), ks.reorder_ref(vs, perm))
    assert eq(r.gather(r.pos), ks.reorder_ref(ps, perm))
    outside = torch.ones_like(r.pos, dtype=torch.bool)  # nothing else moved
    for b, s in r.jobs:
        outside[:, b, :, s : s + r.n] = False
    assert eq(r.k[outside], k0[outside]) and eq(r.v[outside], v0[outside])
    assert eq(r.pos[outside], p0[outside])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_append_kernel_matches_twin(dtype):
    r, k = rows_case(dtype, seed=4), 37
    nl, B, H = r.k.shape[:3]
    g = torch.Generator().manual_seed(4)
    sid = torch.randint(0, k - 3, (r.N, r.n), generator=g).sort(1).values.to(DEV)  # 3 empty clusters
    sid[:, :30] = 5  # one big cluster (spans several row tiles), more empty
    sid = sid.sort(1).values
    cnt = torch.zeros(r.N, k, dtype=torch.int32, device=DEV)
    cnt.scatter_add_(1, sid.long(), torch.ones_like(sid, dtype=torch.int32))
    C = 50
    z = dict(device=DEV)

    def tables():
        t = Tables(
            r.k,
            r.v,
            r.pos,
            torch.full((nl, B, H, C, 24), 7.0, dtype=dtype, **z),
            torch.full((nl, B, H, C, 24), 7.0, dtype=dtype, **z),
            torch.full((nl, B, H, C), 7.0, **z),
            torch.full((nl, B, H, C + 1), 7, dtype=torch.int32, **z),
            torch.zeros(nl, B, H, dtype=torch.int32, **z),
            torch.full((nl, B, H, C, 24), 7.0, dtype=dtype, **z),
        )
        t.ncl[:, 0] = torch.arange(H, dtype=torch.int32) * 3 + 1  # clusters already in some tables
        return t

    want, got = tables(), tables()
    ks.append_ref(want, r, *ks.cluster_stats_ref(r.gather(r.k), r.gather(r.v), sid, cnt), cnt)
    ws = _Workspace(r.N, k, 24, 1, DEV)
    mu = r.gather(r.k).float().mean(1)  # the pass's shift: the segment mean
    ks.append_triton(r, got, sid.to(torch.int16), cnt, ws.ctr[0], mu, block_c=16, block_r=16)
    for f in ("centroids", "vmean", "kvar", "logsize"):
        torch.testing.assert_close(
            getattr(got, f).cpu(), getattr(want, f).cpu(), rtol=TOL[dtype], atol=TOL[dtype], msg=f
        )
    assert eq(got.cstart, want.cstart) and eq(got.ncl, want.ncl)
    nkept = (cnt > 0).sum(1).view(2, nl, H)  # problem p = (job * nl + l) * H + h; job 1 is slot 0
    assert eq(got.ncl[:, 0].long(), nkept[1] + torch.arange(H, device=nkept.device) * 3 + 1) and nkept.max() < k - 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cluster_block_backends_agree(dtype):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(3, 90, 20, generator=g) + 3 * torch.randn(3, 1, 20, generator=g)).to(DEV, dtype)
    v = torch.randn(3, 90, 20, generator=g).to(DEV, dtype)
    x0 = x.clone()
    a, b = cluster_block(x, v, 7, 4, "triton"), cluster_block(x, v, 7, 4, "torch")
    assert eq(x, x0)  # inputs untouched
    if dtype == torch.float32:
        assert eq(a.perm, b.perm) and eq(a.starts, b.starts) and eq(a.nkept, b.nkept)
        for f in ("centroids", "vmean", "kvar", "logsize"):
            torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=1e-5, atol=1e-5, msg=f)
    for res in (a, b):  # either way: a permutation, and the stored centroid is the raw member mean
        assert eq(res.perm.sort(1).values, torch.arange(90).expand(3, 90))
        for p in range(3):
            for i in range(int(res.nkept[p])):
                rows = res.perm[p, res.starts[p, i] : res.starts[p, i + 1]]
                torch.testing.assert_close(
                    res.centroids[p, i].float(), x[p, rows].float().mean(0), rtol=TOL[dtype], atol=TOL[dtype]
                )


# ------------------------------------------------------------------------------ launches per call
VIEWS = {
    "view",
    "_unsafe_view",
    "expand",
    "slice",
    "select",
    "unsqueeze",
    "squeeze",
    "t",
    "transpose",
    "permute",
    "as_strided",
    "alias",
    "detach",
    "empty",
    "empty_strided",
    "lift_fresh",
    "reshape",
    "_reshape_alias",
    "unbind",
    "split",
    "empty_like",
    "new_empty",
    "_pin_memory",
    "is_pinned",
}


def count_device_ops(fn, monkeypatch):
    """Run fn; return a Counter of what would launch device work: every non-view aten op (>= 1 kernel on
    CUDA) plus every Triton launch (aten ops the interpreter runs inside a launch are not counted)."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    tally, inside = collections.Counter(), [0]

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if not inside[0] and name not in VIEWS:
                tally[name] += 1
            return func(*args, **(kwargs or {}))

    class Counted:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def run(*a, **kw):
                tally["triton" + self.name] += 1
                inside[0] += 1
                try:
                    return launch(*a, **kw)
                finally:
                    inside[0] -= 1

            return run

    for mod in (km, kp, ks):
        for name in [n for n in vars(mod) if n.startswith("_") and n.endswith("_kernel")]:
            monkeypatch.setattr(mod, name, Counted(name, getattr(mod, name)))
    with Mode():
        fn()
    return tally


def test_launches_per_clustering_call(monkeypatch):
    """One cluster_pending of two sequences (one batch): 1 memset, iters + 3 Triton launches, 1 sort, the
    tail_start update, and on CUDA two pinned host-to-device copies (the job list, the new tail starts; no
    kernel, no sync). The version before the fused pass ran 165 device ops here."""
    from nanodp.cache import KVCache
    from nanodp.config import ClusterConfig

    cfg = ClusterConfig(sinks=4, window=8, cluster_size=4, kmeans_iters=10, segment_len=128, recluster_every=16)
    c = KVCache(2, 2, 2, 160, 16, torch.float32, DEV, cfg, "triton")
    c.store.k.normal_(generator=torch.Generator(device=DEV).manual_seed(0))
    for b in range(2):
        c.set_len(b, 4 + 128 + 8)
    tally = count_device_ops(lambda: c.cluster_pending(force=True), monkeypatch)
    assert sum(v for n, v in tally.items() if n.startswith("triton")) == cfg.kmeans_iters + 3, tally
    copies = tally.pop("_to_copy", 0)
    assert copies <= (2 if DEV == "cuda" else 0), tally
    assert tally["zeros"] == 1 and tally["sort"] == 1 and sum(tally.values()) <= cfg.kmeans_iters + 6, tally
