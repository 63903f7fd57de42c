"""Where the clustering pass's time goes at the default model's shape, and how the assignment's tile shape
moves it (GPU, synthetic structured keys; no model needed).

    python scripts/sweep_kmeans.py [--batch 8] [--n 8192]

Shape: 30 layers x 3 KV heads x d = 64 (SmolLM2-135M), B sequences of n tokens, k = n // 16 clusters: the
N = 90 B problems one prefill clusters. Prints ms per step of the pass (mean_init, one round, final, sort,
reorder, append, the whole pass), a sweep of the final round's (block_t, block_k, num_warps), the same tiles
for the rounds (step) inside a whole k-means call, and the whole pass at fewer rounds.
"""

import argparse
import functools
import time

import torch

import nanodp.cluster as cluster
from nanodp.cluster import MAX_ROWS, Tables, _kmeans_triton, _pass, _Workspace
from nanodp.kernels.kmeans import make_rows
from nanodp.kernels.kmeans_pass import final_triton, mean_init_triton, step_triton
from nanodp.kernels.kmeans_store import append_triton, reorder_triton

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, default=8)
p.add_argument("--n", type=int, default=8192)
p.add_argument("--iters", type=int, default=10)
p.add_argument("--device", default="cuda")  # cpu: a smoke test under TRITON_INTERPRET=1
a = p.parse_args()
NL, H, D, B, n = (30 if a.device == "cuda" else 2), 3, 64, a.batch, a.n
k = n // 16
DEV = a.device
g = torch.Generator(device=DEV).manual_seed(0)
dirs = torch.randn(NL, 1, H, 64, D, device=DEV, generator=g)
topic = torch.randint(0, 64, (n // 32 + 1,), device=DEV, generator=g).repeat_interleave(32)[:n]
K = (dirs[:, :, :, topic] + 0.5 * torch.randn(NL, B, H, n, D, device=DEV, generator=g)).bfloat16()
V = torch.randn_like(K)
POS = torch.arange(n, dtype=torch.int32, device=DEV).expand(NL, B, H, n).contiguous()


def ms(fn, reps=5):
    if DEV == "cpu":
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1))
    return sorted(ts)[len(ts) // 2]


jobs_per_call = max(1, MAX_ROWS // (NL * H * n))
r = make_rows(K, V, POS, [(b, 0) for b in range(min(B, jobs_per_call))], n)
N = r.N
print(f"shape: {NL} layers x {H} heads x d={D}, B={B}, n={n}, k={k}; {N} problems a call, {B / r.N * NL * H:.0f} calls")
ws = _Workspace(N, k, D, a.iters + 1, DEV, n)
c = torch.empty(N, k, D, dtype=K.dtype, device=DEV)
mean_init_triton(r, k, ws.mu, c, ws.ctr[0])
rows = []


def step1():  # a first round: every row moves (the workspace zeroed)
    ws.s.zero_(), ws.scnt.zero_(), ws.prev.zero_(), ws.ctr.zero_()
    step_triton(r, ws.mu, c.clone(), ws.s, ws.scnt, ws.prev, ws.ctr[1])


rows.append(("mean_init", ms(lambda: (ws.mu.zero_(), ws.ctr.zero_(), mean_init_triton(r, k, ws.mu, c, ws.ctr[0])))))
rows.append(("step, first round (+ 4 memsets)", ms(step1)))
rows.append(("memsets alone", ms(lambda: (ws.s.zero_(), ws.scnt.zero_(), ws.prev.zero_(), ws.ctr.zero_()))))
aa = torch.empty(N, n, dtype=torch.int16, device=DEV)
rows.append(("final (no copy)", ms(lambda: (ws.cnt.zero_(), final_triton(r, ws.mu, c, aa, ws.cnt)))))
scratch = (torch.empty(N, n, D, dtype=K.dtype, device=DEV), torch.empty_like(K[0, 0, 0]).new_empty(N, n, D))
scratch = (*scratch, torch.empty(N, n, dtype=torch.int32, device=DEV))
rows.append(("final (copy K, V, pos)", ms(lambda: (ws.cnt.zero_(), final_triton(r, ws.mu, c, aa, ws.cnt, scratch)))))
rows.append(("torch.sort int16 [N, n]", ms(lambda: torch.sort(aa, dim=1, stable=True))))
sid, perm = torch.sort(aa, dim=1, stable=True)
rows.append(("reorder", ms(lambda: reorder_triton(r, perm, *scratch))))
C = n // 16 + 8
tab = Tables(
    K,
    V,
    POS,
    *(torch.zeros(NL, B, H, C, D, dtype=K.dtype, device=DEV) for _ in range(2)),
    torch.zeros(NL, B, H, C, device=DEV),
    torch.zeros(NL, B, H, C + 1, dtype=torch.int32, device=DEV),
    torch.zeros(NL, B, H, dtype=torch.int32, device=DEV),
    torch.zeros(NL, B, H, C, D, dtype=K.dtype, device=DEV),
)
rows.append(
    (
        "append",
        ms(lambda: (tab.ncl.zero_(), ws.ctr.zero_(), append_triton(r, tab, sid, ws.cnt, ws.ctr[a.iters], ws.mu))),
    )
)
rows.append((f"k-means rounds ({a.iters}) of one call", ms(lambda: _kmeans_triton(r, k, a.iters), 3)))
jobs = [(b, 0, n) for b in range(B)]


def whole():
    tab.ncl.zero_()
    for j0 in range(0, B, jobs_per_call):
        _pass(tab, jobs[j0 : j0 + jobs_per_call], k, a.iters, "triton")


rows.append((f"whole pass, {B} sequences", ms(whole, 3)))
for name, t in rows:
    print(f"{name:36s} {t:8.3f} ms")
print("\nfinal round (no copy), ms by (block_t, block_k, num_warps):")
for bt in (64, 128, 256):
    for bk in (32, 64, 128):
        for nw in (4, 8):
            try:
                t = ms(lambda: (ws.cnt.zero_(), final_triton(r, ws.mu, c, aa, ws.cnt, None, bt, bk, nw)))
                print(f"  {bt:4d} {bk:4d} {nw:2d}  {t:8.3f}")
            except Exception as e:  # out of resources at the big tiles
                print(f"  {bt:4d} {bk:4d} {nw:2d}  {type(e).__name__}")

print(f"\nk-means rounds ({a.iters}) of one call, ms, step_triton tiles (block_t, block_k, num_warps):")
for bt, bk, nw in (
    (128, 64, 8),
    (64, 32, 4),
    (128, 32, 8),
    (64, 32, 8),
    (128, 32, 4),
    (32, 32, 4),
    (64, 16, 4),
    (128, 16, 8),
    (64, 64, 4),
):
    cluster.step_triton = functools.partial(step_triton, block_t=bt, block_k=bk, num_warps=nw)
    try:
        print(f"  {bt:4d} {bk:4d} {nw:2d}  {ms(lambda: _kmeans_triton(r, k, a.iters), 3):8.3f}")
    except Exception as e:
        print(f"  {bt:4d} {bk:4d} {nw:2d}  {type(e).__name__}")
cluster.step_triton = step_triton
print("\nwhole pass by rounds, ms (the committed tiles):")
for it in (10, 8, 6, 5, 4, 3):
    a.iters = it
    print(f"  {it:3d}  {ms(whole, 3):8.3f}")
