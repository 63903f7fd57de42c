"""Would 8-bit stage-1 tables change the selection? (offline, CPU; a question for the next GPU run)

    OMP_NUM_THREADS=2 python scripts/fp8_tables.py [--length 4096] [--n 2] [--seed 1]

Stage 1 reads every cluster's centroid and (estimate="gauss") its key variances: 2 x d values a cluster, 6.25% of
a dense step's K and V bytes at 16-bit and cluster size 16, about a quarter of what the engine's default reads at
8K. This script prefills evaluation prompts on the default model (torch twins, fp32), and at the first decode
step of every layer selects with the tables rounded to bf16 (what the GPU stores) and to float8 (e4m3, saturated
at +-448), for the variances alone and for both tables. Per variant, averaged over layers, query heads and
prompts: the output's relative error against dense attention over the same cache, the true attention mass the
exact set holds, the share of KV heads whose exact set equals the bf16 one, and the bytes read over dense's
(the evaluation's KV formula: exact tokens 2 d, pseudo-tokens d, scan per cluster d + d + 8 bytes at the tables'
width).
"""

import argparse
import math
from types import SimpleNamespace

import torch

from nanodp.config import ClusterConfig, SparseConfig
from nanodp.engine import Engine
from nanodp.eval.tasks import make_tasks
from nanodp.kernels.doublep import select_ref, sparse_ref
from nanodp.sampler import SamplingParams

VARIANTS = {  # name: (centroid dtype, variance dtype)
    "bf16 tables": (torch.bfloat16, torch.bfloat16),
    "fp8 variances": (torch.bfloat16, torch.float8_e4m3fn),
    "fp8 both": (torch.float8_e4m3fn, torch.float8_e4m3fn),
}


def rounded(x, dtype):
    if dtype == torch.float8_e4m3fn:
        x = x.clamp(-448.0, 448.0)
    return x.to(dtype).float()


class Probe:
    """AttentionContext.observer: at the first decode step, every variant's selection of every layer."""

    def __init__(self, sp, sinks):
        self.sp, self.sinks, self.rows = sp, sinks, {v: [] for v in VARIANTS}
        self.vmax = 0.0

    def __call__(self, li, q, layer, lens, tail_start, o, active):
        B, Hq, d = q.shape
        _, Hkv, L, _ = layer.k.shape
        g, t = Hq // Hkv, torch.arange(L)
        live = t[None] < lens.long()[:, None]
        x = torch.einsum("bhgd,bhld->bhgl", q.float().view(B, Hkv, g, d), layer.k.float()) / math.sqrt(d)
        p = torch.softmax(x.masked_fill(~live[:, None, None], -math.inf), -1)
        od = torch.einsum("bhgl,bhld->bhgd", p, torch.where(live[:, None, :, None], layer.v.float(), 0.0))
        self.vmax = max(self.vmax, float(layer.kvar.abs().max()))
        base = None
        for name, (cd, vd) in VARIANTS.items():
            lay = SimpleNamespace(**{f: getattr(layer, f) for f in ("k", "v", "vmean", "logsize", "cstart", "ncl")})
            lay.centroids, lay.kvar = rounded(layer.centroids, cd), rounded(layer.kvar, vd)
            s = select_ref(q, lay, lens, tail_start, self.sinks, self.sp)
            o, st = sparse_ref(q, lay, lens, tail_start, self.sinks, self.sp)
            err = (o.float().view(B, Hkv, g, d) - od).norm(dim=-1) / od.norm(dim=-1).clamp_min(1e-30)
            mass_x = (p * s.tokens[:, :, None]).sum(-1)
            dense = lens.float()[:, None]
            es_c, es_v = torch.empty((), dtype=cd).element_size(), torch.empty((), dtype=vd).element_size()
            scan = st["scored_clusters"].float() * (d * es_c + d * es_v + 8)
            kv = (st["exact_tokens"] * 2 * d * 2 + st["pseudo_tokens"] * d * 2 + scan) / (dense * 2 * d * 2)
            same = 1.0 if base is None else float((s.exact == base).all(-1).float().mean())
            base = s.exact if base is None else base
            self.rows[name].append((float(err.mean()), float(mass_x.mean()), same, float(kv.mean())))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--n", type=int, default=1, help="prompts per task kind")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    sp = SparseConfig("doublep", estimate="gauss")  # the engine's Double-P defaults
    eng = Engine(None, device="cpu", dtype="fp32", max_batch=4, max_len=args.length, kernels="torch",
                 sparse=sp, cluster=ClusterConfig(), quiet=True)  # fmt: skip
    tasks = make_tasks(eng.tok, ["passkey", "single_needle", "multi_key", "kv_retrieval"], [args.length], [0.3, 0.7],
                       args.n, args.seed, max_prompt=args.length - 8)  # fmt: skip
    probe = Probe(sp, eng.cache.cfg.sinks)
    for i in range(0, len(tasks), 4):
        eng.ctx.observer = probe
        eng.generate([t["prompt_ids"] for t in tasks[i : i + 4]], SamplingParams(temperature=0, max_new_tokens=2))
        print(f"  {min(i + 4, len(tasks))} / {len(tasks)} prompts", flush=True)
    print(f"\n{len(tasks)} prompts of ~{args.length} tokens (seed {args.seed}), first decode step, every layer; "
          f"largest key variance {probe.vmax:.1f}")  # fmt: skip
    print(f"{'tables':16} {'out err':>8} {'mass exact':>10} {'same X':>7} {'KV read':>8}")
    for name, rows in probe.rows.items():
        e, m, s, kv = (sum(r[k] for r in rows) / len(rows) for k in range(4))
        print(f"{name:16} {e:8.4f} {m:10.4f} {s:7.1%} {kv:8.2%}")


if __name__ == "__main__":
    main()
