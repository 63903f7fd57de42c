"""Double-P decode: the Triton kernels (kernels/doublep_attn.py, doublep_select.py) against the twin, on fresh
random inputs: every group rule, whole, floors, topk, ties, ragged batches, GQA 1/3/4/8, d 64/128."""

import pytest
import torch

from nanodp.config import SparseConfig
from nanodp.kernels.doublep import sparse_ref
from tests.doublep_cases import RAGGED, all_centroid, check, dense, make_case, safe, sp, tri

RULES = [
    dict(group_rule="mean"),
    dict(group_rule="max"),
    dict(group_rule="union"),
    dict(group_rule="mean", whole=True),
    dict(group_rule="union", whole=True),
]
rid = lambda r: "-".join(map(str, r.values()))  # noqa: E731


def both(q, layer, lens, ts, sinks, cfg, atol=1e-4, msg=""):
    cfg = safe(q, layer, lens, ts, sinks, cfg)
    o1, st1 = sparse_ref(q, layer, lens, ts, sinks, cfg)
    o2, st2 = tri(q, layer, lens, ts, sinks, cfg)
    check(o1, st1, o2, st2, atol, f"{msg} {cfg}")
    return st1


@pytest.mark.parametrize("rule", RULES, ids=rid)
def test_all_exact_is_dense_and_all_pseudo_is_all_centroid(rule):
    q, layer, lens, ts, sinks = make_case(g=4, d=64, **RAGGED)
    o, st = tri(q, layer, lens, ts, sinks, sp(1.0, 1.0, **rule))
    assert (o - dense(q, layer, lens)).abs().max() < 1e-5
    assert torch.equal(st["exact_tokens"], lens[:, None].expand_as(st["exact_tokens"]).int())
    o, st = tri(q, layer, lens, ts, sinks, sp(1.0, 0.0, **rule))
    assert (o - all_centroid(q, layer, lens, ts, sinks)).abs().max() < 1e-5
    assert torch.equal(st["pseudo_tokens"], layer.ncl)


@pytest.mark.parametrize(
    "g,d,dtype,style",
    [
        (1, 64, torch.float32, "skewed"),
        (3, 64, torch.float16, "flat"),
        (4, 128, torch.float32, "flat"),
        (8, 128, torch.float16, "skewed"),
        (4, 64, torch.float16, "skewed"),
        (3, 128, torch.float32, "skewed"),
    ],
)
@pytest.mark.parametrize("rule", RULES, ids=rid)
def test_kernel_matches_twin(g, d, dtype, style, rule):
    seed = torch.seed() % 2**31
    q, layer, lens, ts, sinks = make_case(g=g, d=d, dtype=dtype, style=style, seed=seed, **RAGGED)
    for p1, p2 in [(0.95, 0.7), (0.6, 0.25)]:
        both(q, layer, lens, ts, sinks, sp(p1, p2, **rule), 1e-4 if dtype == torch.float32 else 1e-2, f"seed {seed}")


@pytest.mark.parametrize("rule", RULES, ids=rid)
def test_kernel_planted_ties_and_work_list(rule):
    """Identical top clusters (bitwise equal scores) straddling the cut; the kernel's classes equal the twin's masks."""
    from nanodp.kernels.doublep import select_ref

    seed = torch.seed() % 2**31
    q, layer, lens, ts, sinks = make_case(
        g=4, d=64, B=2, lens=(220, 160), tail=(200, 150), dup=3, needles=0, style="flat", seed=seed
    )
    for p2 in (0.05, 0.3):
        cfg = safe(q, layer, lens, ts, sinks, sp(0.9, p2, **rule))
        both(q, layer, lens, ts, sinks, cfg, 1e-4, f"seed {seed}")
        plan = {}
        tri(q, layer, lens, ts, sinks, cfg, plan_out=plan)
        s = select_ref(q, layer, lens, ts, sinks, cfg)
        cls = plan["cls"].view(2, 2, -1)[..., : s.exact.shape[-1]].long()
        valid = torch.arange(s.exact.shape[-1]) < layer.ncl[..., None]
        assert torch.equal(torch.where(valid, cls, 0), 2 * s.exact.long() + s.pseudo.long()), seed


