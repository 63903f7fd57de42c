"""Kernel-level benchmark of the Double-P decode step against dense decode (GPU only).

    python -m nanodp.bench sparse [--batches 1 8 32] [--contexts 32768 131072] [--shapes llama8b smollm]

One attention step = scoring + cuts + attention + combine (all of `sparse_triton`), timed as a CUDA
graph replay between CUDA events, L2 flushed before every sample, median of `--reps`. Dense baseline:
`decode_triton` (nanodp.kernels.decode) when importable, else torch SDPA; SDPA is timed too.

Synthetic inputs (made so that about 1-3% of tokens are kept exactly, and reported per cell):
  clusters of 16 consecutive tokens around random centroids mu_i ~ N(0, I); keys = mu_i + 0.3 N(0, I);
  per (sequence, KV head) a random 2.5% of the clusters share a "topic" direction w (mu_i += 6 w,
  |w| = 1) and every query of the group is sqrt(d) w + 0.3 N(0, I), so those clusters get logits about
  6 above the rest and hold ~90% of the attention; values ~ N(0, I). 4 sinks, a 64-token tail,
  centroid / vmean = exact member means, logsize = ln 16. Real attention is less regular: use the
  model-level evaluation (nanodp.eval) for what Double-P keeps on real text.
"""

import argparse
import math
import sys
from types import SimpleNamespace

import torch

from .. import flags
from .timing import common_parser, require_cuda, time_us

SHAPES = {"llama8b": (32, 8, 128), "smollm": (9, 3, 64)}  # (query heads, KV heads, head dim)
SINKS, WINDOW, CSIZE = 4, 64, 16


