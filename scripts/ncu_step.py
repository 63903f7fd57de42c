"""One Double-P decode step on nanodp.bench.sparse's synthetic inputs, eager, a few times: the program that
Nsight Compute profiles for the kernels' hardware counters (GPU).

    ncu --clock-control none -k regex:_attn_kernel --launch-skip 2 --launch-count 1 --section SpeedOfLight \
        --section Occupancy --section LaunchStats --section WarpStateStats \
        python scripts/ncu_step.py --cell llama8b:131072:1
"""

import argparse
import json

import torch

from nanodp.bench.sparse import SHAPES, SINKS, make_synthetic
from nanodp.config import SparseConfig
from nanodp.kernels import doublep_attn
from nanodp.kernels.doublep import STAT_KEYS

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--cell", default="llama8b:131072:1", help="shape:context:batch")
ap.add_argument("--steps", type=int, default=4)
ap.add_argument("--sparse", default="{}", help="JSON of SparseConfig fields")
ap.add_argument("--tiles", default="{}", help="JSON of kernels/doublep_attn.py TILES entries")
a = ap.parse_args()
shape, ctx, B = a.cell.split(":")
Hq, Hkv, d = SHAPES[shape]
q, layer, lens, ts = make_synthetic(int(B), Hq, Hkv, d, int(ctx))
doublep_attn.TILES.update(json.loads(a.tiles))
sp = SparseConfig("doublep", **json.loads(a.sparse))
st = torch.empty(len(STAT_KEYS), int(B), Hkv, device="cuda")
for _ in range(a.steps):
    doublep_attn.sparse_triton(q, layer, lens, ts, SINKS, sp, st)
torch.cuda.synchronize()
print(a.cell, {k: round(v.float().mean().item(), 1) for k, v in zip(STAT_KEYS, st)})
