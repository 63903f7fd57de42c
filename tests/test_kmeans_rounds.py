"""The k-means rounds' carried state (kernels/kmeans_pass.py: sums updated only by the rows that changed
cluster) against the torch twin, which sums every round from scratch."""

import torch
from test_cluster import DEV, eq, rows_case

from nanodp.cluster import _Workspace
from nanodp.kernels import kmeans_pass as kp


def test_step_rounds_carry_only_the_moved_rows():
    """Rounds of step_triton (sums updated by the rows that changed cluster), fp32, including a cluster that loses
    every member (its centroid is kept, its sum reset to 0). Each round is compared with step_ref from the same
    centroids (a chain of rounds from scratch can part at a near-tie: carried and fresh sums round differently),
    and the carried sums and sizes with those of the kernel's own assignment, summed from scratch."""
    r, k = rows_case(torch.float32, seed=6), 37
    x = r.gather(r.k)
    mu, c = kp.mean_init_ref(x, k)
    y = kp.centred_unit_ref(x, mu)
    ws = _Workspace(r.N, k, 24, 6, DEV, r.n)
    ws.mu.copy_(mu)
    got = c.clone()
    moved = []
    for i in range(6):
        if i == 2:  # cluster 9 duplicates cluster 2: its members all go to 2 (ties: the lower index)
            got[:, 9] = got[:, 2]
            dup = got[:, 9].clone()
        if i == 3:  # row t leaves its cluster a, which keeps members: c_j = y_t (cosine 1) for j = a + 1
            forced = []
            for p in range(r.N):
                a_p = (ws.prev[p] - 1).long()
                t = int(torch.nonzero(ws.scnt[p].gather(0, a_p) >= 3)[0, 0])
                a = int(a_p[t])
                got[p, (a + 1) % k] = y[p, t].to(got.dtype)
                forced.append((p, t, a))
        before, want = ws.prev.clone(), kp.step_ref(x, mu, got)
        kp.step_triton(r, ws.mu, got, ws.s, ws.scnt, ws.prev, ws.ctr[i], block_t=32, block_k=16)
        moved.append(float((ws.prev != before).float().mean()))
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-5, atol=1e-5, msg=f"round {i}")
        a = (ws.prev - 1).long()
        assert a.min() >= 0 and eq(ws.scnt.sum(1), torch.full((r.N,), r.n, dtype=torch.int32))
        fresh = kp.cluster_sums_ref(y, a, k)
        torch.testing.assert_close(ws.s.cpu(), fresh.cpu(), rtol=1e-5, atol=1e-5, msg=f"sums, round {i}")
        sizes = torch.zeros(r.N, k, dtype=torch.int32, device=a.device).scatter_add_(1, a, torch.ones_like(ws.prev))
        assert eq(ws.scnt, sizes), f"sizes, round {i}"
        if i == 2:  # emptied: centroid kept (the duplicate of the old c_2), sum exactly 0
            assert ws.scnt[:, 9].eq(0).all() and ws.s[:, 9].eq(0).all() and eq(got[:, 9], dup)
        if i == 3:  # the forced rows moved, and some left a cluster that still has members (the subtraction)
            assert all(int(ws.prev[p, t]) - 1 == (a + 1) % k for p, t, a in forced)
            assert any(int(ws.scnt[p, a]) > 0 for p, t, a in forced)
    assert moved[0] == 1.0 and 0 < moved[3] < 0.5 and max(moved[4:]) < 0.5  # later rounds move only some rows