def test_kernel_edge_cases():
    # clusters of size 1, an empty tail, a sequence with nothing clustered, fp16
    q, layer, lens, ts, sinks = make_case(
        g=3, d=64, B=3, lens=(100, 64, 33), tail=(100, 40, 0), max_size=1, dtype=torch.float16
    )
    for rule in (dict(), dict(group_rule="union", whole=True)):
        both(q, layer, lens, ts, sinks, sp(0.9, 0.5, **rule), 1e-2, "size-1 clusters")
    # every sequence unclustered: pure dense over the tail
    q, layer, lens, ts, sinks = make_case(g=4, d=64, B=2, lens=(70, 20), tail=(0, 0))
    o, st = tri(q, layer, lens, ts, sinks, sp(0.9, 0.5))
    assert (o - dense(q, layer, lens)).abs().max() < 1e-5 and (st["est_mass"] == 0).all()


@pytest.mark.parametrize("rule", ["mean", "max", "union"])
def test_kernel_topk_and_floors(rule):
    seed = torch.seed() % 2**31
    q, layer, lens, ts, sinks = make_case(g=3, d=64, seed=seed, **RAGGED)
    for est in (0, 3):
        st = both(
            q,
            layer,
            lens,
            ts,
            sinks,
            SparseConfig("topk", estimate="centroid", group_rule=rule, budget=40, est_clusters=est),
            1e-4,
            f"seed {seed} topk",
        )
        assert ((st["need_tokens"] >= 40) | (st["exact_clusters"] == layer.ncl)).all()  # budget reached
    for floor, frac in [(40, 0.0), (1, 0.0), (10**5, 0.0), (0, 0.3), (40, 0.05)]:
        for whole in (False, True) if rule != "max" else (False,):
            both(
                q,
                layer,
                lens,
                ts,
                sinks,
                sp(0.9, 0.5, group_rule=rule, whole=whole, floor=floor, floor_frac=frac),
                1e-4,
                f"seed {seed} floor {floor} {frac}",
            )


@pytest.mark.parametrize("rule", [dict(), dict(group_rule="union", whole=True)], ids=rid)
def test_kernel_many_blocks(rule):
    """More clusters than one select block (256), clusters longer than an idx tile (32), counts that are no
    multiple of either; p1 = p2 (no pseudo) and p = 0."""
    q, layer, lens, ts, sinks = make_case(
        g=2, d=64, B=2, Hkv=1, lens=(3000, 700), tail=(2980, 650), max_size=40, style="flat", seed=7, needles=0
    )
    q2, layer2, lens2, ts2, _ = make_case(g=2, d=64, B=1, Hkv=1, lens=(2100,), tail=(2090,), max_size=6, style="flat")
    assert int(layer2.ncl[0, 0]) > 300 and int(layer2.ncl[0, 0]) % 256
    for p1, p2 in [(0.999, 0.99), (0.8, 0.8), (0.0, 0.0)]:
        st = both(q, layer, lens, ts, sinks, sp(p1, p2, **rule), 1e-4, f"p {p1} {p2}")
        if p1 == 0 and not rule:
            assert (st["exact_clusters"] == 0).all() and (st["pseudo_tokens"] == 0).all()
        both(q2, layer2, lens2, ts2, sinks, sp(p1, p2, **rule), 1e-4, f"many clusters p {p1} {p2}")


@pytest.mark.parametrize("group", [1, 4, 64])
def test_kernel_cluster_groups(group, monkeypatch):
    """Each split takes groups of `group` consecutive clusters (TILES; 64 is more than a block of cb: one block
    of cb consecutive clusters per split); every grouping equals the twin."""
    from nanodp.kernels import doublep_attn

    monkeypatch.setitem(doublep_attn.TILES, "group", group)
    seed = torch.seed() % 2**31
    q, layer, lens, ts, sinks = make_case(g=3, d=64, style="skewed", seed=seed, **RAGGED)
    for rule in (dict(), dict(group_rule="union", whole=True)):
        both(q, layer, lens, ts, sinks, sp(0.9, 0.6, **rule), 1e-4, f"seed {seed} group {group}")
    # several rounds of CB clusters per split (the interpreter's 3 splits, 16 clusters a round)
    q, layer, lens, ts, _ = make_case(g=2, d=64, B=1, Hkv=1, lens=(2100,), tail=(2090,), max_size=6, seed=seed)
    assert int(layer.ncl[0, 0]) > 3 * 16 * 4
    both(q, layer, lens, ts, sinks, sp(0.9, 0.6), 1e-4, f"many clusters, seed {seed} group {group}")


