"""Clustered KV cache: layout invariants, k-means quality, Triton kernels against their twins."""

import json
import math
import os

import pytest
import torch

from nanodp.cache import KVCache, max_clusters
from nanodp.cluster import cluster_block, cluster_range, kmeans, split_segments
from nanodp.config import ClusterConfig
from nanodp.kernels.kmeans import assign_ref, assign_triton, cluster_sums_ref, cluster_sums_triton


def eq(a, b):
    """torch.equal on the CPU (the kernels run on DEV; references may be built on the CPU)."""
    return torch.equal(a.cpu(), b.cpu())


SMALL = dict(sinks=4, window=8, cluster_size=4, kmeans_iters=3, segment_len=32, recluster_every=16)
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # Triton needs CUDA, or the CPU interpreter
WEIGHTS = os.path.join(os.path.dirname(__file__), "..", "weights", "SmolLM2-135M-Instruct")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny CPU ops: one thread is as fast and immune to oversubscribed cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Truth:
    """A cache plus the original-order K/V of every slot, to check the cache against."""

    def __init__(
        self, nl=2, B=3, H=2, L=272, d=16, cfg=None, backend="torch", seed=0, device="cpu", dtype=torch.float32
    ):
        self.c = KVCache(nl, B, H, L, d, dtype, device, cfg or ClusterConfig(**SMALL), backend)
        self.K = torch.zeros(nl, B, H, L, d, dtype=dtype, device=device)
        self.V = torch.zeros_like(self.K)
        self.g = torch.Generator().manual_seed(seed)

    def write(self, b, n, keys=None):
        """Append n tokens to slot b (as the engine does: storage index = position)."""
        s = self.c.lens_host[b]
        nl, _, H, _, d = self.K.shape
        k = keys if keys is not None else torch.randn(nl, H, n, d, generator=self.g)
        self.K[:, b, :, s : s + n] = k.to(self.K.device)
        self.V[:, b, :, s : s + n] = torch.randn(nl, H, n, d, generator=self.g).to(self.K.device)
        for i, layer in enumerate(self.c.layers):
            layer.k[b, :, s : s + n] = self.K[i, b, :, s : s + n]
            layer.v[b, :, s : s + n] = self.V[i, b, :, s : s + n]
        self.c.set_len(b, s + n) if n > 1 else self.c.advance([b])


def check(t, b, tol=1e-5):
    """Every INTERNALS.md invariant for slot b, all layers and heads (checked on the CPU)."""
    c, cfg = t.c, t.c.cfg
    n, ts = c.lens_host[b], c.tail_host[b]
    assert int(c.lens[b]) == n and int(c.tail_start[b]) == ts
    S = min(cfg.sinks, ts)
    for i, layer in enumerate(c.layers):
        x = {f: val[b].cpu() for f, val in vars(layer).items()}  # this slot: [Hkv, ...]
        K, V = t.K[i, b].cpu(), t.V[i, b].cpu()
        for h in range(c.n_kv_heads):
            pos = x["pos"][h, :n].long()
            # every token stored exactly once, with its own K and V rows
            assert eq(pos.sort().values, torch.arange(n))
            assert eq(x["k"][h, :n], K[h, pos]) and eq(x["v"][h, :n], V[h, pos])
            # steady tokens are where they were written
            assert eq(pos[:S], torch.arange(S)) and eq(pos[ts:], torch.arange(ts, n))
            m = int(x["ncl"][h])
            assert m <= c.max_clusters
            if ts == 0:
                assert m == 0
                continue
            # offsets increase strictly (no empty cluster) and cover [S, tail_start)
            cs = x["cstart"][h, : m + 1].long()
            assert cs[0] == S and cs[-1] == ts and bool((cs[1:] > cs[:-1]).all())
            size = (cs[1:] - cs[:-1]).double()
            ids = torch.searchsorted(cs[1:], torch.arange(S, ts), right=True)  # cluster of each row
            for stored, table in (("k", "centroids"), ("v", "vmean")):
                mean = torch.zeros(m, c.head_dim, dtype=torch.float64)
                mean.index_add_(0, ids, x[stored][h, S:ts].double())
                torch.testing.assert_close(x[table][h, :m].double(), mean / size[:, None], rtol=tol, atol=tol)
            torch.testing.assert_close(x["logsize"][h, :m].double(), size.log())
            # kvar: per-dimension variance of the member keys about their own mean
            kd = x["k"][h, S:ts].double()
            mean = torch.zeros(m, c.head_dim, dtype=torch.float64).index_add_(0, ids, kd) / size[:, None]
            var = torch.zeros_like(mean).index_add_(0, ids, (kd - mean[ids]) ** 2) / size[:, None]
            torch.testing.assert_close(x["kvar"][h, :m].double(), var, rtol=tol, atol=tol)


