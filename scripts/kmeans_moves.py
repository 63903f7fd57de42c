"""How fast does the clustering converge on real keys? (CPU is enough; slow: the prefill is eager torch)

    python scripts/kmeans_moves.py [--length 8192] [--rounds 15]

Prefills one prose prompt on the default model, takes every layer's and KV head's keys of the clustered range
(bf16, as on the GPU) and runs the k-means twins (kernels/kmeans_pass.py) round by round, printing the share
of rows that changed cluster and the share of problems where none did.
"""

import argparse

import torch

from nanodp.config import SparseConfig
from nanodp.engine import Engine
from nanodp.eval.haystack import prose
from nanodp.kernels.kmeans import assign_ref
from nanodp.kernels.kmeans_pass import centred_unit_ref, mean_init_ref, step_ref

p = argparse.ArgumentParser()
p.add_argument("--length", type=int, default=8192)
p.add_argument("--rounds", type=int, default=15)
a = p.parse_args()
eng = Engine(None, device="cpu", max_batch=1, max_len=a.length, sparse=SparseConfig(attention="dense"), quiet=True)
ids = prose(eng.tok, a.length - 64, 3)
eng.prefill([ids], [0])
K = eng.cache.store.k  # [n_layers, B, Hkv, L, d]
s0 = eng.cache.cfg.sinks
n = (len(ids) - s0) // 16 * 16
x = K[:, 0, :, s0 : s0 + n].reshape(-1, n, K.shape[-1]).to(torch.bfloat16)
k = n // eng.cache.cfg.cluster_size
print(f"{x.shape[0]} problems of n = {n} keys, k = {k}")
mu, c = mean_init_ref(x, k)
y = centred_unit_ref(x, mu).to(c.dtype)
prev = None
for i in range(1, a.rounds + 1):
    asg = assign_ref(y, c)  # round i's assignment (against round i - 1's centroids)
    if prev is not None:
        mv = (asg != prev).sum(1)
        moved, none = 100 * mv.float().mean() / n, 100 * (mv == 0).float().mean()
        print(f"round {i:2d}: rows moved {moved:5.2f}%, problems with none {none:3.0f}%")
    prev = asg
    c = step_ref(x, mu, c)
