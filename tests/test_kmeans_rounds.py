"""The k-means rounds' carried state (kernels/kmeans_pass.py: sums updated only by the rows that changed
cluster) against the torch twin, which sums every round from scratch."""

import torch
from test_cluster import DEV, eq, rows_case

from nanodp.cluster import _Workspace
from nanodp.kernels import kmeans_pass as kp


def test_step_rounds_carry_only_the_moved_rows():
    """Rounds of step_triton (sums updated by the rows that changed cluster) against step_ref from scratch each
    round, fp32, including a cluster that loses every member (its centroid is kept, its sum reset to 0)."""
    r, k = rows_case(torch.float32, seed=6), 37
    x = r.gather(r.k)
    mu, c = kp.mean_init_ref(x, k)
    ws = _Workspace(r.N, k, 24, 6, DEV, r.n)
    ws.mu.copy_(mu)
    got, want = c.clone(), c.clone()
    moved = []
    for i in range(6):
        if i == 2:  # cluster 9 duplicates cluster 2: its members all go to 2 (ties: the lower index)
            for t in (got, want):
                t[:, 9] = t[:, 2]
            dup = got[:, 9].clone()
        before = ws.prev.clone()
        kp.step_triton(r, ws.mu, got, ws.s, ws.scnt, ws.prev, ws.ctr[i], block_t=32, block_k=16)
        want = kp.step_ref(x, mu, want)
        moved.append(float((ws.prev != before).float().mean()))
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-5, atol=1e-5, msg=f"round {i}")
        assert eq(ws.scnt.sum(1), torch.full((r.N,), r.n, dtype=torch.int32))
        if i == 2:  # emptied: centroid kept (the duplicate of the old c_2), sum exactly 0
            assert ws.scnt[:, 9].eq(0).all() and ws.s[:, 9].eq(0).all() and eq(got[:, 9], dup)
    assert moved[0] == 1.0 and max(moved[3:]) < 0.5  # later rounds move only some rows