def dense_attn(q, k, v):
    return torch.softmax(q @ k.T / math.sqrt(k.shape[-1]), -1) @ v


def check_attention(t, b):
    """Dense softmax attention over the reordered cache equals attention in the original order."""
    n = t.c.lens_host[b]
    q = torch.randn(3, t.c.head_dim, generator=t.g, dtype=torch.float64)
    for i, layer in enumerate(t.c.layers):
        for h in range(t.c.n_kv_heads):
            got = dense_attn(q, layer.k[b, h, :n].cpu().double(), layer.v[b, h, :n].cpu().double())
            want = dense_attn(q, t.K[i, b, h, :n].cpu().double(), t.V[i, b, h, :n].cpu().double())
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------- config
def test_config_validation():
    ClusterConfig()
    with pytest.raises(ValueError, match="cluster_size"):
        ClusterConfig(cluster_size=0)
    with pytest.raises(ValueError, match="segment_len"):
        ClusterConfig(cluster_size=32, segment_len=16)
    with pytest.raises(ValueError, match="recluster_every"):
        ClusterConfig(recluster_every=8)
    with pytest.raises(TypeError, match="window"):
        ClusterConfig(window=6.5)
    with pytest.raises(ValueError, match="kmeans_iters"):
        ClusterConfig(kmeans_iters=0)


def test_capacity_and_bytes():
    cfg = ClusterConfig()
    assert max_clusters(131072, cfg) == (131072 - 68) // 16
    c = KVCache(2, 1, 2, 1024, 64, torch.float16, "cpu", cfg)
    kv, meta = c.bytes_per_token()
    assert kv == 2 * 2 * 2 * 64 * 2
    est = KVCache.estimate_bytes_per_token(2, 2, 64, torch.float16, cfg)
    assert est[0] == kv and abs(meta - est[1]) / est[1] < 0.1
    assert split_segments(4, 90, ClusterConfig(**SMALL)) == [(4, 36), (36, 68), (68, 90)]
    assert split_segments(4, 71, ClusterConfig(**SMALL)) == [(4, 36), (36, 71)]  # 3-token piece merged
    assert split_segments(4, 7, ClusterConfig(**SMALL)) == []


# ----------------------------------------------------------------------------- growing batch, events
@pytest.mark.parametrize("backend,steps", [("torch", 150), ("triton", 60)])
def test_growing_batch_invariants(backend, steps):
    t = Truth(backend=backend, device=DEV if backend == "triton" else "cpu")
    cfg, c = t.c.cfg, t.c
    for b, n in enumerate((100, 30, 7)):
        t.write(b, n)
    ev = c.cluster_pending(force=True)
    assert [(e.slot, e.lo, e.hi) for e in ev] == [(0, 4, 92), (1, 4, 22)]  # slot 2 is too short
    for b in range(3):
        check(t, b)
    seen = set()
    for step in range(steps):
        for b in range(3):
            t.write(b, 1)
        if step == 40:  # a new chat turn in slot 1: prompt, then forced clustering
            t.write(1, 21)
            assert len(c.cluster_pending([1], force=True)) == 1
        if step == 50:  # slot 2 reused for a new sequence
            c.reset(2)
            t.write(2, 60)
            c.cluster_pending([2], force=True)
        events = c.cluster_pending()
        for e in events:
            assert e.hi - e.lo == cfg.recluster_every and e.hi == c.lens_host[e.slot] - cfg.window
            seen.add(e.slot)
            check(t, e.slot)
    assert seen == {0, 1, 2}
    assert c.cluster_pending() == []
    for b in range(3):
        check(t, b)
        check_attention(t, b)
        assert c.tail_host[b] > 0


