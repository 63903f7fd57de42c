"""Double-P decode: the twin against the definition, and the Triton kernels against the twin."""
import math
from dataclasses import make_dataclass

import pytest
import torch

from nanodp.kernels.doublep import group_scores, select_clusters, sparse_ref

KEYS = ("exact_tokens", "pseudo_tokens", "exact_clusters", "need_tokens", "fallback")


# the attributes of the real cache layer (nanodp/cache.py) that Double-P reads
Layer = make_dataclass("Layer", ["k", "v", "centroids", "vmean", "logsize", "cstart", "ncl"])


def make_case(B=2, Hkv=2, g=4, d=64, lens=(200, 150), tail=(170, 0), sinks=4, dtype=torch.float32,
              style="skewed", max_size=32, needles=2, dup=0, seed=None):
    """Random cache with contiguous clusters made directly: random sizes 1..max_size over
    [S, tail_start), centroid / vmean = exact member means, logsize = ln size. Slots past len / ncl
    hold NaN garbage (the kernels must never read them). style: "skewed" keys around a few directions
    the query aligns with, "flat" small random keys. `needles` tokens per head get key ~ 4*q/|q|.
    `dup` > 0 makes that many identical top clusters per head (planted ties)."""
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    L = max(lens) + 5
    lens_t, ts_t = torch.tensor(lens, dtype=torch.int32), torch.tensor(tail, dtype=torch.int32)
    q = torch.randn(B, Hkv * g, d, generator=gen)
    if style == "skewed":
        dirs = torch.randn(B, Hkv, 6, d, generator=gen)
        k = dirs[:, :, torch.randint(0, 6, (L,), generator=gen)] * 1.5 + 0.5 * torch.randn(B, Hkv, L, d, generator=gen)
        q = q * 0.5 + dirs[:, :, :1].expand(B, Hkv, g, d).reshape(B, Hkv * g, d)
    else:
        k = 0.3 * torch.randn(B, Hkv, L, d, generator=gen)
    v = torch.randn(B, Hkv, L, d, generator=gen)
    sizes_all, ncl = [], torch.zeros(B, Hkv, dtype=torch.int32)
    for b in range(B):
        S = min(sinks, tail[b])
        for h in range(Hkv):
            sz = [3] * dup if tail[b] - S > 3 * dup else []
            n = tail[b] - S - sum(sz)
            while n > 0:
                sz.append(min(n, int(torch.randint(1, max_size + 1, (1,), generator=gen))))
                n -= sz[-1]
            if dup and sz[:dup] == [3] * dup:   # identical clusters (bitwise equal scores)
                qh = q[b, h * g:(h + 1) * g].mean(0)
                for c in range(dup):
                    k[b, h, S + 3 * c:S + 3 * c + 3] = 3 * qh / qh.norm() * d ** 0.25
                    v[b, h, S + 3 * c:S + 3 * c + 3] = v[b, h, S:S + 3]
            sizes_all.append((b, h, S, sz))
            ncl[b, h] = len(sz)
    for b in range(B):
        for h in range(Hkv):
            lo = min(sinks, tail[b]) + 3 * dup
            for _ in range(needles if tail[b] > lo else 0):
                j = int(torch.randint(lo, tail[b], (1,), generator=gen))
                qh = q[b, h * g + int(torch.randint(0, g, (1,), generator=gen))]
                k[b, h, j] = 4 * qh / qh.norm() * math.sqrt(d) ** 0.5
    k, v = k.to(dtype), v.to(dtype)
    C = int(ncl.max()) + 3
    nan = float("nan")
    cent = torch.full((B, Hkv, C, d), nan)
    vmean = torch.full((B, Hkv, C, d), nan)
    logsize = torch.full((B, Hkv, C), nan)
    cstart = torch.full((B, Hkv, C + 1), -12345, dtype=torch.int32)
    for b, h, S, sz in sizes_all:
        st = S
        for i, n in enumerate(sz):
            cent[b, h, i] = k[b, h, st:st + n].float().mean(0)
            vmean[b, h, i] = v[b, h, st:st + n].float().mean(0)
            logsize[b, h, i] = math.log(n)
            cstart[b, h, i] = st
            st += n
        cstart[b, h, len(sz)] = st
    for b in range(B):
        k[b, :, lens[b]:] = nan
        v[b, :, lens[b]:] = nan
    layer = Layer(k, v, cent.to(dtype), vmean.to(dtype), logsize, cstart, ncl)
    return q.to(dtype), layer, lens_t, ts_t, sinks


