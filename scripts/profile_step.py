"""Where does one decode step's time go? (GPU) Kernel count and the top kernels of one eager step under
torch.profiler, then the CUDA-graph replay time of the same step.

    python scripts/profile_step.py --ctx 8192 --batch 1 --attention dense
"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from nanodp.config import SparseConfig
from nanodp.engine import Engine
from nanodp.eval.haystack import prose

p = argparse.ArgumentParser()
p.add_argument("--ctx", type=int, default=8192)
p.add_argument("--batch", type=int, default=1)
p.add_argument("--attention", default="dense")
p.add_argument("--top", type=int, default=18)
a = p.parse_args()

fill = a.ctx - 128
for eager in (True, False):
    eng = Engine(
        None,
        device="cuda",
        max_batch=a.batch,
        max_len=a.ctx,
        eager=eager,
        sparse=SparseConfig(attention=a.attention),
        quiet=True,
    )
    eng.prefill([prose(eng.tok, fill, b) for b in range(a.batch)], [0] * a.batch)
    tok = torch.zeros(a.batch, dtype=torch.long, device="cuda")
    act = torch.ones(a.batch, dtype=torch.bool, device="cuda")
    for _ in range(3):
        eng.decode_step(tok, act)
    torch.cuda.synchronize()
    if eager:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            eng.decode_step(tok, act)
            torch.cuda.synchronize()
        ev = [e for e in prof.events() if e.device_type.name == "CUDA"]
        total = sum(e.device_time for e in ev)
        print(f"eager step: {len(ev)} kernels, {total:.0f} us of kernel time ({a.attention}, B={a.batch}, ctx {fill})")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.top, max_name_column_width=60))
    n = 200
    t = time.perf_counter()
    for _ in range(n):
        eng.decode_step(tok, act)
    torch.cuda.synchronize()
    print(f"{'eager' if eager else 'graph'} step: {(time.perf_counter() - t) / n * 1e3:.3f} ms")
    del eng