def test_batched_layers_equal_per_layer():
    """One batched problem over layers x heads x sequences == clustering each layer on its own."""
    t = Truth()
    for b, n in enumerate((90, 61, 90)):
        t.write(b, n)
    ref = [
        {
            f: getattr(layer, f).clone()
            for f in ("k", "v", "pos", "centroids", "vmean", "logsize", "cstart", "ncl", "kvar")
        }
        for layer in t.c.layers
    ]
    t.c.cluster_pending(force=True)
    for layer, r in zip(t.c.layers, ref):
        obj = type("L", (), r)
        for b in range(3):
            assert cluster_range(obj, b, 4, t.c.lens_host[b] - 8, t.c.cfg, "torch") == t.c.tail_host[b]
        for f, val in r.items():
            torch.testing.assert_close(getattr(layer, f), val, rtol=1e-6, atol=1e-6, msg=f)


def test_empty_clusters_dropped():
    # 3 orthogonal keys repeated: evenly spaced init picks duplicates, ties go to the lowest index,
    # so only 3 of the k clusters get members; the rest must be dropped from the table.
    t = Truth(nl=1, B=2, H=2)
    basis = torch.eye(16)[:3] * 2
    keys = basis[torch.arange(100) % 3].expand(1, 2, 100, 16)
    t.write(0, 100, keys.clone())
    t.write(1, 100, torch.ones(1, 2, 100, 16))  # all identical: one cluster
    t.c.cluster_pending(force=True)
    seg = split_segments(4, 92, t.c.cfg)
    assert t.c.layers[0].ncl[0].tolist() == [3 * len(seg)] * 2
    assert t.c.layers[0].ncl[1].tolist() == [len(seg)] * 2
    check(t, 0)
    check(t, 1)
    r = cluster_block(keys[0, :, :32].contiguous(), torch.randn(2, 32, 16), 8, 3)
    assert r.nkept.tolist() == [3, 3] and r.starts[:, 3:].eq(32).all()
    assert torch.isinf(r.logsize[:, 3:]).all()
    torch.testing.assert_close(r.logsize[:, :3].exp().sum(1), torch.full((2,), 32.0))


def test_nothing_due_is_cheap():
    t = Truth()
    t.write(0, 50)
    t.c.cluster_pending(force=True)
    t.write(0, 1)
    assert t.c.due() == [] and t.c.cluster_pending() == []
    assert t.c.cluster_pending(force=True) == []  # 1 new token < cluster_size: stays in the tail


# --------------------------------------------------------------------------------------- k-means
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kmeans_recovers_planted_clusters(backend):
    g = torch.Generator().manual_seed(1)
    N, n, d, planted, k = 3, 512, 32, 6, 32
    means = torch.nn.functional.normalize(torch.randn(N, planted, d, generator=g), dim=-1) * 6
    label = torch.randint(0, planted, (N, n), generator=g)
    x = means.gather(1, label[..., None].expand(-1, -1, d)) + torch.randn(N, n, d, generator=g) * 0.5
    a = kmeans(x.to(DEV if backend == "triton" else "cpu"), k, 10, backend).cpu()
    for p in range(N):
        hist = torch.zeros(k, planted).index_put_((a[p], label[p]), torch.ones(n), accumulate=True)
        purity = hist.max(1).values.sum() / n
        assert purity > 0.95, purity


def test_kmeans_backends_agree():
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 70, 16, generator=g) + 3 * torch.randn(2, 1, 16, generator=g)).to(DEV)
    assert eq(kmeans(x, 9, 4, "triton"), kmeans(x, 9, 4, "torch"))


# --------------------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_assign_kernel_matches_twin(dtype):
    g = torch.Generator().manual_seed(3)
    N, n, k, d = 3, 77, 37, 24
    x = torch.randn(N, n, d, generator=g).to(DEV, dtype)
    c = torch.randn(N, k, d, generator=g).to(DEV, dtype)
    c[:, 6] = c[:, 5]  # duplicates: in the same chunk (block_k=16),
    c[:, 21] = c[:, 5]  # in the same lane of the next chunk,
    c[:, 30] = c[:, 5]  # in another lane of the next chunk: the lowest index wins
    out = torch.full((N, n), -1, dtype=torch.int32, device=DEV)
    a = assign_triton(x, c, out=out, block_t=32, block_k=16)
    r = assign_ref(x, c)
    assert a is out and not ((a == 6) | (a == 21) | (a == 30)).any() and (a == 5).any()
    s = torch.bmm(x.float(), c.float().transpose(1, 2))
    diff = a != r
    if dtype == torch.float32:
        assert not diff.any()
    else:  # only near-ties may differ (summation order)
        gap = (s.gather(2, r.long()[..., None]) - s.gather(2, a.long()[..., None])).abs()
        assert diff.float().mean() < 0.02 and gap.max() < 1e-2
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # arbitrary strides
    assert eq(assign_triton(xt, c, block_t=64, block_k=32), a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cluster_sums_kernel_matches_twin(dtype):
    g = torch.Generator().manual_seed(4)
    N, n, k, d = 3, 77, 11, 24
    x = torch.randn(N, n, d, generator=g).to(DEV, dtype)
    a = torch.randint(0, k - 2, (N, n), generator=g, dtype=torch.int32).to(DEV)  # clusters k-2, k-1 stay empty
    s = cluster_sums_triton(x, a, k, block_t=32)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, cluster_sums_ref(x, a, k), rtol=1e-5, atol=1e-5)
    assert (s[:, k - 2 :] == 0).all()


