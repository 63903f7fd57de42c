"""The `gauss` stage-1 estimate (SparseConfig.estimate): its definition, its exact cases, and the Triton
score kernel against the twin with it on. The cache-side statistic (kvar) is checked in tests/test_cache.py."""

import math
from dataclasses import make_dataclass

import pytest
import torch

from nanodp.config import SparseConfig
from nanodp.kernels.doublep import sparse_ref, stage1_logits, unit_scores
from tests.doublep_cases import RAGGED, check, dense, make_case, safe, sp, tri

LayerV = make_dataclass("LayerV", ["k", "v", "centroids", "vmean", "logsize", "cstart", "ncl", "kvar"])


def with_kvar(layer):
    """The case's layer plus kvar = per-dimension variance of each cluster's member keys (population, about
    the member mean), computed from the members; NaN past ncl (never to be read)."""
    B, H, C, d = layer.centroids.shape
    kvar = torch.full((B, H, C, d), float("nan"))
    for b in range(B):
        for h in range(H):
            cs = layer.cstart[b, h].long()
            for i in range(int(layer.ncl[b, h])):
                m = layer.k[b, h, cs[i] : cs[i + 1]].double()
                kvar[b, h, i] = ((m - m.mean(0)) ** 2).mean(0).float()
    return LayerV(
        *[getattr(layer, f) for f in LayerV.__dataclass_fields__ if f != "kvar"], kvar.to(layer.centroids.dtype)
    )


def case(**kw):
    q, layer, lens, ts, sinks = make_case(**kw)
    return q, with_kvar(layer), lens, ts, sinks


def gs(q, layer, estimate):
    """The group mean G [B, Hkv, C] of the twin's ranking."""
    lu = unit_scores(q, layer, None, None, 4, sp(estimate=estimate))[0]
    return lu[:, :, 0].exp()


# ---------------------------------------------------------------- the twin against the definition
def test_gauss_logits_definition():
    q, layer, lens, ts, sinks = case(g=3, d=64, B=2, lens=(150, 90), tail=(130, 60))
    zc, z, valid = stage1_logits(q, layer, estimate="gauss")
    for b in range(2):
        for h in range(2):
            cs = layer.cstart[b, h].long()
            for i in range(int(layer.ncl[b, h])):
                m = layer.k[b, h, cs[i] : cs[i + 1]].double()
                for r in range(3):
                    qh = q[b, 3 * h + r].double() / 8
                    want_c = math.log(len(m)) + float(qh @ m.mean(0))
                    want = want_c + 0.5 * float((qh**2) @ m.var(0, unbiased=False))
                    assert abs(float(zc[b, h, r, i]) - want_c) < 1e-4
                    assert abs(float(z[b, h, r, i]) - want) < 1e-4
            assert torch.isinf(z[b, h, :, int(layer.ncl[b, h]) :]).all()


def test_gauss_exact_for_single_token_clusters():
    """A cluster of one token has zero variance: the estimate is its logit, ln sum e^{q.k} exactly."""
    q, layer, lens, ts, sinks = case(g=4, d=64, max_size=1, **RAGGED)
    zc, z, valid = stage1_logits(q, layer, estimate="gauss")
    for b in range(3):
        for h in range(2):
            n = int(layer.ncl[b, h])
            true = q[b, 4 * h : 4 * h + 4] @ layer.k[b, h, layer.cstart[b, h, :n].long()].T / 8
            assert torch.allclose(z[b, h, :, :n], true, atol=1e-5) and torch.equal(z[b, h], zc[b, h])