def dense(q, layer, lens):
    """Plain softmax attention over every stored token."""
    B, Hq, d = q.shape
    Hkv, L = layer.k.shape[1], layer.k.shape[2]
    g = Hq // Hkv
    ok = torch.arange(L) < lens.long()[:, None, None]
    k = torch.where(ok[..., None], layer.k.float(), 0.0).repeat_interleave(g, 1)
    v = torch.where(ok[..., None], layer.v.float(), 0.0).repeat_interleave(g, 1)
    x = torch.einsum("bhd,bhld->bhl", q.float(), k) / math.sqrt(d)
    x = x.masked_fill(~ok, -math.inf)
    return torch.einsum("bhl,bhld->bhd", torch.softmax(x, -1), v)


def all_centroid(q, layer, lens, tail_start, sinks):
    """Steady tokens exact + every cluster as one pseudo-token (key C_i, value vmean_i, bias ln s_i),
    written out per head with plain loops: the p1 = 1, p2 = 0 oracle."""
    B, Hq, d = q.shape
    Hkv = layer.k.shape[1]
    g = Hq // Hkv
    o = torch.zeros(B, Hq, d)
    for b in range(B):
        ln, ts = int(lens[b]), int(tail_start[b])
        steady = list(range(min(sinks, ts))) + list(range(ts, ln))
        for h in range(Hq):
            kh, n = h // g, int(layer.ncl[b, h // g])
            keys = torch.cat([layer.k[b, kh, steady].float(), layer.centroids[b, kh, :n].float()])
            vals = torch.cat([layer.v[b, kh, steady].float(), layer.vmean[b, kh, :n].float()])
            bias = torch.cat([torch.zeros(len(steady)), layer.logsize[b, kh, :n].float()])
            w = torch.softmax(keys @ q[b, h].float() / math.sqrt(d) + bias, 0)
            o[b, h] = w @ vals
    return o


def safe_p(q, layer, *ps, margin=2e-5, group_rule="mean", estimate="centroid"):
    """Nudge each p away from every cumulative sum of the twin's ranking, so that rounding differences
    between the twin and the kernel (1e-7) cannot move a cut."""
    _, G, valid = group_scores(q, layer, group_rule=group_rule, estimate=estimate)
    cum = G.clamp_min(0).sort(-1, descending=True).values.cumsum(-1)[valid.sort(-1, descending=True).values]
    out = []
    for p in ps:
        while p < 1 and (cum - p).abs().min() < margin if cum.numel() else False:
            p = (p + 0.0137) % 1
        out.append(p)
    return out


def check(o1, st1, o2, st2, atol, msg=""):
    assert torch.isfinite(o2).all(), msg
    assert (o1.float() - o2.float()).abs().max() < atol, f"{msg} err {(o1.float() - o2.float()).abs().max()}"
    for key in KEYS:
        assert torch.equal(st1[key].cpu(), st2[key].cpu()), f"{msg} {key}: {st1[key]} vs {st2[key]}"
    assert torch.allclose(st1["est_mass"].cpu(), st2["est_mass"].cpu(), atol=1e-5), msg


DEV = "cuda" if torch.cuda.is_available() else "cpu"   # kernels: interpreter on CPU, real on GPU


