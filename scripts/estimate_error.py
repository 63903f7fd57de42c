"""How wrong is stage 1's cluster-mass estimate on the heads that lose a passkey?
`python scripts/estimate_error.py [--depths 0.1,0.5,0.9] [--seed 1] [--steps 3]`

Prefills passkey prompts (nanodp.tasks, the eval's generator) into the clustered cache of the default model
(CPU fp32), teacher-forces dense's greedy answer, and at every decode step and layer compares, per query head
and cluster, the true log-mass  m_i = ln sum_{k in cluster i} e^{q.k/sqrt d}  with estimators of it:
  centroid   ln s + q.C/sqrt d                                  (the paper's; <= m_i by Jensen)
  gauss      centroid + 1/2 sum_j (q_j/sqrt d)^2 var_ij          (diagonal-Gaussian second-order term)
  gaussfull  centroid + 1/2 q^T Cov_i q / d                       (full covariance, reference only: d^2 a cluster)
  quest      ln((s-1) e^{q.C/sqrt d} + e^{u}),  u = sum_j max(q_j lo_ij, q_j hi_ij)/sqrt d, the per-dimension
             min/max bound of the largest logit (Quest) standing in for one outlier
  outlier    ln((s-1) e^{q.C'/sqrt d} + e^{q.k*/sqrt d}): k* the member farthest from C, C' the mean of the rest
  radius     ln((s-1) e^{q.C/sqrt d} + e^{(q.C + |q| r)/sqrt d}),  r = max_i |k_i - C| (one scalar a cluster)
  gausscap   min(gauss, ln s + (q.C + |q| r)/sqrt d): gauss capped by the radius bound of the largest logit
  gaussquest min(gauss, ln s + u): gauss capped by the Quest bound
"Sharp" heads: a clustered token holds >= --sharp of the head's dense attention (copy/induction heads on the
needle). For those, per estimator: rank of that token's cluster under the head's own P_h and the group score G,
est - true log-mass of the cluster (negative = underestimate), and how often a top-p cut of G at --p drops it.
For all heads: the true attention mass (over clustered tokens) of the clusters a top-p cut of the group score at
--p keeps, and the tokens it reads.
"""
import argparse
import math

import warnings

import torch

from nanodp.config import SparseConfig
from nanodp.engine import Engine
from nanodp.eval_metrics import teacher_force
from nanodp.tasks import make_tasks

warnings.filterwarnings("ignore", message="index_reduce")
EST = ("centroid", "gauss", "gaussfull", "quest", "outlier", "radius", "gausscap", "gaussquest")


def cluster_logmass(q, k, a, s, d):
    """q [g, d], k [n, d] members of the clustered region, a [n] cluster ids, s [C] sizes -> {name: [g, C]}."""
    C, sc = s.numel(), 1.0 / math.sqrt(d)
    x = q @ k.T * sc                                                           # [g, n] token logits
    oh = torch.nn.functional.one_hot(a, C).double()                            # [n, C]
    true = torch.log(torch.exp(x.double()) @ oh).float()
    cent = (oh.T @ k.double() / s[:, None]).float()                            # [C, d]
    dev = k - cent[a]
    var = (oh.T @ (dev.double() ** 2) / s[:, None]).float()                    # population variance per dim
    zc = q @ cent.T * sc + s.log()
    out = {"true": true, "centroid": zc, "gauss": zc + 0.5 * (q ** 2) @ var.T * sc ** 2}
    cov = torch.einsum("nc,ni,nj->cij", oh, dev.double(), dev.double()) / s[:, None, None]
    out["gaussfull"] = zc + 0.5 * torch.einsum("gi,cij,gj->gc", q.double(), cov, q.double()).float() * sc ** 2
    lo = torch.full((C, d), math.inf).index_reduce_(0, a, k, "amin")
    hi = torch.full((C, d), -math.inf).index_reduce_(0, a, k, "amax")
    u = torch.maximum(q[:, None] * lo, q[:, None] * hi).sum(-1) * sc          # [g, C]
    rest = torch.log((s - 1).clamp_min(1e-30))
    mix = lambda base, one: torch.logaddexp(rest + base, one)                  # noqa: E731  ln((s-1)e^b + e^o)
    out["quest"] = mix(zc - s.log(), u)
    dn = dev.norm(dim=-1)
    far = torch.full((C,), -1.0).index_reduce_(0, a, dn, "amax")
    star = torch.zeros(C, dtype=torch.long)
    star[a[dn == far[a]]] = torch.nonzero(dn == far[a])[:, 0]                  # a member at the max distance
    c_rest = (cent * s[:, None] - k[star]) / (s - 1).clamp_min(1)[:, None]
    out["outlier"] = mix(q @ c_rest.T * sc, q @ k[star].T * sc)
    out["radius"] = mix(zc - s.log(), zc - s.log() + q.norm(dim=-1, keepdim=True) * far[None] * sc)
    # gauss capped by ln s + an upper bound of the largest member logit (true mass <= s e^{max x}):
    out["gausscap"] = torch.minimum(out["gauss"], zc + q.norm(dim=-1, keepdim=True) * far[None] * sc)
    out["gaussquest"] = torch.minimum(out["gauss"], s.log() + u)
    return out


