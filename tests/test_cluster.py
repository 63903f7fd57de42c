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
