"""Double-P decode: the torch twin (kernels/doublep.py) against the definition in its docstring."""

import math

import pytest
import torch

from nanodp.config import ConfigError, SparseConfig
from nanodp.kernels.doublep import BINS_PER_NAT, NBINS, select_ref, sparse_ref, stage1_logits, steady_mask, unit_scores
from tests.doublep_cases import RAGGED, all_centroid, dense, make_case, sp

RULES = [
    dict(group_rule="mean"),
    dict(group_rule="max"),
    dict(group_rule="union"),
    dict(group_rule="mean", whole=True),
    dict(group_rule="union", whole=True),
]


@pytest.mark.parametrize("g,d,style", [(1, 64, "skewed"), (4, 128, "flat"), (3, 64, "skewed")])
@pytest.mark.parametrize("rule", RULES, ids=lambda r: "-".join(map(str, r.values())))
def test_all_exact_is_dense_and_all_pseudo_is_all_centroid(g, d, style, rule):
    q, layer, lens, ts, sinks = make_case(g=g, d=d, style=style, **RAGGED)
    o, st = sparse_ref(q, layer, lens, ts, sinks, sp(1.0, 1.0, **rule))
    assert (o - dense(q, layer, lens)).abs().max() < 1e-5
    assert torch.equal(st["exact_tokens"], lens[:, None].expand_as(st["exact_tokens"]).int())
    assert (st["pseudo_tokens"] == 0).all()
    o, st = sparse_ref(q, layer, lens, ts, sinks, sp(1.0, 0.0, **rule))
    assert (o - all_centroid(q, layer, lens, ts, sinks)).abs().max() < 1e-5
    assert torch.equal(st["pseudo_tokens"], layer.ncl)


def brute(q, layer, lens, ts, sinks, h, b, kvh, p, whole):
    """One query head's cut, literally: P over clusters (+ steady tokens), bins, counts x midpoints, walk."""
    d = q.shape[-1]
    n = int(layer.ncl[b, kvh])
    if n == 0:
        return set()
    z = layer.centroids[b, kvh, :n].float() @ q[b, h].float() / math.sqrt(d) + layer.logsize[b, kvh, :n]
    mass = [float(x) for x in torch.exp(z.double())]
    steady = 0.0
    if whole:
        E = steady_mask(lens, ts, sinks, layer.k.shape[2])[b, 0].nonzero().flatten()
        steady = float(torch.exp((layer.k[b, kvh, E].double() @ q[b, h].double()) / math.sqrt(d)).sum())
    tot = sum(mass) + steady
    P = [m / tot for m in mass]
    R = math.log(max(P))
    bins = [min(NBINS - 1, max(0, math.floor((R - math.log(x)) * BINS_PER_NAT))) for x in P]
    w = [math.exp(R - (k + 0.5) / BINS_PER_NAT) for k in range(NBINS)]
    cnt = [bins.count(k) for k in range(NBINS)]
    S, T = steady / tot, sum(c * x for c, x in zip(cnt, w))
    if p >= 1:
        return set(range(n))
    if S >= p * (S + T):
        return set()
    acc = S
    for k in range(NBINS):
        acc += cnt[k] * w[k]
        if acc >= p * (S + T):
            break
    return {i for i in range(n) if bins[i] <= k}


@pytest.mark.parametrize("whole", [False, True])
def test_union_is_the_union_of_each_heads_own_cut(whole):
    q, layer, lens, ts, sinks = make_case(g=3, d=64, style="flat", **RAGGED)
    for p1, p2 in [(0.9, 0.6), (0.5, 0.3)]:
        s = select_ref(q, layer, lens, ts, sinks, sp(p1, p2, group_rule="union", whole=whole))
        for b in range(3):
            for kvh in range(2):
                own2 = [brute(q, layer, lens, ts, sinks, 3 * kvh + r, b, kvh, p2, whole) for r in range(3)]
                own1 = [brute(q, layer, lens, ts, sinks, 3 * kvh + r, b, kvh, p1, whole) for r in range(3)]
                for r in range(3):
                    assert set(s.head_exact[b, kvh, r].nonzero().flatten().tolist()) == own2[r]
                X = set().union(*own2)
                assert set(s.exact[b, kvh].nonzero().flatten().tolist()) == X
                assert set(s.pseudo[b, kvh].nonzero().flatten().tolist()) == set().union(*own1) - X


def test_union_covers_mean_heads():
    """Every head's own cut lies in the union; the group mean's exact set leaves some head under p2."""
    q, layer, lens, ts, sinks = make_case(g=4, d=64, **RAGGED)
    su = select_ref(q, layer, lens, ts, sinks, sp(0.95, 0.7, group_rule="union"))
    assert (su.head_exact <= su.exact[:, :, None]).all()
    _, _, _, lP, _ = unit_scores(q, layer, lens, ts, sinks, sp(group_rule="union"))
    kept = (lP.exp() * su.exact[:, :, None]).sum(-1)  # each head's P mass read exactly
    assert (kept[layer.ncl > 0] >= 0.7 - 1e-6).all()