@pytest.mark.gpu
@pytest.mark.parametrize("g,d", [(4, 128), (3, 64), (8, 128), (1, 64)])
def test_gpu_bf16(g, d):
    seed = torch.seed() % 2**31
    q, layer, lens, ts, sinks = make_case(
        g=g, d=d, B=4, Hkv=2, lens=(4000, 2500, 700, 130), tail=(3900, 2500, 600, 0), seed=seed, dtype=torch.bfloat16
    )
    for cfg in [
        sp(),
        SparseConfig("topk", estimate="centroid", budget=300, est_clusters=8),
        sp(group_rule="max"),
        sp(floor=600),
        sp(floor_frac=0.2),
        sp(group_rule="union"),
        sp(whole=True),
        sp(group_rule="union", whole=True, floor_frac=0.2),
    ]:
        both(q, layer, lens, ts, sinks, cfg, 2e-2, f"seed {seed}")
    # a second launch of a configuration sizes its splits from the first one's occupancy (wave_fit)
    both(q, layer, lens, ts, sinks, sp(), 2e-2, f"seed {seed}, splits fitted to the waves")
    o, _ = tri(q, layer, lens, ts, sinks, sp(1.0, 1.0))
    assert (o.float() - dense(q, layer, lens)).abs().max() < 2e-2


def test_kernel_empty_cluster_is_never_kept():
    """A cluster of size 0 inside ncl (ln s = -inf): the twin gives it the never-kept bin, so must the kernel, in
    every rule, at p = 1, with floors and topk (the engine's clustering moves empty clusters past ncl; direct
    callers need not)."""
    import math

    q, layer, lens, ts, sinks = make_case(g=4, d=64, B=1, Hkv=1, lens=(200,), tail=(170,), needles=0)
    cs = layer.cstart.clone()
    cs[0, 0, 5] = cs[0, 0, 6]  # cluster 4 takes cluster 5's tokens; 5 is empty
    layer.cstart = cs
    a, b = int(cs[0, 0, 4]), int(cs[0, 0, 5])
    layer.centroids[0, 0, 4], layer.vmean[0, 0, 4] = layer.k[0, 0, a:b].mean(0), layer.v[0, 0, a:b].mean(0)
    layer.logsize[0, 0, 4], layer.logsize[0, 0, 5] = math.log(b - a), -math.inf
    layer.centroids[0, 0, 5], layer.vmean[0, 0, 5] = 0.0, 0.0
    cfgs = [sp(p1, p2, **rule) for rule in RULES for p1, p2 in [(1.0, 1.0), (1.0, 0.0), (0.9, 0.5)]]
    cfgs += [sp(0.9, 0.5, floor_frac=0.5), SparseConfig("topk", estimate="centroid", budget=60, est_clusters=3)]
    for cfg in cfgs:
        both(q, layer, lens, ts, sinks, cfg, 1e-4, "empty cluster")
        plan = {}
        tri(q, layer, lens, ts, sinks, safe(q, layer, lens, ts, sinks, cfg), plan_out=plan)
        assert int(plan["cls"][0, 5]) == 0, cfg


def test_zero_buffers_outlive_growth():
    """A larger need allocates a new zero buffer but keeps the old one (a CUDA graph captured before still uses
    it): never freed, still zero."""
    import weakref

    from nanodp.kernels.common import zero_buffer

    small = zero_buffer("cpu", "test-growth", 10)
    ref = weakref.ref(small)
    big = zero_buffer("cpu", "test-growth", 5000)
    del small
    assert big.numel() >= 5000 and ref() is not None and (ref() == 0).all()
    assert zero_buffer("cpu", "test-growth", 100) is big


def test_occupancy_and_wave_fit():
    """The rules that size the score and attention grids (kernels/common.py), on figures Nsight Compute gave for
    the attention kernel on the H200 (141 registers, 22.5 KB: 3 blocks an SM; 128 registers: 4)."""
    from nanodp.kernels.common import resident_blocks, wave_fit

    assert resident_blocks(141, 23070, 4) == 3 and resident_blocks(128, 23070, 4) == 4
    assert resident_blocks(227, 92274, 4) == 2 and resident_blocks(179, 8390, 8) == 1
    assert resident_blocks(16, 200_000, 4) == 1 and resident_blocks(8, 0, 1) == 64  # shared memory, warps
    # 8 heads on 396 slots: 47 splits (one wave, 376 programs) beat 64 (two waves); n never exceeds the cap
    assert wave_fit(8, 396, 64) == 47 and wave_fit(8, 396, 16) == 16 and wave_fit(256, 264, 64) == 1
    for units, slots in [(1, 1), (3, 528), (24, 528), (64, 396), (96, 528), (700, 132)]:
        n = wave_fit(units, slots, 64)
        waves = lambda k: -(-units * k // slots) / k  # noqa: E731
        assert 1 <= n <= 64 and waves(n) <= 1.05 * min(waves(k) for k in range(1, 65))
        assert all(waves(k) > 1.05 * min(waves(j) for j in range(1, 65)) for k in range(1, n))
