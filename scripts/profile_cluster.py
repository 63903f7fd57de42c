"""Where does the clustering of a prefill go? (GPU) The default model prefills B prompts of --ctx tokens for
Double-P (prefill, then clustering) a few times; then one prefill runs under torch.profiler, kernels listed.

    python scripts/profile_cluster.py --ctx 8192 --batch 8 [--kmeans-iters 10]
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from nanodp.config import ClusterConfig, SparseConfig
from nanodp.engine import Engine
from nanodp.eval.haystack import prose

p = argparse.ArgumentParser()
p.add_argument("--ctx", type=int, default=8192)
p.add_argument("--batch", type=int, default=8)
p.add_argument("--top", type=int, default=14)
p.add_argument("--kmeans-iters", type=int, default=ClusterConfig().kmeans_iters)
a = p.parse_args()

sp = SparseConfig(attention="doublep")
eng = Engine(
    None,
    device="cuda",
    max_batch=a.batch,
    max_len=a.ctx,
    sparse=sp,
    quiet=True,
    cluster=ClusterConfig(kmeans_iters=a.kmeans_iters),
)
prompts = [prose(eng.tok, a.ctx - 128, b) for b in range(a.batch)]
c = eng.counters


def fresh():  # the slots emptied (so the prompts' storage is clustered afresh), then the prefill
    for b in range(a.batch):
        eng.cache.reset(b)
    eng.prefill(prompts, [0] * a.batch)


fresh()  # warm-up: compiles every kernel
p0, c0 = c.prefill_s, c.cluster_s
for _ in range(3):
    fresh()
pf, cl = (c.prefill_s - p0) / 3, (c.cluster_s - c0) / 3
print(
    f"B={a.batch}, {a.ctx - 128} tokens, {a.kmeans_iters} k-means rounds: prefill {1e3 * pf:.1f} ms, "
    f"clustering {1e3 * cl:.1f} ms",
    end=" ",
)
print(f"({100 * cl / pf:.0f}% of the prefill)")
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    fresh()
    torch.cuda.synchronize()
ev = [e for e in prof.events() if e.device_type.name == "CUDA"]
print(f"prefill + clustering: {len(ev)} kernels, {sum(e.device_time for e in ev) / 1e3:.1f} ms of kernel time")
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.top, max_name_column_width=50))
