"""The select kernel's cut helpers (kernels/doublep_select.py) against the twin's (kernels/doublep.py) on hand-made
histograms: empty and full ones, targets on a cumulative sum exactly, steady shares at and above the target."""

import math

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from nanodp.kernels.doublep import BINS_PER_NAT, NBINS, bin_weights, cut  # noqa: E402
from nanodp.kernels.doublep_select import _count_cut, _mass_cut  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
U = 4


@triton.jit
def _probe(cnt_ptr, r_ptr, s_ptr, out_ptr, p, tgt, BPB, U: tl.constexpr, NB: tl.constexpr):
    u = tl.arange(0, U)
    k = tl.arange(0, NB)
    cnt = tl.load(cnt_ptr + u[:, None] * NB + k[None, :])
    n = _mass_cut(cnt, tl.load(r_ptr + u), tl.load(s_ptr + u), p, BPB, NB)
    tl.store(out_ptr + u, n)
    tl.store(out_ptr + U, _count_cut(tl.cumsum(tl.load(cnt_ptr + k), 0), tgt, NB))


def run(cnt, R, S, p, tgt):
    out = torch.empty(U + 1, device=DEV, dtype=torch.int32)
    _probe[(1,)](
        cnt.int().to(DEV),
        (R / math.log(2)).float().to(DEV),
        S.float().to(DEV),
        out,
        float(p),
        float(tgt),
        BINS_PER_NAT * math.log(2),
        U=U,
        NB=NBINS,
    )
    return out.cpu().long()


def twin_mass_cut(cnt, R, S, p):
    cum = (cnt.float() * bin_weights(R)).cumsum(-1)
    if p >= 1:
        return torch.full((U,), NBINS - 1)
    return cut(cum, p * (S + cum[:, -1]), S)


@pytest.mark.parametrize("seed", range(4))
def test_cuts_equal_the_twin(seed):
    gen = torch.Generator().manual_seed(seed)
    for trial in range(4):
        cnt = torch.zeros(U, NBINS, dtype=torch.long)
        for u in range(U):  # a few occupied bins (u = 0 stays empty on trial 0)
            if trial or u:
                nz = torch.randint(0, 200, (int(torch.randint(1, 12, (1,), generator=gen)),), generator=gen)
                cnt[u, nz] = torch.randint(1, 5, (len(nz),), generator=gen)
        cnt[-1, -1] += 3  # the overflow bin
        R = torch.zeros(U)  # R = 0: weights e^{-(k + 1/2)/64}
        S = torch.tensor([0.0, 0.0, 0.5, 2.0]) * cnt.float().mul(bin_weights(R)).sum(-1)
        for p in (0.0, 0.3, 0.7, 0.95, 1.0):
            want = twin_mass_cut(cnt, R, S, p)
            cum = cnt[0].cumsum(0)
            for tgt in (0, 1, int(cum[-1]), int(cum[-1]) + 5, int(cum[len(cum) // 3]) if trial else 2):
                got = run(cnt, R, S, p, tgt)
                assert torch.equal(got[:U], want), (seed, trial, p, got, want)
                assert int(got[U]) == int(cut(cum.float(), torch.tensor(float(tgt)))), (seed, trial, tgt)
            assert int(want[3]) == -1 or p > 2 / 3  # the steady share, 2/3 of the whole, holds p
            if p > 0:
                assert int(want[0]) >= (-1 if trial == 0 else 0)


def test_count_cut_definition():
    cum = torch.tensor([0, 0, 3, 3, 7]).repeat_interleave(1)
    cum = torch.cat([cum, torch.full((NBINS - 5,), 7)])
    assert int(cut(cum.float(), torch.tensor(3.0))) == 2  # the first bin where 3 is reached
    assert int(cut(cum.float(), torch.tensor(3.5))) == 4
    assert int(cut(cum.float(), torch.tensor(0.0))) == -1  # a target of nothing keeps nothing
    assert int(cut(cum.float(), torch.tensor(99.0))) == NBINS - 1