def tri(q, layer, lens, ts, *args, **kw):
    """sparse_triton on DEV, results back on the CPU."""
    pytest.importorskip("triton")
    from nanodp.kernels.doublep_attn import sparse_triton
    to = lambda x: x.to(DEV) if torch.is_tensor(x) else x   # noqa: E731
    cls = type(layer)   # Layer, or a dataclass with more fields (tests/test_estimate.py adds kvar)
    o, st = sparse_triton(to(q), cls(*[to(getattr(layer, f)) for f in cls.__dataclass_fields__]),
                          to(lens), to(ts), *args, **kw)
    return o.cpu(), {k: v.cpu() for k, v in st.items()}


RAGGED = dict(B=3, lens=(300, 90, 47), tail=(236, 90, 0))   # normal; empty tail; ncl = 0 (all tail)

try:   # the select-kernel variants (kernels/doublep_select_fast.py): every kernel test runs under each
    from nanodp.kernels.doublep_select_fast import VARIANTS
    SELECT_VARIANTS = ["base", *VARIANTS]
except ImportError:   # no Triton: the kernel tests skip anyway
    SELECT_VARIANTS = ["base"]


@pytest.fixture(params=SELECT_VARIANTS)
def variant(request):
    """Run the test with sparse_triton launching this select kernel."""
    pytest.importorskip("triton")
    from nanodp.kernels import doublep_attn
    old = doublep_attn.SELECT_VARIANT
    doublep_attn.SELECT_VARIANT = request.param
    yield request.param
    doublep_attn.SELECT_VARIANT = old


# ---------------------------------------------------------------- the twin against the definition
@pytest.mark.parametrize("g,d,style", [(1, 64, "skewed"), (4, 128, "flat"), (3, 64, "skewed")])
def test_twin_all_exact_is_dense(g, d, style):
    q, layer, lens, ts, sinks = make_case(g=g, d=d, style=style, **RAGGED)
    o, st = sparse_ref(q, layer, lens, ts, sinks, 1.0, 1.0)
    assert (o - dense(q, layer, lens)).abs().max() < 1e-5
    assert torch.equal(st["exact_tokens"], lens[:, None].expand_as(st["exact_tokens"]).int())
    assert (st["pseudo_tokens"] == 0).all()


def test_twin_all_centroid():
    q, layer, lens, ts, sinks = make_case(g=3, d=64, **RAGGED)
    o, st = sparse_ref(q, layer, lens, ts, sinks, 1.0, 0.0)
    assert (o - all_centroid(q, layer, lens, ts, sinks)).abs().max() < 1e-5
    assert torch.equal(st["pseudo_tokens"], layer.ncl)


def test_group_scores_definition():
    q, layer, lens, ts, sinks = make_case(g=4, d=64, B=2, lens=(120, 60), tail=(100, 30))
    for rule in ("mean", "max"):
        _, G, _ = group_scores(q, layer, group_rule=rule)
        for b in range(2):
            for h in range(2):
                n = int(layer.ncl[b, h])
                P = torch.stack([torch.softmax(layer.centroids[b, h, :n] @ q[b, 4 * h + r] / 8
                                               + layer.logsize[b, h, :n], 0) for r in range(4)])
                want = P.mean(0) if rule == "mean" else P.amax(0) / P.amax(0).sum()
                assert torch.allclose(G[b, h, :n], want, atol=1e-6)
                assert (G[b, h, n:] == -1).all()


def brute_cut(vals, weights, target):
    """The definition, literally: walk the ranking, accumulate, stop at the first k with c_k >= target."""
    if target <= 0:
        return math.inf
    c = torch.zeros((), dtype=weights.dtype)
    for k in range(len(vals)):
        c = c + weights[k]
        if c >= target:
            return float(vals[k])
    return float(vals[-1]) if len(vals) else math.inf


