"""Follow one Double-P decode step through the torch twin with real numbers from the default model.

    python scripts/walkthrough.py [--layer 14] [--head 0] [--length 2048] [--p1 0.95 --p2 0.7] [--floor 40%]

Prefills a passkey prompt (CPU, fp32), clusters it, decodes the first answer token and, for one layer
and KV head, prints what kernels/doublep.py does: stage-1 scores, the two top-p cuts, tokens read, and the
error against dense attention. The README's "How Double-P works" section quotes its output.
"""

import argparse
import math
import random

import torch

from nanodp import flags
from nanodp.config import SparseConfig
from nanodp.engine import Engine
from nanodp.kernels.decode import decode_ref
from nanodp.kernels.doublep import select_ref, sparse_ref, stage1_logits
from nanodp.sampler import SamplingParams


def passkey_prompt(tok, length, seed=0):
    rnd = random.Random(seed)
    key = str(rnd.randint(10000, 99999))
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    n = max(1, (length - 60) // len(tok.encode(filler)))
    parts = [filler] * n
    parts.insert(n // 2, needle)
    return tok.encode(
        "There is important info hidden inside a lot of irrelevant text. Find it and memorize "
        "it.\n" + "".join(parts) + "\nWhat is the pass key? The pass key is"
    ), key


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", type=int, default=14, help="layer to show (default: %(default)s)")
    ap.add_argument("--head", type=int, default=0, help="KV head (default: %(default)s)")
    ap.add_argument("--length", type=int, default=2048, help="prompt tokens (default: %(default)s)")
    flags.add(ap, "p1", "p2", "group-rule", "whole", "estimate", "floor")
    args = ap.parse_args()
    sp = flags.sparse_from_args(argparse.Namespace(**vars(args), attention="doublep", budget=0, dense_layers=0))
    eng = Engine(None, device="cpu", dtype="fp32", max_batch=1, max_len=args.length + 64, sparse=sp, quiet=True)
    ids, key = passkey_prompt(eng.tok, args.length)
    seen = {}

    def grab(layer_idx, q, layer, lens, tail_start, o, active):
        if layer_idx == args.layer and "q" not in seen:  # the first decode step
            seen.update(q=q.clone(), layer=layer, lens=lens.clone(), ts=tail_start.clone(), o=o.clone())

    eng.ctx.observer = grab
    res = eng.generate([ids], SamplingParams(max_new_tokens=8))
    print(f"prompt {len(ids)} tokens, passkey {key}; Double-P answers {res[0].text!r}; below: the first decode step")
    print(f"setting: {sp}")
    q, layer, lens, ts = seen["q"], seen["layer"], seen["lens"], seen["ts"]
    h, g = args.head, q.shape[1] // layer.k.shape[1]
    n_cl, L = int(layer.ncl[0, h]), int(lens[0])
    S, T0 = min(eng.cache.cfg.sinks, int(ts[0])), int(ts[0])
    print(
        f"layer {args.layer}, KV head {h} (query heads {h * g}..{h * g + g - 1}): {L} tokens = {S} sinks + "
        f"{T0 - S} clustered into {n_cl} clusters + {L - T0} tail tokens"
    )
    zc, z, valid = stage1_logits(q, layer, sp.estimate)
    cst = layer.cstart.long()
    sizes = torch.where(valid, cst[..., 1:] - cst[..., :-1], 0)
    P = torch.softmax(z[0, h, :, :n_cl], -1)  # each query head's distribution over clusters
    G = P.mean(0)
    Gh, order = G.sort(descending=True)
    cum = Gh.cumsum(0)
    print("stage 1: z = q.C/sqrt(d) + ln s per query head, P_h = softmax over clusters, G = mean of the heads' P_h")
    for r in range(6):
        i = int(order[r])
        print(
            f"  rank {r + 1}: cluster {i:4d}  size {int(sizes[0, h, i]):3d}  z per head "
            f"{[round(float(x), 2) for x in z[0, h, :, i]]}  G {float(Gh[r]):.3f}  cumulative {float(cum[r]):.3f}"
        )
    sel = select_ref(q, layer, lens, ts, eng.cache.cfg.sinks, sp)
    base = select_ref(
        q,
        layer,
        lens,
        ts,
        eng.cache.cfg.sinks,
        SparseConfig("doublep", sp.p1, sp.p2, sp.group_rule, sp.whole, estimate=sp.estimate, floor_frac=0.0),
    )
    exact, pseudo = sel.exact[0, h, :n_cl], sel.pseudo[0, h, :n_cl]
    n2, n2p, npx = int(exact.sum()), int(base.exact[0, h, :n_cl].sum()), int(pseudo.sum())
    ex_tok = int((sizes[0, h, :n_cl] * exact).sum())
    print(
        f"cuts ({sp.group_rule}{', whole attention' if sp.whole else ''}): {n2p} clusters reach p2 = {sp.p2}"
        + (f"; the floor raises that to {n2}" if n2 != n2p else "")
        + f" -> read exactly ({ex_tok} tokens); "
        f"{npx} more reach p1 = {sp.p1} -> pseudo-tokens; {n_cl - n2 - npx} clusters dropped"
    )
    steady = S + (L - T0)
    print(
        f"read: {steady} steady + {ex_tok} exact clustered tokens = {steady + ex_tok} of {L} "
        f"({100 * (steady + ex_tok) / L:.1f}%), plus {npx} pseudo-tokens and the {n_cl} centroids scanned"
    )
    # true attention mass (dense softmax) per query head, on what was kept
    kk = layer.k[0, h, :L].float()
    member = sel.tokens[0, h, :L] & ~sel.steady[0, 0, :L]
    approx = torch.zeros(L, dtype=torch.bool)
    for i in torch.nonzero(pseudo).flatten().tolist():
        approx[int(cst[0, h, i]) : int(cst[0, h, i + 1])] = True
    for j in range(g):
        p = torch.softmax(kk @ q[0, h * g + j].float() / math.sqrt(kk.shape[1]), 0)
        print(
            f"  query head {h * g + j}: true mass on steady {float(p[sel.steady[0, 0, :L]].sum()):.3f}, exact "
            f"clusters {float(p[member].sum()):.3f}, pseudo clusters {float(p[approx].sum()):.3f}"
        )
    dense = decode_ref(q, layer.k, layer.v, lens)
    o, _ = sparse_ref(q, layer, lens, ts, eng.cache.cfg.sinks, sp)
    err = [float((o[0, i] - dense[0, i]).norm() / dense[0, i].norm()) for i in range(h * g, h * g + g)]
    print(f"output error |o - o_dense| / |o_dense| for these heads: {[round(e, 4) for e in err]}")


if __name__ == "__main__":
    main()