def test_gauss_tracks_a_gaussian_cluster():
    """Members drawn from a diagonal Gaussian: the gauss estimate is close to the true log-mass, the
    centroid one is short by about var(q.k)/2 (Jensen)."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    d, n = 16, 20000
    q = torch.randn(1, 1, d, generator=gen)
    sd = 0.5 + torch.rand(d, generator=gen)
    keys = torch.randn(d, generator=gen) + sd * torch.randn(n, d, generator=gen)
    true = torch.logsumexp(keys @ q[0, 0] / 4, 0)
    layer = LayerV(
        None,
        None,
        keys.mean(0).view(1, 1, 1, d),
        None,
        torch.tensor([[[math.log(n)]]]),
        None,
        torch.tensor([[1]]),
        keys.var(0, unbiased=False).view(1, 1, 1, d),
    )
    zc, z, _ = stage1_logits(q, layer, estimate="gauss")
    half_var = 0.5 * float((q[0, 0] / 4) ** 2 @ sd**2)
    assert abs(float(z[0, 0, 0, 0]) - float(true)) < 0.1 + 0.1 * half_var
    assert abs(float(true - zc[0, 0, 0, 0]) - half_var) < 0.1 + 0.1 * half_var


def test_gauss_lifts_a_needle_cluster():
    """One key far along q inside a cluster of ordinary keys: the centroid estimate ranks that cluster below
    clusters of better aligned ordinary keys, the gauss one first (as the true mass does). The query is
    concentrated on a few dimensions, as real queries are (the diagonal term sees only those dimensions)."""
    d, g = 64, 1
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    q = 0.3 * torch.randn(1, g, d, generator=gen)
    q[..., :2] += 5.0
    u = q[0, 0] / q[0, 0].norm()
    keys = 0.3 * torch.randn(10, 16, d, generator=gen)  # 10 clusters of 16
    logit = torch.where(torch.arange(10) > 0, 1 + 2 * torch.arange(10) / 10, 0.0)  # 0, then 1.2 .. 2.8
    keys += logit[:, None, None] * 8 / q[0, 0].norm() * u
    keys[0, 5] = 16 * 8 / q[0, 0].norm() * u  # the needle (logit ~ 16), in cluster 0
    k = keys.reshape(1, 1, 160, d)
    cstart = (torch.arange(11) * 16).view(1, 1, 11).int()
    layer = with_kvar(
        type(
            "L",
            (),
            dict(
                k=k,
                v=k,
                centroids=keys.mean(1)[None, None],
                vmean=keys.mean(1)[None, None],
                logsize=torch.full((1, 1, 10), math.log(16)),
                cstart=cstart,
                ncl=torch.tensor([[10]]),
            ),
        )()
    )
    true = torch.logsumexp((k[0, 0] @ q[0, 0] / 8).view(10, 16), 1)
    assert int(true.argmax()) == 0
    Gc, Gg = gs(q, layer, "centroid"), gs(q, layer, "gauss")
    assert int((Gc[0, 0] > Gc[0, 0, 0]).sum()) >= 5  # centroid: the needle cluster ranks low
    assert int(Gg[0, 0].argmax()) == 0


@pytest.mark.parametrize("g,d", [(1, 64), (3, 64), (4, 128)])
def test_twin_all_exact_is_dense_with_gauss(g, d):
    q, layer, lens, ts, sinks = case(g=g, d=d, **RAGGED)
    o, st = sparse_ref(q, layer, lens, ts, sinks, sp(1.0, 1.0, estimate="gauss"))
    assert (o - dense(q, layer, lens)).abs().max() < 1e-5 and (st["pseudo_tokens"] == 0).all()


def test_twin_pseudo_logits_are_the_centroids():
    """p1 = 1, p2 = 0 (all pseudo): the pseudo-token logit is the centroid z whatever the estimate."""
    q, layer, lens, ts, sinks = case(g=3, d=64, **RAGGED)
    oc, _ = sparse_ref(q, layer, lens, ts, sinks, sp(1.0, 0.0))
    og, _ = sparse_ref(q, layer, lens, ts, sinks, sp(1.0, 0.0, estimate="gauss"))
    assert (oc - og).abs().max() < 1e-6


# ---------------------------------------------------------------- the kernels against the twin
@pytest.mark.parametrize(
    "g,d,dtype,style",
    [
        (1, 64, torch.float32, "skewed"),
        (3, 64, torch.float16, "flat"),
        (4, 128, torch.float32, "flat"),
        (4, 64, torch.float16, "skewed"),
    ],
)
def test_kernel_matches_twin_gauss(g, d, dtype, style):
    seed = torch.seed() % 2**31
    q, layer, lens, ts, sinks = case(g=g, d=d, dtype=dtype, style=style, seed=seed, **RAGGED)
    atol = 1e-4 if dtype == torch.float32 else 1e-2
    for cfg in (sp(0.95, 0.7, estimate="gauss"), sp(0.6, 0.25, estimate="gauss", group_rule="union", whole=True)):
        cfg = safe(q, layer, lens, ts, sinks, cfg)
        o1, st1 = sparse_ref(q, layer, lens, ts, sinks, cfg)
        check(o1, st1, *tri(q, layer, lens, ts, sinks, cfg), atol, f"seed {seed} {cfg}")


def test_kernel_gauss_all_exact_topk_and_max():
    q, layer, lens, ts, sinks = case(g=4, d=64, **RAGGED)
    o, _ = tri(q, layer, lens, ts, sinks, sp(1.0, 1.0, estimate="gauss"))
    assert (o - dense(q, layer, lens)).abs().max() < 1e-5
    for cfg in (
        SparseConfig("topk", budget=40, est_clusters=2, estimate="gauss"),
        safe(q, layer, lens, ts, sinks, sp(0.9, 0.6, group_rule="max", estimate="gauss")),
    ):
        o1, st1 = sparse_ref(q, layer, lens, ts, sinks, cfg)
        check(o1, st1, *tri(q, layer, lens, ts, sinks, cfg), 1e-4, f"{cfg}")


def test_config_estimate():
    from nanodp.config import ConfigError

    with pytest.raises(ConfigError, match="estimate"):
        SparseConfig(estimate="max")


@pytest.mark.gpu
@pytest.mark.parametrize("g,d", [(4, 128), (3, 64)])
def test_gpu_bf16_gauss(g, d):
    seed = torch.seed() % 2**31
    q, layer, lens, ts, sinks = case(
        g=g, d=d, B=4, Hkv=2, lens=(4000, 2500, 700, 130), tail=(3900, 2500, 600, 0), seed=seed, dtype=torch.bfloat16
    )
    for cfg in (
        sp(estimate="gauss"),
        sp(estimate="gauss", group_rule="union", whole=True),
        SparseConfig("topk", budget=300, est_clusters=8, estimate="gauss"),
    ):
        cfg = safe(q, layer, lens, ts, sinks, cfg)
        o1, st1 = sparse_ref(q, layer, lens, ts, sinks, cfg)
        check(o1, st1, *tri(q, layer, lens, ts, sinks, cfg), 2e-2, f"seed {seed} {cfg}")