@pytest.mark.parametrize("mode", ["doublep", "topk"])
def test_selection_matches_brute_force(mode):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    B, H, C = 4, 3, 40
    ncl = torch.randint(0, C + 1, (B, H), generator=gen)
    ncl[0, 0], ncl[0, 1] = 0, 1
    valid = torch.arange(C) < ncl[..., None]
    raw = torch.randint(1, 12, (B, H, C), generator=gen).float() ** 2   # few distinct values: many ties
    G = torch.where(valid, raw, 0)
    G = torch.where(valid, G / G.sum(-1, keepdim=True).clamp_min(1), -1.0)
    sizes = torch.where(valid, torch.randint(1, 33, (B, H, C), generator=gen), 0)
    for p1, p2, budget, est in [(0.95, 0.7, 50, 0), (0.5, 0.5, 1, 3), (1.0, 0.0, 0, 2), (0.3, 0.1, 10**6, 5),
                                (0.999, 0.02, 33, 1)]:
        ex, ps, _, _ = select_clusters(G, valid, sizes, p1, p2, mode, budget, est)
        for b in range(B):
            for h in range(H):
                n = int(ncl[b, h])
                vals, order = G[b, h, :n].sort(descending=True)
                if mode == "doublep":
                    tgt = lambda p: math.inf if p >= 1 else p   # noqa: E731
                    t2 = brute_cut(vals, vals, tgt(p2))
                    t1 = brute_cut(vals, vals, tgt(p1))
                else:
                    t2 = brute_cut(vals, sizes[b, h, :n][order], budget)
                    n1 = min(int((G[b, h, :n] >= t2).sum()) + est, n)
                    t1 = brute_cut(vals, torch.ones(n), n1)
                want_x = [i for i in range(n) if G[b, h, i] >= t2]
                want_p = [i for i in range(n) if G[b, h, i] >= t1 and i not in want_x]
                assert ex[b, h].nonzero().flatten().tolist() == want_x
                assert ps[b, h].nonzero().flatten().tolist() == want_p
                assert not ex[b, h, n:].any() and not ps[b, h, n:].any()


def test_twin_capacity_fallback_is_dense():
    q, layer, lens, ts, sinks = make_case(g=4, d=64, style="flat", **RAGGED)
    o, st = sparse_ref(q, layer, lens, ts, sinks, 0.95, 0.9, capacity=40)
    o_free, st_free = sparse_ref(q, layer, lens, ts, sinks, 0.95, 0.9)
    fb = st["fallback"]
    assert fb.any() and not fb.all()
    assert torch.equal(fb, st_free["need_tokens"] > 40)
    od = dense(q, layer, lens)
    head_fb = fb.repeat_interleave(4, 1)
    assert (o - od)[head_fb].abs().max() < 1e-5
    assert torch.equal(o[~head_fb], o_free[~head_fb])
    assert torch.equal(st["exact_tokens"][fb], lens[:, None].expand_as(fb)[fb].int())


# ---------------------------------------------------------------- the kernels against the twin
def run_both(q, layer, lens, ts, sinks, p1, p2, **kw):
    o1, st1 = sparse_ref(q, layer, lens, ts, sinks, p1, p2, **kw)
    o2, st2 = tri(q, layer, lens, ts, sinks, p1, p2, **kw)
    return o1, st1, o2, st2


@pytest.mark.usefixtures("variant")
def test_kernel_all_exact_is_dense_and_all_centroid():
    q, layer, lens, ts, sinks = make_case(g=4, d=64, **RAGGED)
    o, st = tri(q, layer, lens, ts, sinks, 1.0, 1.0)
    assert (o - dense(q, layer, lens)).abs().max() < 1e-5
    assert torch.equal(st["exact_tokens"], lens[:, None].expand_as(st["exact_tokens"]).int())
    o, st = tri(q, layer, lens, ts, sinks, 1.0, 0.0)
    assert (o - all_centroid(q, layer, lens, ts, sinks)).abs().max() < 1e-5
    assert torch.equal(st["pseudo_tokens"], layer.ncl)


@pytest.mark.parametrize("g,d,dtype,style", [
    (1, 64, torch.float32, "skewed"), (3, 64, torch.float16, "flat"), (4, 128, torch.float32, "flat"),
    (8, 128, torch.float16, "skewed"), (4, 64, torch.float16, "skewed"), (8, 64, torch.float32, "flat"),
    (3, 128, torch.float32, "skewed"), (1, 128, torch.float16, "flat")])