def test_whole_cut_with_a_head_on_its_sinks_takes_no_clusters():
    q, layer, lens, ts, sinks = make_case(g=2, d=64, B=2, lens=(200, 150), tail=(190, 140), style="flat", needles=0)
    # head 0 of KV head 0, sequence 0 looks at its sinks: keys along q there
    qh = q[0, 0].float()
    layer.k[0, 0, :sinks] = (16 * qh / qh.norm()).to(layer.k.dtype)  # logits ~2|q|: far above the rest
    for rule in ("mean", "union"):
        cfg = sp(0.9, 0.7, group_rule=rule, whole=True)
        lu, R, S, lP, e = unit_scores(q, layer, lens, ts, sinks, cfg)
        assert e[0, 0, 0] > 0.95
        s = select_ref(q, layer, lens, ts, sinks, cfg)
        if rule == "union":
            assert not s.head_exact[0, 0, 0].any() and s.head_exact[0, 0, 1].any()
        o, st = sparse_ref(q, layer, lens, ts, sinks, cfg)
        assert st["steady_scored"][0, 0] == sinks + 10 and st["est_mass"][0, 0] >= 0.85
    # without whole the same head takes clusters (its cluster distribution is cut on its own)
    s = select_ref(q, layer, lens, ts, sinks, sp(0.9, 0.7, group_rule="union"))
    assert s.head_exact[0, 0, 0].any()


def test_bins_definition_and_ties():
    """Bins are 1/64 nat of the unit's log-score below R; equal scores share a bin, so a cut never splits them."""
    q, layer, lens, ts, sinks = make_case(
        g=4, d=64, B=2, lens=(220, 160), tail=(200, 150), dup=3, needles=0, style="flat"
    )
    cfg = sp(0.9, 0.5)
    lu, R, S, _, _ = unit_scores(q, layer, lens, ts, sinks, cfg)
    zc, z, valid = stage1_logits(q, layer)
    G = torch.softmax(z, -1).mean(2)
    assert torch.allclose(lu[:, :, 0][valid].exp(), G[valid], atol=1e-6)
    assert (R[:, :, 0] >= lu[:, :, 0].amax(-1) - 1e-6).all()
    assert (R[:, :, 0] <= lu[:, :, 0].amax(-1) + math.log(4) + 1e-6).all()
    for p2 in (0.05, 0.2, 0.4):
        s = select_ref(q, layer, lens, ts, sinks, sp(0.9, p2))
        top = s.exact[..., :3]  # the planted identical clusters
        assert (top.all(-1) | ~top.any(-1)).all()


def test_floor_is_the_union_with_the_token_cut():
    q, layer, lens, ts, sinks = make_case(g=3, d=64, **RAGGED)
    cst = layer.cstart.long()
    valid = torch.arange(layer.ncl.max() + 3) < layer.ncl[..., None]
    sizes = torch.where(valid, cst[..., 1:] - cst[..., :-1], 0)
    for rule in ("mean", "union"):
        for floor, frac in [(40, 0.0), (0, 0.3), (10**5, 0.0), (1, 0.0)]:
            s = select_ref(q, layer, lens, ts, sinks, sp(0.9, 0.5, group_rule=rule, floor=floor, floor_frac=frac))
            s0 = select_ref(q, layer, lens, ts, sinks, sp(0.9, 0.5, group_rule=rule))
            assert (s0.exact <= s.exact).all() and ((s.exact | s.pseudo) >= (s0.exact | s0.pseudo)).all()
            f = (sizes.sum(-1).float() * frac).clamp_min(floor)
            for b in range(3):
                for h in range(2):
                    cfg = SparseConfig("topk", estimate="centroid", budget=int(math.ceil(float(f[b, h]))))
                    want = select_ref(q, layer, lens, ts, sinks, cfg).exact[b, h] | s0.exact[b, h]
                    assert torch.equal(s.exact[b, h], want)
                    if s.exact[b, h].any():
                        assert (sizes[b, h] * s.exact[b, h]).sum() >= min(f[b, h], sizes[b, h].sum())


def test_topk_budget_and_zone():
    q, layer, lens, ts, sinks = make_case(g=4, d=64, **RAGGED)
    for est in (0, 3):
        s = select_ref(
            q, layer, lens, ts, sinks, SparseConfig("topk", estimate="centroid", budget=40, est_clusters=est)
        )
        assert ((s.need >= 40) | (s.exact.sum(-1) == layer.ncl)).all()
        n = s.exact.sum(-1)
        assert ((s.pseudo.sum(-1) >= est) | (n + s.pseudo.sum(-1) == layer.ncl)).all()


def test_config_validation():
    for bad in (
        dict(group_rule="sum"),
        dict(whole=True, group_rule="max"),
        dict(p1=0.5, p2=0.7),
        dict(estimate="max"),
        dict(attention="sparse"),
    ):
        with pytest.raises(ConfigError):
            SparseConfig(**bad)
    assert SparseConfig("topk").mode == "topk" and SparseConfig("doublep").mode == "doublep"