def needle_positions(tok, ids, key):
    """Token positions of the passkey sentence: from the first token of the key's first occurrence to the last
    token of its second ("The pass key is K. Remember it. K is the pass key."), or of the first if only one."""
    ends = [len(tok.decode(ids[:i + 1])) for i in range(len(ids))]
    text = tok.decode(ids)
    a = text.index(key)
    b = text.find(key, a + 1)
    b = (b if b >= 0 else a) + len(key)          # other tasks state the value once
    first = next(i for i, e in enumerate(ends) if e > a)
    last = next(i for i, e in enumerate(ends) if e >= b)
    return set(range(first, last + 1))


def table(rows, title):
    print(f"\n{title}; n = {len(rows['centroid'])}")
    print(f"{'estimator':10s} {'rank P_h med/max':>17s} {'rank G med/max':>15s} {'G rank>10':>9s} "
          f"{'est-true med':>12s} {'min':>8s} {'max':>7s} {'dropped':>8s}")
    for e in EST:
        if not rows[e]:
            continue
        t = torch.tensor([x[:4] for x in rows[e]])
        print(f"{e:10s} {int(t[:, 0].median()):8d} / {int(t[:, 0].max()):5d} {int(t[:, 1].median()):6d} / "
              f"{int(t[:, 1].max()):5d} {int((t[:, 1] > 10).sum()):9d} {t[:, 2].median():12.2f} "
              f"{t[:, 2].min():8.2f} {t[:, 2].max():7.2f} {int(t[:, 3].sum()):8d}")


