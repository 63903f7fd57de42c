"""The threshold searches of the fast select kernels (kernels/doublep_select_fast.py) against the base
kernel's 31-step bisection and the definition, on hand-made distributions with many exact ties, targets
that hit a cumulative sum exactly, and the special targets (never reached, <= 0)."""
import math

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from nanodp.kernels.doublep_select import _bisect  # noqa: E402
from nanodp.kernels.doublep_select_fast import _search, _sort_search  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CPAD = 64


@triton.jit
def _probe(g_ptr, w_ptr, t_ptr, lo_ptr, out_ptr, N, CPAD: tl.constexpr, SEARCH: tl.constexpr,
           PACK: tl.constexpr, R: tl.constexpr):
    i = tl.arange(0, CPAD)
    Gv = tl.load(g_ptr + i, mask=i < N, other=-1.0)      # invalid slots: -1, as in the kernels
    W = tl.load(w_ptr + i, mask=i < N, other=0.0)
    two = tl.arange(0, 2)
    tgt = tl.load(t_ptr + two)
    lo0 = tl.load(lo_ptr + two)
    if SEARCH < 0:
        x = _bisect(Gv, tl.zeros([2, CPAD], tl.float32) + W[None, :], tgt, lo0)
    elif SEARCH == 3:
        x, _ = _sort_search(Gv.to(tl.int32, bitcast=True), W, tgt, PACK, R)
    else:
        x = _search(Gv.to(tl.int32, bitcast=True), W, tgt, lo0, SEARCH)
    tl.store(out_ptr + two, x)


def run(G, W, tgt, lo0, search, pack=True, r=1):
    out = torch.empty(2, device=DEV)
    _probe[(1,)](G.to(DEV), W.to(DEV), torch.tensor(tgt, device=DEV, dtype=torch.float32),
                 torch.tensor(lo0, device=DEV, dtype=torch.int32), out, len(G), CPAD=CPAD, SEARCH=search,
                 PACK=pack, R=r)
    return out.cpu()


def definition(G, W, tgt):
    """t = the score at the first rank where the cumulative weight (ties taken together) reaches tgt;
    +inf for tgt <= 0, 0 (keep all) when it is never reached. Returns the kept set."""
    if tgt <= 0:
        return set()
    vals = sorted(set(G.tolist()), reverse=True)
    for v in vals:
        if W[G >= v].sum() >= tgt:
            return {i for i in range(len(G)) if G[i] >= v}
    return set(range(len(G)))


@pytest.mark.parametrize("seed", range(6))
def test_searches_equal_the_base_bisection(seed):
    gen = torch.Generator().manual_seed(seed)
    for trial in range(4):
        n = int(torch.randint(0, CPAD + 1, (1,), generator=gen)) if trial else CPAD
        # dyadic scores with few distinct values: sums are exact, ties are everywhere
        G = torch.randint(1, 9, (n,), generator=gen).float() ** 2 / 1024
        W = G.clone() if trial % 2 == 0 else torch.randint(1, 20, (n,), generator=gen).float()
        cum = W[G.argsort(descending=True)].cumsum(0) if n else torch.zeros(1)
        pick = cum[torch.randint(0, len(cum), (2,), generator=gen)]
        targets = [(float(pick[0]), float(pick[1])),                       # exactly on a cumulative sum
                   (float(pick[0]) - 1e-3, float(pick[1]) + 1e-3),          # just around one
                   (0.0, float(W.sum()) + 1.0),                             # keep none; never reached
                   (float(W.sum()), 1e-3)]
        for tgt in targets:
            # a lower bound the kernel may start from: 0, or a score whose tail weight reaches tgt[k]
            lo0 = [0, 0]
            for k in range(2):
                ok = [v for v in G.tolist() if W[G >= v].sum() >= tgt[k] > 0]
                if ok and trial % 2:
                    lo0[k] = int(torch.tensor(min(ok)).view(torch.int32)) // 2   # any bits below are fine
            want = run(G, W, tgt, lo0, -1)
            for search in (0, 1):
                got = run(G, W, tgt, lo0, search)
                assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (seed, trial, tgt, search, got, want)
            # the sort: the weights packed with the scores, or (doublep: W is G) only the scores
            # sorted; input permuted for R registers per thread or not
            for r in (1, 4, 8):
                for pack in (True, False) if trial % 2 == 0 else (True,):
                    got = run(G, W, tgt, lo0, 3, pack=pack, r=r)
                    assert torch.equal(got.view(torch.int32), want.view(torch.int32)), \
                        (seed, trial, tgt, r, pack, got, want)
            for k in range(2):
                kept = {i for i in range(n) if G[i] >= want[k]}
                assert kept == definition(G, W, tgt[k]), (seed, trial, tgt[k])
                assert math.isinf(want[k]) == (tgt[k] <= 0)
