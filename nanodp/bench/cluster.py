"""Clustering benchmark (GPU): prefill clustering time against dense prefill, and one re-clustering event.

Shape: Llama-3.1-8B attention (32 layers, 32 query / 8 KV heads, d=128, bf16), batch 1. Keys are random
but structured (a mixture of directions with topic runs, like real keys drifting through a text), so
k-means does real work; values are Gaussian. `python -m nanodp.bench cluster [--lengths 32768 131072]`.
"""

import argparse
import time

import torch

from nanodp.cache import KVCache
from nanodp.cluster import cluster_block, kmeans
from nanodp.config import ClusterConfig
from nanodp.kernels.kmeans import assign_triton, cluster_sums_triton

from .timing import common_parser, require_cuda

N_LAYERS, HQ, HKV, D = 32, 32, 8, 128


def _fill(cache, T, seed=0):
    """Structured keys in every layer: each run of ~32 tokens picks one of 64 directions per head."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    L = cache.max_len
    for layer in cache.layers:
        dirs = torch.randn(HKV, 64, D, device="cuda", generator=g)
        topic = torch.randint(0, 64, (L // 32 + 1,), device="cuda", generator=g).repeat_interleave(32)[:L]
        k = dirs[:, topic] + 0.5 * torch.randn(HKV, L, D, device="cuda", generator=g)
        layer.k[0].copy_(k)
        layer.v[0].normal_(generator=g)
    cache.set_len(0, T)


def _timed(fn, reps, setup=None):
    """Median wall time in ms of fn() (host work included: that is what the engine waits for)."""
    ts = []
    for _ in range(reps):
        if setup is not None:
            setup()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    return sorted(ts)[len(ts) // 2]


def _dense_prefill_ms(cache, T, reps):
    """One layer's dense causal prefill at T tokens (Triton kernel if present, else SDPA) x n_layers."""
    q = torch.randn(1, HQ, T, D, device="cuda", dtype=torch.bfloat16)
    k, v = cache.layers[0].k, cache.layers[0].v
    try:
        from nanodp.kernels.prefill import prefill_triton

        qs = torch.zeros(1, dtype=torch.int32, device="cuda")
        ql = torch.full((1,), T, dtype=torch.int32, device="cuda")
        fn, name = (lambda: prefill_triton(q, k, v, qs, ql)), "prefill_triton"
        fn()
    except Exception as e:  # missing or broken kernel: fall back to SDPA, and say so
        print(f"  (prefill_triton unavailable: {type(e).__name__}; timing torch SDPA instead)")
        kk = k[:, :, :T].repeat_interleave(HQ // HKV, dim=1)
        vv = v[:, :, :T].repeat_interleave(HQ // HKV, dim=1)
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True)  # noqa: E731
        name = "torch SDPA"
        fn()
    return _timed(fn, reps) * N_LAYERS, name


def _segment_breakdown(cfg, tune=False):
    """Where one 8K segment of all layers x heads goes: kernel times (triton.testing.do_bench, ms)."""
    from triton.testing import do_bench

    N, n, k = N_LAYERS * HKV, cfg.segment_len, cfg.segment_len // cfg.cluster_size
    topic = torch.randint(0, 64, (n // 32 + 1,), device="cuda").repeat_interleave(32)[:n]
    x = (torch.randn(N, 64, D, device="cuda")[:, topic] + 0.5 * torch.randn(N, n, D, device="cuda")).bfloat16()
    c = x[:, :: n // k].contiguous()
    a = assign_triton(x, c)
    r = dict(
        problems=N,
        n=n,
        k=k,
        assign_ms=do_bench(lambda: assign_triton(x, c, out=a)),
        sums_ms=do_bench(lambda: cluster_sums_triton(x, a, k)),
        kmeans_ms=do_bench(lambda: kmeans(x, k, cfg.kmeans_iters), rep=200),
        cluster_block_ms=do_bench(lambda: cluster_block(x, x, k, cfg.kmeans_iters), rep=200),
    )
    r["assign_tflops"] = 2 * N * n * k * D / r["assign_ms"] / 1e9
    if tune:
        for bt, bk, nw in ((64, 64, 4), (128, 64, 4), (128, 64, 8), (128, 128, 8), (256, 64, 8), (64, 128, 4)):
            ms = do_bench(lambda: assign_triton(x, c, out=a, block_t=bt, block_k=bk, num_warps=nw))
            r[f"assign_ms_bt{bt}_bk{bk}_w{nw}"] = ms
    return r


def bench_cluster(args=None):
    """Print the clustering table and return {"prefill": [...], "recluster": {...}}."""
    if not torch.cuda.is_available():
        raise SystemExit("bench_cluster needs a CUDA GPU (the k-means kernels are Triton); none found.")
    lengths = list(getattr(args, "lengths", None) or [32768, 131072])
    reps = int(getattr(args, "reps", None) or 3)
    cfg = ClusterConfig()
    out = {"shape": f"{N_LAYERS} layers x {HKV} KV heads, d={D}, bf16, batch 1", "prefill": []}
    extra = cfg.recluster_every * (reps + 2)
    for T in lengths:
        cache = KVCache(N_LAYERS, 1, HKV, T + extra, D, torch.bfloat16, "cuda", cfg)
        _fill(cache, T)
        cache.cluster_pending(force=True)  # warm-up: compiles the kernels for these shapes

        def again():
            cache.reset(0)
            cache.set_len(0, T)

        cl_ms = _timed(lambda: cache.cluster_pending(force=True), reps, setup=again)
        dense_ms, name = _dense_prefill_ms(cache, T, reps)
        ncl = float(cache.layers[0].ncl[0].float().mean())
        out["prefill"].append(
            dict(T=T, cluster_ms=cl_ms, dense_ms=dense_ms, dense=name, share=cl_ms / dense_ms, clusters_per_head=ncl)
        )
        if T == lengths[0]:
            # Re-clustering: the tail holds recluster_every tokens beyond the window -> one event.
            step = lambda: cache.set_len(0, cache.lens_host[0] + cfg.recluster_every)  # noqa: E731
            step()
            cache.cluster_pending()  # warm-up (new shapes: n = 256)
            ms = _timed(lambda: cache.cluster_pending(), reps, setup=step)
            out["recluster"] = dict(T=T, tokens=cfg.recluster_every, event_ms=ms, per_layer_ms=ms / N_LAYERS)
        cache = None  # free the GPU memory before the next length
        torch.cuda.empty_cache()

    out["segment"] = seg = _segment_breakdown(cfg, tune=bool(getattr(args, "tune", False)))
    print(f"clustering benchmark: {out['shape']}, {cfg}")
    print(f"{'context':>8} {'dense prefill ms':>17} {'clustering ms':>14} {'share':>7}  {'clusters/head':>13}")
    for r in out["prefill"]:
        print(
            f"{r['T']:>8} {r['dense_ms']:>17.1f} {r['cluster_ms']:>14.1f} {r['share'] * 100:>6.1f}%"
            f"  {r['clusters_per_head']:>13.0f}   ({r['dense']} x {N_LAYERS} layers)"
        )
    rc = out.get("recluster")
    if rc:
        print(
            f"re-clustering {rc['tokens']} tokens at {rc['T']}: {rc['event_ms']:.2f} ms per event, "
            f"{rc['per_layer_ms'] * 1e3:.0f} us per layer (target < 1000 us)"
        )
    print(
        f"one segment ({seg['problems']} problems x {seg['n']} keys, k={seg['k']}): assignment "
        f"{seg['assign_ms']:.2f} ms ({seg['assign_tflops']:.0f} TFLOP/s), update sums {seg['sums_ms']:.2f} ms, "
        f"k-means {seg['kmeans_ms']:.1f} ms, k-means + reorder stats {seg['cluster_block_ms']:.1f} ms"
    )
    for key, val in seg.items():
        if key.startswith("assign_ms_"):
            print(f"  {key}: {val:.3f} ms")
    return out


def section_cluster(argv):
    """Clustering time vs dense prefill (32 layers x 8 KV heads, d=128) and one re-clustering event."""
    p = argparse.ArgumentParser(prog="python -m nanodp.bench cluster", parents=[common_parser()])
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tune", action="store_true")
    args = p.parse_args(argv)
    require_cuda("cluster")
    return args, bench_cluster(args)
