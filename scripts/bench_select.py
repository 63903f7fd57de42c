"""GPU: the Double-P select-kernel variants (kernels/doublep_select_fast.py) against the base kernel and
the torch twin, and their times. One GPU call, well under 3 minutes:

    PYTHONPATH=. python scripts/bench_select.py        # --budget-s 130: skips what is left after that
    PYTHONPATH=. python scripts/bench_select.py --ctx 8192 32768   # these contexts at batch 1, 8 instead

Cases: llama8b (32 q heads, 8 KV heads, d 128) and smollm (9, 3, 64); 128K at batch 1, 8, 32, then 32K
at batch 1, 8, in that order; p1 = 0.95, p2 = 0.7. Inputs: nanodp.bench_sparse.make_synthetic (16-token
clusters, 2.5% of them on the query's topic direction; the exact / pseudo fractions it produces are
printed per case: about 1.0% / 0.9% of tokens at 128K in h200-sparse-128k.log).

Check, per case and variant, per (sequence, KV head): the work list (meta, idx[:nX], pid[:nP]) must equal
the base kernel's bitwise, and the twin's selection (group_scores + select_clusters) turned into the same
list. A head may differ only where the twin puts a cumulative sum within 2e-6 of p1 or p2: there the
order of float additions decides the cut (the kernels sum in a tree, the twin in rank order); such heads
are counted as "near", any other difference as BAD.
Times: `sel` = the select kernel's device time (torch profiler, mean over 20 eager steps, inputs in L2 as
in a real step); `step` = the whole sparse_triton step as a CUDA-graph replay, L2 flushed, median of 20;
`dense` = decode_triton (or SDPA) the same way. Ablation rows (stop=G / stop=cuts) time the fast kernel
stopped after the group distribution / after the cuts: their differences split `sel` into phases.
`sort` finds the cuts by a bitonic sort + prefix sum instead of a bisection (no chain of ~26
dependent block reductions); `sort` runs at contexts below 128K only (C <= ~4096 per head, its target).
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from nanodp.bench_sparse import SHAPES, SINKS, _dense_fns, kernel_breakdown, make_synthetic, time_us  # noqa: E402
from nanodp.kernels import doublep_attn as da  # noqa: E402
from nanodp.kernels.doublep import group_scores, select_clusters  # noqa: E402

P1, P2, NEAR = 0.95, 0.7, 2e-6


def twin_lists(q, layer):
    """The twin's selection as per-head lists (idx, pid) plus a per-head 'near a cut' flag."""
    _, G, valid = group_scores(q, layer)
    cst = layer.cstart.long()
    sizes = torch.where(valid, cst[..., 1:] - cst[..., :-1], 0)
    exact, pseudo, _, _ = select_clusters(G, valid, sizes, P1, P2)
    cum = G.clamp_min(0).sort(-1, descending=True).values.cumsum(-1)
    near = ((cum - P1).abs().amin(-1) < NEAR) | ((cum - P2).abs().amin(-1) < NEAR)
    B, H = G.shape[:2]
    lists = []
    for b in range(B):
        for h in range(H):
            ids = exact[b, h].nonzero()[:, 0]
            lo, n = cst[b, h, ids], sizes[b, h, ids]
            tok = torch.repeat_interleave(lo - torch.cumsum(n, 0) + n, n) + torch.arange(int(n.sum()), device=lo.device)
            lists.append((tok.int(), pseudo[b, h].nonzero()[:, 0].int()))
    return lists, near.flatten().tolist()


def kernel_lists(plan, C):
    idx, pid, meta, cap = plan
    meta = meta.view(-1, 8)[:, :5]
    out = []
    for bh in range(meta.shape[0]):
        nX, nP = int(meta[bh, 3]), int(meta[bh, 4])
        out.append((meta[bh], idx.view(-1, cap)[bh, :nX].clone(), pid.view(-1, C)[bh, :nP].clone()))
    return out


def compare(got, want, near, with_meta):
    """(heads equal, heads differing but near a cut, heads differing elsewhere)."""
    eq = nr = bad = 0
    for g, w, n in zip(got, want, near):
        same = torch.equal(g[1], w[1 if with_meta else 0]) and torch.equal(g[2], w[2 if with_meta else 1])
        same = same and (not with_meta or torch.equal(g[0], w[0]))
        eq, nr, bad = eq + same, nr + (not same and n), bad + (not same and not n)
    return eq, nr, bad


def configs(shape, ctx, B):
    """(variant, num_warps or None = default, ablation stop) to run for one case, the most telling first."""
    out = [(v, None, 0) for v in ("base", "bisect", "contract")]
    if ctx < 131072:     # the full sort is meant for C <= ~4096 clusters per head (and compiles slowly past it)
        out.append(("sort", None, 0))
    if ctx >= 131072 and B == 1:
        out += [("bisect", 8, 0), ("contract", 8, 0), ("bisect", 4, 0)]
        if shape == "llama8b":
            out += [("base", 8, 0), ("bisect", None, 1), ("bisect", None, 2), ("contract", None, 2)]
    if ctx < 131072 and B == 1 and shape == "llama8b":   # phases at C ~ ctx / 16: the cuts, bisect vs sort
        out += [("bisect", None, 1), ("bisect", None, 2), ("sort", None, 2), ("sort", 8, 0), ("bisect", 8, 0)]
    return out