def test_kernel_matches_twin(g, d, dtype, style):
    seed = torch.seed() % 2**31
    q, layer, lens, ts, sinks = make_case(g=g, d=d, dtype=dtype, style=style, seed=seed, **RAGGED)
    atol = 1e-4 if dtype == torch.float32 else 1e-2
    pytest.importorskip("triton")
    from nanodp.kernels import doublep_attn
    fast = SELECT_VARIANTS[1 + (g * 7 + d + len(style)) % (len(SELECT_VARIANTS) - 1)] if len(SELECT_VARIANTS) > 1 else "base"
    old = doublep_attn.SELECT_VARIANT
    for var in ("base", fast):        # every case on the base select kernel and one rotating variant
        doublep_attn.SELECT_VARIANT = var
        try:
            for p1, p2 in [(0.95, 0.7), (0.6, 0.25)]:
                p1, p2 = safe_p(q, layer, p1, p2)
                check(*run_both(q, layer, lens, ts, sinks, p1, p2), atol, f"{var} seed {seed} p {p1} {p2}")
        finally:
            doublep_attn.SELECT_VARIANT = old


@pytest.mark.usefixtures("variant")
def test_kernel_planted_ties_at_the_cut():
    seed = torch.seed() % 2**31
    q, layer, lens, ts, sinks = make_case(g=4, d=64, B=2, lens=(220, 160), tail=(200, 150), dup=3,
                                          needles=0, style="flat", seed=seed)
    _, G, _ = group_scores(q, layer)
    top = G[..., :3]                                   # the three identical clusters: exact ties
    assert (top == top[..., :1]).all() and (G.argmax(-1) < 3).all()
    p2 = float((top[..., 0] * 1.5).min())              # the cut lands inside the tie block everywhere
    o1, st1, o2, st2 = run_both(q, layer, lens, ts, sinks, 0.9, p2)
    check(o1, st1, o2, st2, 1e-4, f"seed {seed}")
    assert (st1["exact_clusters"] >= 3).all()           # the whole tie block is exact


@pytest.mark.usefixtures("variant")
def test_kernel_edge_cases():
    # clusters of size 1, an empty tail, a sequence with nothing clustered, fp16
    q, layer, lens, ts, sinks = make_case(g=3, d=64, B=3, lens=(100, 64, 33), tail=(100, 40, 0),
                                          max_size=1, dtype=torch.float16)
    p1, p2 = safe_p(q, layer, 0.9, 0.5)
    check(*run_both(q, layer, lens, ts, sinks, p1, p2), 1e-2, "size-1 clusters")
    # every sequence unclustered: pure dense over the tail
    q, layer, lens, ts, sinks = make_case(g=4, d=64, B=2, lens=(70, 20), tail=(0, 0))
    o, st = tri(q, layer, lens, ts, sinks, 0.9, 0.5)
    assert (o - dense(q, layer, lens)).abs().max() < 1e-5 and (st["est_mass"] == 0).all()


@pytest.mark.parametrize("est", [0, 3])
@pytest.mark.usefixtures("variant")
def test_kernel_topk(est):
    q, layer, lens, ts, sinks = make_case(g=4, d=64, **RAGGED)
    o1, st1, o2, st2 = run_both(q, layer, lens, ts, sinks, 1.0, 1.0, mode="topk", budget=40, est_clusters=est)
    check(o1, st1, o2, st2, 1e-4, f"topk est {est}")
    assert ((st1["need_tokens"] >= 40) | (st1["exact_clusters"] == layer.ncl)).all()   # budget reached


@pytest.mark.usefixtures("variant")
def test_kernel_max_rule():
    q, layer, lens, ts, sinks = make_case(g=8, d=64, **RAGGED)
    p1, p2 = safe_p(q, layer, 0.9, 0.6, group_rule="max")
    check(*run_both(q, layer, lens, ts, sinks, p1, p2, group_rule="max"), 1e-4, "max rule")