def make_synthetic(B, Hq, Hkv, d, ctx, device="cuda", dtype=torch.bfloat16, rel_frac=0.025, boost=6.0, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    ncl = (ctx - SINKS - WINDOW) // CSIZE
    ts = SINKS + CSIZE * ncl
    g = Hq // Hkv
    k = torch.empty(B, Hkv, ctx, d, device=device, dtype=dtype)
    v = torch.empty_like(k)
    cent = torch.empty(B, Hkv, ncl, d, device=device, dtype=dtype)
    vmean = torch.empty_like(cent)
    kvar = torch.empty_like(cent)
    q = torch.empty(B, Hq, d, device=device, dtype=dtype)
    for b in range(B):  # one sequence at a time keeps fp32 temporaries small
        w = torch.randn(Hkv, 1, d, device=device, generator=gen)
        w = w / w.norm(dim=-1, keepdim=True)
        mu = torch.randn(Hkv, ncl, d, device=device, generator=gen)
        rel = torch.rand(Hkv, ncl, 1, device=device, generator=gen) < rel_frac
        mu = mu + boost * rel * w
        kc = mu[:, :, None, :] + 0.3 * torch.randn(Hkv, ncl, CSIZE, d, device=device, generator=gen)
        vc = torch.randn(Hkv, ncl, CSIZE, d, device=device, generator=gen)
        k[b, :, SINKS:ts] = kc.reshape(Hkv, -1, d).to(dtype)
        v[b, :, SINKS:ts] = vc.reshape(Hkv, -1, d).to(dtype)
        for lo, hi in ((0, SINKS), (ts, ctx)):
            k[b, :, lo:hi] = torch.randn(Hkv, hi - lo, d, device=device, generator=gen).to(dtype)
            v[b, :, lo:hi] = torch.randn(Hkv, hi - lo, d, device=device, generator=gen).to(dtype)
        cent[b] = k[b, :, SINKS:ts].float().view(Hkv, ncl, CSIZE, d).mean(2).to(dtype)
        vmean[b] = v[b, :, SINKS:ts].float().view(Hkv, ncl, CSIZE, d).mean(2).to(dtype)
        kvar[b] = k[b, :, SINKS:ts].float().view(Hkv, ncl, CSIZE, d).var(2, unbiased=False).to(dtype)
        qq = math.sqrt(d) * w.expand(Hkv, g, d) + 0.3 * torch.randn(Hkv, g, d, device=device, generator=gen)
        q[b] = qq.reshape(Hq, d).to(dtype)
    layer = SimpleNamespace(
        k=k,
        v=v,
        centroids=cent,
        vmean=vmean,
        kvar=kvar,
        logsize=torch.full((B, Hkv, ncl), math.log(CSIZE), device=device),
        cstart=(SINKS + CSIZE * torch.arange(ncl + 1, device=device, dtype=torch.int32))
        .expand(B, Hkv, ncl + 1)
        .contiguous(),
        ncl=torch.full((B, Hkv), ncl, device=device, dtype=torch.int32),
    )
    lens = torch.full((B,), ctx, device=device, dtype=torch.int32)
    tail = torch.full((B,), ts, device=device, dtype=torch.int32)
    return q, layer, lens, tail


def _dense_fns(q, layer, lens, ctx):
    import torch.nn.functional as F

    fns = {"sdpa": lambda: F.scaled_dot_product_attention(q[:, :, None], layer.k, layer.v, enable_gqa=True)[:, :, 0]}
    try:
        from nanodp.kernels.decode import decode_triton

        decode_triton(q, layer.k, layer.v, lens, max_len=ctx)
        fns["decode_triton"] = lambda: decode_triton(q, layer.k, layer.v, lens, max_len=ctx)
    except Exception as e:  # missing (being written) or broken: SDPA is the baseline then
        print(f"  decode_triton unavailable ({type(e).__name__}: {e}); dense baseline = SDPA", file=sys.stderr)
    return fns


def kernel_breakdown(fn, iters=20):
    """Mean device microseconds per call of each kernel `fn` launches (torch profiler, eager)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t:
            out[e.key] = t / iters
    return out


def bench_sparse(args=None):
    a = lambda name, default: getattr(args, name, None) or default  # noqa: E731
    if not torch.cuda.is_available():
        print("bench_sparse needs a CUDA GPU (the Triton kernels run on the GPU); skipped.", file=sys.stderr)
        return {"skipped": "needs CUDA"}
    from nanodp.kernels.doublep import STAT_KEYS
    from nanodp.kernels.doublep_attn import sparse_triton

    batches, contexts, shapes = a("batches", [1, 8, 32]), a("contexts", [32768, 131072]), a("shapes", list(SHAPES))
    from nanodp.config import SparseConfig

    sp = flags.sparse_from_args(args, attention="doublep") if args is not None else SparseConfig("doublep")
    reps = a("reps", 30)
    rows = []
    hdr = (
        f"{'shape':8} {'B':>3} {'ctx':>7} {'exact%':>7} {'pseudo%':>7} {'dense':>9} {'sdpa':>9} {'doublep':>9} "
        f"{'x':>6} {'topk':>9} {'x':>6} {'eager':>9}"
    )
    print(f"Double-P decode step vs dense (bf16, us per layer step, CUDA-graph replay, {sp})")
    print(hdr)
    for shape in shapes:
        Hq, Hkv, d = SHAPES[shape]
        for ctx in contexts:
            for B in batches:
                need = 2 * B * Hkv * ctx * d * 2 * 1.15
                if need > 0.8 * torch.cuda.mem_get_info()[0]:
                    print(f"{shape:8} {B:>3} {ctx:>7}  skipped: needs {need / 2**30:.0f} GiB")
                    continue
                q, layer, lens, ts = make_synthetic(B, Hq, Hkv, d, ctx)
                _, st = sparse_triton(q, layer, lens, ts, SINKS, sp)
                exact = st["exact_tokens"].float().mean().item() / ctx
                pseudo = st["pseudo_tokens"].float().mean().item() / ctx
                budget = int(st["need_tokens"].float().mean().item())
                dense = {n: time_us(f, reps) for n, f in _dense_fns(q, layer, lens, ctx).items()}
                base = dense.get("decode_triton", dense["sdpa"])
                so = torch.empty(len(STAT_KEYS), B, Hkv, device=q.device)  # as the engine: stats into a slab
                t_dp = time_us(lambda: sparse_triton(q, layer, lens, ts, SINKS, sp, so), reps)
                t_eager = time_us(lambda: sparse_triton(q, layer, lens, ts, SINKS, sp, so), reps, graph=False)
                tk = SparseConfig("topk", budget=budget, estimate=sp.estimate)
                t_tk = time_us(lambda: sparse_triton(q, layer, lens, ts, SINKS, tk, so), reps)
                row = dict(
                    shape=shape,
                    B=B,
                    ctx=ctx,
                    exact_frac=exact,
                    pseudo_frac=pseudo,
                    topk_budget=budget,
                    dense_us=base,
                    dense_kernel="decode_triton" if "decode_triton" in dense else "sdpa",
                    sdpa_us=dense["sdpa"],
                    doublep_us=t_dp,
                    doublep_eager_us=t_eager,
                    topk_us=t_tk,
                    speedup=base / t_dp,
                    topk_speedup=base / t_tk,
                )
                if a("profile", False) and B == batches[0] and ctx == contexts[-1]:
                    row["kernels_us"] = kernel_breakdown(lambda: sparse_triton(q, layer, lens, ts, SINKS, sp, so))
                rows.append(row)
                print(
                    f"{shape:8} {B:>3} {ctx:>7} {100 * exact:>6.2f}% {100 * pseudo:>6.2f}% {base:>9.1f} "
                    f"{dense['sdpa']:>9.1f} {t_dp:>9.1f} {base / t_dp:>5.1f}x {t_tk:>9.1f} {base / t_tk:>5.1f}x "
                    f"{t_eager:>9.1f}",
                    flush=True,
                )
                if "kernels_us" in row:
                    print("   per kernel (us):", ", ".join(f"{n[:24]} {t:.1f}" for n, t in row["kernels_us"].items()))
                q = layer = lens = ts = None
                torch.cuda.empty_cache()
    print(
        "dense = decode_triton if importable else SDPA; x = dense / sparse; eager = doublep without a graph;"
        " topk at the mean exact clustered-token count of doublep"
    )
    return {"rows": rows, "sparse": sp.__dict__, "inputs": __doc__.split("Synthetic inputs")[1].strip()}


def section_sparse(argv):
    """Double-P attention step (score + cut + attention + combine) vs the dense decode kernel."""
    p = argparse.ArgumentParser(prog="python -m nanodp.bench sparse", parents=[common_parser()])
    p.add_argument("--batches", type=int, nargs="+")
    p.add_argument("--contexts", type=int, nargs="+")
    p.add_argument("--shapes", nargs="+")
    p.add_argument("--reps", type=int, help="timed repetitions (default: 30)")
    p.add_argument("--profile", action="store_true", help="per-kernel times of one cell (torch profiler)")
    flags.add(p, "p1", "p2", "group-rule", "whole", "estimate", "floor", "budget", "dense-layers")
    args = p.parse_args(argv)
    require_cuda("sparse")
    return args, bench_sparse(args)
