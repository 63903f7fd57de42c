"""Centred spherical k-means against a plain-torch reference, and why it replaced inner-product k-means."""
import pytest
import torch
import torch.nn.functional as F

from nanodp.cluster import kmeans

DEV = "cuda" if torch.cuda.is_available() else "cpu"   # Triton needs CUDA, or the CPU interpreter


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def spherical_ref(x, k, iters):
    """The algorithm as written in DESIGN.md section 5, one problem at a time: [n, d] -> [n] cluster ids."""
    n = x.shape[0]
    y = F.normalize(x - x.mean(0), dim=1)                 # centre on the segment mean, unit length
    c = y[torch.arange(k) * n // k]                       # evenly spaced initialisation
    for it in range(iters):
        a = (y @ c.T).argmax(1)                           # largest cosine (c has unit rows)
        if it == iters - 1:
            return a
        s = torch.zeros_like(c).index_add_(0, a, y)      # mean of the normalised members, normalised;
        norm = s.norm(dim=1, keepdim=True)                # an empty cluster keeps its centroid
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
    N, n, d, k = 3, 203, 24, 13                            # not multiples of any tile size
    x = torch.randn(N, n, d, generator=g) + 2 * torch.randn(N, 1, d, generator=g)   # common offset per problem
    x[1, :40] *= 6                                        # and some long keys
    got = kmeans(x.to(DEV if backend == "triton" else "cpu"), k, 6, backend).cpu()
    for p in range(N):
        assert torch.equal(got[p], spherical_ref(x[p], k, 6)), p


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_spherical_no_giant_cluster_where_inner_product_makes_one(backend):
    """One far direction: inner-product centroids there out-score everything with a positive component along
    it and swallow ~a quarter of the tokens; centred spherical clusters stay near the target size (16)."""
    n, k = 512, 32
    x = outlier_keys(0, n=n)
    ip = torch.bincount(inner_product_ref(x, k, 10), minlength=k)
    assert ip.max() > 6 * n // k and ip[ip > 3 * n // k].sum() > 0.15 * n   # the failure this guards against
    a = kmeans(x[None].to(DEV if backend == "triton" else "cpu"), k, 10, backend)[0].cpu()
    sph = torch.bincount(a, minlength=k)
    assert sph.max() <= 3 * n // k, sph.tolist()                            # none over 3x the target


# ------------------------------------------------------------------------------------- size report
def test_size_report():
    from types import SimpleNamespace
    from nanodp.cache import ClusterConfig, KVCache
    from nanodp.cluster import format_size_report, size_report
    # hand-made table: layer 0 heads of sizes [1, 16, 50, 3] and [20]; layer 1 empty; slot 1 (slot 0 is noise)
    C = 6
    cstart = torch.zeros(2, 2, 2, C + 1, dtype=torch.int32)
    ncl = torch.zeros(2, 2, 2, dtype=torch.int32)
    cstart[:, 0] = 7
    ncl[:, 0] = 5
    cstart[0, 1, 0, :5] = torch.tensor([4, 5, 21, 71, 74])
    cstart[0, 1, 0, 5:] = 99                               # past ncl: ignored
    cstart[0, 1, 1, :2] = torch.tensor([4, 24])
    ncl[0, 1] = torch.tensor([4, 1])
    layer = lambda i: SimpleNamespace(cstart=cstart[i], ncl=ncl[i])   # noqa: E731
    r0 = size_report(layer(0), 1, cluster_size=16)
    L = r0["layers"][0]
    assert (L["clusters"], L["tokens"], L["largest"]) == ([4, 1], 90, 50)
    assert L["over_3x"] == 50 / 90 and L["mean"] == 18
    assert L["hist"] == [1, 1, 0, 0, 2, 1, 0]               # bins 1, 2-3, 4-7, 8-15, 16-31, 32-63, >= 64
    assert size_report(layer(1), 1, cluster_size=16)["layers"][0] == dict(
        clusters=[0, 0], tokens=0, largest=0, mean=0.0, over_3x=0.0, hist=[0] * 7)
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