def topp_keep(G, p):
    """Clusters a top-p cut of the distribution G [C] keeps (bool [C])."""
    Gs, o = G.sort(descending=True)
    n = int((Gs.cumsum(0) < p).sum()) + 1
    keep = torch.zeros_like(G, dtype=torch.bool)
    keep[o[:n]] = True
    return keep


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="passkey", help="a needle kind of nanodp.tasks (passkey, single_needle, ...)")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--sharp", type=float, default=0.3)
    ap.add_argument("--p", type=float, default=0.9)
    args = ap.parse_args()
    eng = Engine(None, device="cpu", dtype="fp32", max_batch=1, max_len=args.length + 40, quiet=True, eager=True,
                 sparse=SparseConfig(attention="dense"))
    tasks = make_tasks(eng.tok, [args.task], [args.length], [float(x) for x in args.depths.split(",")], 1, args.seed)
    sharp = {e: [] for e in EST}          # per sharp (head, step): (rank P_h, rank G, est - true, dropped, ...)
    needle = {e: [] for e in EST}         # the same, where the sharp token lies in the passkey sentence
    recall = {e: [0.0, 0.0, 0] for e in EST + ("true",)}   # sum of true clustered mass kept, tokens read, count
    for task in tasks:
        ids = [task["prompt_ids"]]
        npos = needle_positions(eng.tok, task["prompt_ids"], task["answers"][0])
        eng.set_sparse(SparseConfig(attention="dense"))
        feed, _ = teacher_force(eng, ids, args.steps)
        eng.set_sparse(SparseConfig(attention="doublep", p1=1.0, p2=1.0))   # clustered cache, exact attention

        def obs(li, q, layer, lens, ts, o, active):
            B, Hq, d = q.shape
            Hkv, g = layer.k.shape[1], Hq // layer.k.shape[1]
            for h in range(Hkv):
                n = int(layer.ncl[0, h])
                cst = layer.cstart[0, h, :n + 1].long()
                lo, hi_ = int(cst[0]), int(cst[-1])
                k = layer.k[0, h, lo:hi_].float()
                s = (cst[1:] - cst[:-1]).float()
                a = torch.repeat_interleave(torch.arange(n), s.long())
                qh = q[0, h * g:(h + 1) * g].float()
                est = cluster_logmass(qh, k, a, s, d)
                xa = layer.k[0, h, :int(lens[0])].float() @ qh.T / math.sqrt(d)     # [len, g] all tokens
                pd = torch.softmax(xa, 0)
                pcl = pd[lo:hi_]                                                      # dense prob, clustered
                for name, z in est.items():
                    P = torch.softmax(z, -1)
                    G = P.mean(0)
                    keep = topp_keep(G, args.p)
                    tm = torch.exp(est["true"] - est["true"].logsumexp(-1, keepdim=True))   # true cluster dist.
                    r = recall[name]
                    r[0] += float((tm[:, keep].sum(-1)).mean())
                    r[1] += float(s[keep].sum() / s.sum())
                    r[2] += 1
                    if name == "true":
                        continue
                    for j in range(g):
                        if pcl[:, j].max() < args.sharp:
                            continue
                        t_ = int(pcl[:, j].argmax())
                        c = int(a[t_])
                        rk_h = int((P[j] > P[j, c]).sum()) + 1
                        rk_g = int((G > G[c]).sum()) + 1
                        sharp[name].append((rk_h, rk_g, float(z[j, c] - est["true"][j, c]), int(~keep[c]),
                                            n, li, h * g + j, int(s[c])))
                        if int(eng.cache.layers[li].pos[0, h, lo + t_]) in npos:
                            needle[name].append(sharp[name][-1])
        eng.ctx.observer = obs
        teacher_force(eng, ids, args.steps, feed)
        eng.ctx.observer = None
        print(f"{task['id']}: answer {task['answers']}, dense answer {eng.tok.decode(feed[0].tolist())!r}")
    table(sharp, f"sharp (head, step) pairs: a clustered token holds >= {args.sharp} of dense attention")
    table(needle, "those whose sharp token is in the passkey sentence")
    table({e: [x for x in r if x[7] > 1] for e, r in needle.items()}, "... and whose cluster has > 1 member")
    worst = sorted(needle["centroid"], key=lambda x: -x[1])[:8]
    print("worst needle cases under centroid (rank G / clusters, layer, query head, cluster size): "
          + ", ".join(f"{x[1]}/{x[4]} L{x[5]} h{x[6]} s{x[7]}" for x in worst))
    sz = torch.tensor([x[7] for x in needle["centroid"]]).float()
    print(f"needle clusters' sizes: median {sz.median():.0f}, size 1: {int((sz == 1).sum())}, mean {sz.mean():.1f}")
    print(f"\nall heads, top-p cut of the group score at p = {args.p}: true clustered mass kept, clustered tokens read")
    for e in ("true",) + EST:
        m, tk, c = recall[e]
        print(f"{e:10s} mass kept {m / c:.4f}   tokens read {tk / c:.4f}")


if __name__ == "__main__":
    main()
