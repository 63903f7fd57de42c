"""Sweep the Double-P kernels' launch shapes (kernels/doublep_attn.py TILES) on a GPU, at the engine's sparse
defaults (or --sparse), on nanodp.bench.sparse's synthetic inputs; prints us per layer step for every cell and
setting, the per-kernel split of the best, and the setting with the lowest geometric mean over the cells.

    python scripts/tune_sparse.py [--cells llama8b:131072:1,llama8b:131072:8,...] [--reps 20] [--out FILE]
"""

import argparse
import itertools
import json
import math

import torch

from nanodp.bench.sparse import SHAPES, SINKS, _dense_fns, kernel_breakdown, make_synthetic
from nanodp.bench.timing import time_us
from nanodp.config import SparseConfig
from nanodp.kernels import doublep_attn
from nanodp.kernels.doublep import STAT_KEYS

CELLS = "llama8b:131072:1,llama8b:131072:8,llama8b:131072:32,smollm:8192:1,smollm:8192:32"
GRID = dict(block_n=[32, 64], cb=[32, 64], group=[8], attn_per_sm=[2, 8], attn_warps=[4])
HIST = '{"hist_per_sm": [1, 2]}'


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", default=CELLS, help="shape:context:batch, comma-separated")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--hist", default=HIST, help="JSON grid of the hist launch tried at the best attention setting")
    ap.add_argument("--grid", default=None, help='JSON replacing the swept values, e.g. {"cb": [16, 32]}')
    ap.add_argument("--sparse", default="{}", help='JSON of SparseConfig fields, e.g. {"floor_frac": 0}')
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    sp = SparseConfig("doublep", **json.loads(args.sparse))
    base = dict(doublep_attn.TILES)
    grid = GRID | (json.loads(args.grid) if args.grid else {})
    settings = [dict(zip(grid, v)) for v in itertools.product(*grid.values())]
    step = lambda inp: doublep_attn.sparse_triton(*inp[:4], SINKS, sp, inp[4])  # noqa: E731

    def timed(inp, tiles):
        doublep_attn.TILES.update(tiles)
        return time_us(lambda: step(inp), args.reps)

    times, dense, cells = {}, {}, []  # cells: (name, (q, layer, lens, tail_start, stats slab))
    for cell in args.cells.split(","):
        shape, ctx, B = cell.split(":")
        Hq, Hkv, d = SHAPES[shape]
        q, layer, lens, ts = make_synthetic(int(B), Hq, Hkv, d, int(ctx))
        inp = (q, layer, lens, ts, torch.empty(len(STAT_KEYS), int(B), Hkv, device=q.device))  # stats as the engine
        dense[cell] = min(time_us(f, args.reps) for f in _dense_fns(q, layer, lens, int(ctx)).values())
        for i, s in enumerate(settings):
            times[cell, i] = timed(inp, base | s)
        t0 = timed(inp, base)
        best = min(range(len(settings)), key=lambda i: times[cell, i])
        doublep_attn.TILES.update(base | settings[best])
        split = kernel_breakdown(lambda: step(inp))
        print(
            f"{cell}: dense {dense[cell]:.1f} us, best {times[cell, best]:.1f} us ({settings[best]}), "
            f"as committed {t0:.1f}; kernels {split}",
            flush=True,
        )
        cells.append((cell, inp))
    geo = lambda i: math.exp(sum(math.log(times[c, i]) for c, _ in cells) / len(cells))  # noqa: E731
    best = min(range(len(settings)), key=geo)
    pick = base | settings[best]
    hg = json.loads(args.hist)
    hs = [dict(zip(hg, v)) for v in itertools.product(*hg.values())]
    hist = {json.dumps(h): [timed(inp, pick | h) for _, inp in cells] for h in hs}
    pick |= json.loads(min(hist, key=lambda h: sum(map(math.log, hist[h]))))
    print("\nsetting (geo-mean over cells) and us per cell:")
    for i in sorted(range(len(settings)), key=geo)[:8]:
        print(f"  {geo(i):8.1f}  {settings[i]}  " + " ".join(f"{times[c, i]:.1f}" for c, _ in cells))
    print(f"hist: { {h: [round(x, 1) for x in v] for h, v in hist.items()} }")
    print(f"pick: {pick}")
    print("cell, dense us, pick us, speedup:")
    for cell, inp in cells:
        tp = timed(inp, pick)
        print(f"  {cell:22} {dense[cell]:9.1f} {tp:9.1f} {dense[cell] / tp:6.2f}x")
    if args.out:
        json.dump(
            dict(pick=pick, times={f"{c}|{i}": v for (c, i), v in times.items()}, settings=settings, dense=dense),
            open(args.out, "w"),
        )


if __name__ == "__main__":
    main()