@pytest.mark.usefixtures("variant")
def test_kernel_capacity_fallback():
    q, layer, lens, ts, sinks = make_case(g=4, d=64, style="flat", **RAGGED)
    p1, p2 = safe_p(q, layer, 0.95, 0.9)
    o1, st1, o2, st2 = run_both(q, layer, lens, ts, sinks, p1, p2, capacity=40)
    assert st2["fallback"].any() and not st2["fallback"].all()
    check(o1, st1, o2, st2, 1e-4, "fallback")
    fb = st2["fallback"].repeat_interleave(4, 1)
    assert (o2 - dense(q, layer, lens))[fb].abs().max() < 1e-5


@pytest.mark.usefixtures("variant")
def test_kernel_long_clusters_many_blocks():
    # nearly every cluster exact: more than one 64-cluster block of the compacted list, clusters longer
    # than a 32-token tile, a cluster count that is no multiple of either, and p1 = p2 (no pseudo)
    q, layer, lens, ts, sinks = make_case(g=2, d=64, B=2, Hkv=1, lens=(1900, 700), tail=(1880, 650),
                                          max_size=45, style="flat", seed=7)
    assert int(layer.ncl[0, 0]) > 64 and int(layer.ncl[0, 0]) % 64 and max(
        int(x) for x in (layer.cstart[0, 0, 1:65] - layer.cstart[0, 0, :64])) > 32
    for p1, p2 in [(0.999, 0.998), (0.8, 0.8), (0.0, 0.0)]:
        p1, p2 = safe_p(q, layer, p1, p2) if p1 > 0 else (p1, p2)
        o1, st1, o2, st2 = run_both(q, layer, lens, ts, sinks, p1, p2)
        check(o1, st1, o2, st2, 1e-4, f"p {p1} {p2}")
        if p1 > 0.99:
            assert (st1["exact_clusters"][0] > 64).all()
        if p1 == 0:
            assert (st1["exact_clusters"] == 0).all() and (st1["pseudo_tokens"] == 0).all()


def test_kernel_list1_build(monkeypatch):
    """LIST 1, the list build the launcher falls back to at C >= 65536 (no variant uses it otherwise)."""
    pytest.importorskip("triton")
    from nanodp.kernels import doublep_attn, doublep_select_fast
    monkeypatch.setitem(doublep_select_fast.VARIANTS, "bisect-l1", dict(SEARCH=0, LIST=1))
    monkeypatch.setattr(doublep_attn, "SELECT_VARIANT", "bisect-l1")
    q, layer, lens, ts, sinks = make_case(g=2, d=64, B=2, Hkv=1, lens=(1900, 700), tail=(1880, 650),
                                          max_size=45, style="flat", seed=7)
    p1, p2 = safe_p(q, layer, 0.999, 0.9)
    check(*run_both(q, layer, lens, ts, sinks, p1, p2), 1e-4, "LIST 1")


@pytest.mark.gpu
@pytest.mark.usefixtures("variant")
@pytest.mark.parametrize("g,d", [(4, 128), (3, 64), (8, 128), (1, 64)])
def test_gpu_bf16(g, d):
    seed = torch.seed() % 2**31
    q, layer, lens, ts, sinks = make_case(g=g, d=d, B=4, Hkv=2, lens=(4000, 2500, 700, 130),
                                          tail=(3900, 2500, 600, 0), seed=seed, dtype=torch.bfloat16)
    p1, p2 = safe_p(q, layer, 0.95, 0.7)
    for kw in [dict(), dict(mode="topk", budget=300, est_clusters=8), dict(group_rule="max"), dict(capacity=200),
               dict(floor=600), dict(floor_frac=0.2)]:
        if kw.get("group_rule") == "max":
            p1, p2 = safe_p(q, layer, 0.95, 0.7, group_rule="max")
        o1, st1 = sparse_ref(q, layer, lens, ts, sinks, p1, p2, **kw)
        o2, st2 = tri(q, layer, lens, ts, sinks, p1, p2, **kw)
        check(o1, st1, o2, st2, 2e-2, f"seed {seed} {kw}")
    o, _ = tri(q, layer, lens, ts, sinks, 1.0, 1.0)
    assert (o.float() - dense(q, layer, lens)).abs().max() < 2e-2