def check_line(got, base_lists, want, near):
    """Work list vs the base kernel's (meta included) and vs the twin's; returns (text, BAD heads)."""
    e1, n1, b1 = compare(got, base_lists, near, True)
    e2, n2, b2 = compare(got, want, near, False)
    text = (f"base {e1}/{len(got)}" + (f" near {n1}" if n1 else "") + (f" BAD {b1}" if b1 else "")
            + f", twin {e2}/{len(got)}" + (f" near {n2}" if n2 else "") + (f" BAD {b2}" if b2 else ""))
    return text, b1 + b2


def run_case(shape, ctx, B, reps, deadline, rows):
    """Every config of one case; appends table rows, returns the number of BAD head lists."""
    Hq, Hkv, d = SHAPES[shape]
    q, layer, lens, ts = make_synthetic(B, Hq, Hkv, d, ctx)
    C = layer.centroids.shape[2]
    want, near = twin_lists(q, layer)
    dense = min(_dense_fns(q, layer, lens, ctx).items(), key=lambda kv: kv[0] != "decode_triton")[1]
    t_dense = time_us(dense, reps)
    base_lists, bad = None, 0
    step = lambda: da.sparse_triton(q, layer, lens, ts, SINKS, P1, P2)   # noqa: E731
    for var, nw, stop in configs(shape, ctx, B):
        if time.time() > deadline:
            break
        da.SELECT_VARIANT, da.SELECT_WARPS, da.SELECT_STOP = var, nw, stop
        da.PLAN_SINK = []
        _, st = step()
        got = kernel_lists(da.PLAN_SINK[0], C)
        da.PLAN_SINK = None
        base_lists = base_lists or got          # configs() puts the base kernel first
        check, b = ("(ablation)", 0) if stop else check_line(got, base_lists, want, near)
        bad += b
        ks = kernel_breakdown(step)
        sel = sum(t for k, t in ks.items() if "select" in k)
        t_step = time_us(step, reps)
        ex = st["exact_tokens"].float().mean().item() / ctx
        ps = st["pseudo_tokens"].float().mean().item() / ctx
        tag = var + (f" w{nw}" if nw else "") + {0: "", 1: " stop=G", 2: " stop=cuts"}[stop]
        rows.append((shape, B, ctx, tag, sel, t_step, t_dense, ex, ps, check))
        print(f"  {shape} B={B} ctx={ctx} {tag}: sel {sel:.1f} us, step {t_step:.1f} us, {check}", flush=True)
    return bad


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=130.0)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--ctx", type=int, nargs="*",
                    help="these contexts instead, at batch 1 and 8 (e.g. --ctx 8192 32768)")
    args = ap.parse_args()
    t_start = time.time()
    default = (da.SELECT_VARIANT, da.SELECT_WARPS, da.SELECT_STOP)
    rows, bad = [], 0
    cases = ((131072, 1), (131072, 8), (131072, 32), (32768, 1), (32768, 8))
    if args.ctx:
        cases = [(ctx, B) for ctx in args.ctx for B in (1, 8)]
    for ctx, B in cases:
        for shape in ("llama8b", "smollm"):
            if time.time() - t_start > args.budget_s:
                print(f"skipped {shape} B={B} ctx={ctx}: time budget", flush=True)
                continue
            bad += run_case(shape, ctx, B, args.reps, t_start + args.budget_s, rows)
            da.SELECT_VARIANT, da.SELECT_WARPS, da.SELECT_STOP = default
            torch.cuda.empty_cache()
    print(f"\nselect-kernel variants (p1={P1} p2={P2}; us; x = dense / step; {time.time() - t_start:.0f} s)")
    print(f"{'shape':8} {'B':>2} {'ctx':>6} {'variant':24} {'sel':>6} {'step':>6} {'dense':>6} {'x':>5} "
          f"{'exact%':>6} {'pseu%':>6}  check (heads equal / near a cut / BAD)")
    for shape, B, ctx, tag, sel, t_step, t_dense, ex, ps, check in rows:
        print(f"{shape:8} {B:>2} {ctx // 1024:>5}K {tag:24} {sel:6.1f} {t_step:6.1f} {t_dense:6.1f} "
              f"{t_dense / t_step:5.1f} {100 * ex:6.2f} {100 * ps:6.2f}  {check}")
    print("ALL WORK LISTS MATCH" if bad == 0 else f"MISMATCHES: {bad} head lists differ away from a cut")


if __name__ == "__main__":
    main()
