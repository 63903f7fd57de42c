"""Shared cases and checks for the Double-P tests: random clustered caches, the dense and all-centroid
oracles, p values kept away from fp32 rounding of the twin's cumulative bin sums, and the kernel runner."""

import math
from dataclasses import make_dataclass, replace

import pytest
import torch

from nanodp.config import SparseConfig
from nanodp.kernels.doublep import mass_cuts, unit_scores

KEYS = (
    "exact_tokens",
    "pseudo_tokens",
    "exact_clusters",
    "need_tokens",
    "scored_clusters",
    "steady_scored",
)
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # kernels: interpreter on CPU, real on GPU
RAGGED = dict(B=3, lens=(300, 90, 47), tail=(236, 90, 0))  # normal; empty tail; ncl = 0 (all tail)


def sp(p1=0.95, p2=0.7, **kw):
    """A doublep SparseConfig without the default floor and with the centroid estimate (unless asked)."""
    return SparseConfig(**{"attention": "doublep", "p1": p1, "p2": p2, "floor_frac": 0.0, "estimate": "centroid", **kw})


# the attributes of the real cache layer (nanodp/cache.py) that Double-P reads
Layer = make_dataclass("Layer", ["k", "v", "centroids", "vmean", "logsize", "cstart", "ncl"])


def make_case(
    B=2,
    Hkv=2,
    g=4,
    d=64,
    lens=(200, 150),
    tail=(170, 0),
    sinks=4,
    dtype=torch.float32,
    style="skewed",
    max_size=32,
    needles=2,
    dup=0,
    seed=None,
):
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
            if dup and sz[:dup] == [3] * dup:  # identical clusters (bitwise equal scores)
                qh = q[b, h * g : (h + 1) * g].mean(0)
                for c in range(dup):
                    k[b, h, S + 3 * c : S + 3 * c + 3] = 3 * qh / qh.norm() * d**0.25
                    v[b, h, S + 3 * c : S + 3 * c + 3] = v[b, h, S : S + 3]
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
            cent[b, h, i] = k[b, h, st : st + n].float().mean(0)
            vmean[b, h, i] = v[b, h, st : st + n].float().mean(0)
            logsize[b, h, i] = math.log(n)
            cstart[b, h, i] = st
            st += n
        cstart[b, h, len(sz)] = st
    for b in range(B):
        k[b, :, lens[b] :] = nan
        v[b, :, lens[b] :] = nan
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


def safe(q, layer, lens, ts, sinks, cfg, margin=3e-5):
    """cfg with p1, p2 nudged away from every cumulative bin fraction of the twin (any unit), so that the
    summation-order rounding of the kernel (1e-7) cannot move a cut."""
    if cfg.mode != "doublep":
        return cfg
    lu, R, S, _, _ = unit_scores(q, layer, lens, ts, sinks, cfg)
    ps = []
    for p in (cfg.p1, cfg.p2):
        while 0 < p < 1:
            frac = mass_cuts(lu, R, S, p)[1]
            if not ((frac - p).abs() < margin).any():
                break
            p = (p + 0.0137) % 1
        ps.append(p)
    p1, p2 = max(ps), min(ps)
    return replace(cfg, p1=p1, p2=p2)


def check(o1, st1, o2, st2, atol, msg=""):
    assert torch.isfinite(o2).all(), msg
    assert (o1.float() - o2.float()).abs().max() < atol, f"{msg} err {(o1.float() - o2.float()).abs().max()}"
    for key in KEYS:
        assert torch.equal(st1[key].cpu(), st2[key].cpu()), f"{msg} {key}: {st1[key]} vs {st2[key]}"
    assert torch.allclose(st1["est_mass"].cpu(), st2["est_mass"].cpu(), atol=1e-5), msg


def tri(q, layer, lens, ts, sinks, cfg, plan_out=None):
    """sparse_triton on DEV, results (and the work list in plan_out, if given) back on the CPU."""
    pytest.importorskip("triton")
    from nanodp.kernels.doublep_attn import sparse_triton

    to = lambda x: x.to(DEV) if torch.is_tensor(x) else x  # noqa: E731
    cls = type(layer)  # Layer, or a dataclass with more fields (tests/test_estimate.py adds kvar)
    plan = {} if plan_out is not None else None
    o, st = sparse_triton(
        to(q),
        cls(*[to(getattr(layer, f)) for f in cls.__dataclass_fields__]),
        to(lens),
        to(ts),
        sinks,
        cfg,
        plan_out=plan,
    )
    if plan_out is not None:
        plan_out.update({k: v.cpu() if torch.is_tensor(v) else v for k, v in plan.items()})
    return o.cpu(), {k: v.cpu() for k, v in st.items()}