def test_floor_matches_brute_force():
    """doublep with a floor = the union of the p2 cut and the topk cut at budget = floor (both by rank)."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    B, H, C = 3, 3, 40
    ncl = torch.randint(0, C + 1, (B, H), generator=gen)
    valid = torch.arange(C) < ncl[..., None]
    raw = torch.randint(1, 12, (B, H, C), generator=gen).float() ** 2
    G = torch.where(valid, raw / torch.where(valid, raw, 0).sum(-1, keepdim=True).clamp_min(1), -1.0)
    sizes = torch.where(valid, torch.randint(1, 33, (B, H, C), generator=gen), 0)
    for p1, p2, floor in [(0.95, 0.7, 60), (0.5, 0.1, 200), (0.9, 0.9, 1), (1.0, 0.0, 10**5)]:
        ex, ps, _, _ = select_clusters(G, valid, sizes, p1, p2, "doublep", floor=floor)
        ex_p, ps_p, _, _ = select_clusters(G, valid, sizes, p1, p2, "doublep")
        ex_k, _, _, _ = select_clusters(G, valid, sizes, 0, 0, "topk", budget=floor)
        assert torch.equal(ex, ex_p | ex_k)
        assert torch.equal(ps, (ps_p | ex_p | ex_k) & ~ex)   # pseudo: what p1 keeps, minus the exact set
    # a relative floor: f = max(floor, frac * the head's clustered tokens), per head
    for p1, p2, floor, frac in [(0.95, 0.7, 0, 0.3), (0.5, 0.1, 50, 0.05), (0.9, 0.9, 0, 1.0)]:
        ex, _, _, _ = select_clusters(G, valid, sizes, p1, p2, "doublep", floor=floor, floor_frac=frac)
        ex_p, _, _, _ = select_clusters(G, valid, sizes, p1, p2, "doublep")
        for b in range(B):
            for h in range(H):
                f = max(floor, math.ceil(frac * sizes[b, h].sum().item()))
                ex_k, _, _, _ = select_clusters(G[b, h][None, None], valid[b, h][None, None],
                                                sizes[b, h][None, None], 0, 0, "topk", budget=f)
                assert torch.equal(ex[b, h], ex_p[b, h] | ex_k[0, 0])


@pytest.mark.parametrize("var", SELECT_VARIANTS)
def test_kernel_floor_matches_twin(var):
    """The floor in the select kernel (a third search, on cluster sizes) equals the twin's, ties included;
    in topk mode both ignore it."""
    pytest.importorskip("triton")
    from nanodp.kernels import doublep_attn
    seed = torch.seed() % 2**31
    q, layer, lens, ts, sinks = make_case(g=3, d=64, seed=seed, **RAGGED)
    old, doublep_attn.SELECT_VARIANT = doublep_attn.SELECT_VARIANT, var
    try:
        for p1, p2, floor in [(0.95, 0.7, 40), (0.6, 0.25, 1), (0.9, 0.5, 10**5)]:
            p1, p2 = safe_p(q, layer, p1, p2)
            check(*run_both(q, layer, lens, ts, sinks, p1, p2, floor=floor), 1e-4, f"{var} seed {seed} floor {floor}")
        for p1, p2, floor, frac in [(0.95, 0.7, 0, 0.3), (0.6, 0.25, 40, 0.05)]:    # relative floors
            p1, p2 = safe_p(q, layer, p1, p2)
            check(*run_both(q, layer, lens, ts, sinks, p1, p2, floor=floor, floor_frac=frac), 1e-4,
                  f"{var} seed {seed} floor {floor} {frac:.0%}")
        check(*run_both(q, layer, lens, ts, sinks, 0, 0, mode="topk", budget=30, floor=10**5), 1e-4,
              f"{var} seed {seed} topk")
    finally:
        doublep_attn.SELECT_VARIANT = old