# ------------------------------------------------------------------------------------- real keys
@pytest.mark.skipif(
    not os.path.isfile(os.path.join(WEIGHTS, "model.safetensors")), reason="weights/SmolLM2-135M-Instruct not converted"
)
def test_real_keys_layer0():
    """Post-RoPE layer-0 keys of the default model (random token ids): invariants and attention."""
    from safetensors import safe_open

    cfgj = json.load(open(os.path.join(WEIGHTS, "config.json")))
    H, d = cfgj["num_key_value_heads"], cfgj["hidden_size"] // cfgj["num_attention_heads"]
    with safe_open(os.path.join(WEIGHTS, "model.safetensors"), "pt") as f:
        emb = f.get_tensor("model.embed_tokens.weight").float()
        ln = f.get_tensor("model.layers.0.input_layernorm.weight").float()
        wk = f.get_tensor("model.layers.0.self_attn.k_proj.weight").float()
    T = 400
    ids = torch.randint(0, emb.shape[0], (T,), generator=torch.Generator().manual_seed(5))
    h = emb[ids]
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + cfgj.get("rms_norm_eps", 1e-5)) * ln
    k = (h @ wk.T).view(T, H, d).transpose(0, 1)  # [H, T, d]
    inv = 1.0 / cfgj.get("rope_theta", 10000.0) ** (torch.arange(0, d, 2).float() / d)
    ang = torch.arange(T).float()[:, None] * inv
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    k = k * cos + torch.cat([-k[..., d // 2 :], k[..., : d // 2]], -1) * sin
    t = Truth(nl=1, B=1, H=H, L=512, d=d, cfg=ClusterConfig(segment_len=256, recluster_every=64))
    t.write(0, T, k[None])
    assert t.c.cluster_pending(force=True)
    check(t, 0)
    check_attention(t, 0)


# ------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_gpu_bf16_realistic_sizes():
    """bf16 on the GPU: kernels at segment scale, and the cache flow with the default config."""
    g = torch.Generator(device="cuda").manual_seed(6)
    N, n, k, d = 8, 8192 + 37, 512 + 5, 128
    x = torch.randn(N, n, d, device="cuda", generator=g).bfloat16()
    c = torch.randn(N, k, d, device="cuda", generator=g).bfloat16()
    c[:, 300] = c[:, 7]
    a, r = assign_triton(x, c), assign_ref(x, c)
    s = torch.bmm(x.float(), c.float().transpose(1, 2))
    gap = (s.gather(2, r.long()[..., None]) - s.gather(2, a.long()[..., None])).abs()
    assert (a != r).float().mean() < 1e-3 and gap.max() < 1e-3 and not (a == 300).any()
    aa = torch.randint(0, k, (N, n), device="cuda", generator=g, dtype=torch.int32)
    torch.testing.assert_close(cluster_sums_triton(x, aa, k), cluster_sums_ref(x, aa, k), rtol=1e-4, atol=1e-4)
    t = Truth(nl=2, B=2, H=2, L=20000, d=d, cfg=ClusterConfig(), backend="auto", device="cuda", dtype=torch.bfloat16)
    t.write(0, 17000)
    t.write(1, 300)
    assert len(t.c.cluster_pending(force=True)) == 2
    for _ in range(2):
        t.write(0, 256)
        t.write(1, 256)
        assert len(t.c.cluster_pending()) == 2
    for b in range(2):
        check(t, b, tol=2e-2)
        check_attention(t, b)
